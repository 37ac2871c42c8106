"""Test configuration: CPU only, a fresh random seed per test; shared helpers live in tests/helpers.py."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

_BASE_SEED = int.from_bytes(os.urandom(4), "little")

collect_ignore = ["multidevice"]  # run by test_multidevice.py in a 4-device child process


@pytest.fixture
def seed(request):
    """A fresh seed per test (derived from the test name and a run-level random base)."""
    return (hash(request.node.nodeid) + _BASE_SEED) % (2**31)
