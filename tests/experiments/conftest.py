"""The two end-to-end smoke runs (the recipe's and the study's) each run in a child process, started once per pytest
run by tests/conftest.py (see tests/smoke_runs.py); the fixtures of their test modules wait for them
(`smoke_run(name)`)."""

import pytest

import smoke_runs


@pytest.fixture(scope="session")
def smoke_run(request):
    """smoke_run(name) -> {"dirs": [...], "log": stdout} of the finished child run `name` ("recipe" or "study")."""
    base = smoke_runs.base(request.config)
    return lambda name: smoke_runs.wait(base, name)
