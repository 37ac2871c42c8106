"""Packaging: the wheel holds sla2_jax and pallas_kernels only (experiments run from the repository), its console
commands resolve to functions that exist, the metadata names licence, authors and URLs, and build outputs are
ignored by git."""

import fnmatch
import importlib
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_wheel_packages_are_the_library_and_the_kernels_only():
    """setuptools' find with these include patterns keeps the top-level packages whose names match one."""
    include = PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = [p.parent.name for p in ROOT.glob("*/__init__.py")]
    assert "experiments" in top_level  # a package in the repository...
    kept = {name for name in top_level if any(fnmatch.fnmatchcase(name, pattern) for pattern in include)}
    assert kept == {"sla2_jax", "pallas_kernels"}  # ...but not in the wheel


def test_console_commands_resolve():
    scripts = PROJECT["project"]["scripts"]
    assert set(scripts) == {"sla2-quickstart", "sla2-benchmark"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_metadata_is_complete_and_the_license_file_exists():
    meta = PROJECT["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert meta["authors"] == [{"name": "sla2-jax contributors"}]
    assert meta["urls"] and all(u.startswith("https://") for u in meta["urls"].values())


def test_build_outputs_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "build/" in ignored and "dist/" in ignored


def test_experiments_quickstart_is_the_library_quickstart():
    import experiments.quickstart
    import sla2_jax.quickstart

    assert experiments.quickstart.main is sla2_jax.quickstart.main


def test_benchmark_command_runs_the_repository_benchmark_or_says_where_it_runs(monkeypatch, capfd, tmp_path):
    from sla2_jax import benchmark_command

    assert benchmark_command.repository_root() == ROOT  # this checkout
    monkeypatch.chdir(tmp_path)  # from any directory
    with pytest.raises(SystemExit) as exit_info:
        benchmark_command.main(["--help"])  # the benchmark's own parser, in a child process
    assert exit_info.value.code == 0 and "--tiny" in capfd.readouterr().out
    monkeypatch.setattr(benchmark_command, "repository_root", lambda: None)  # as from a wheel
    with pytest.raises(SystemExit) as exit_info:
        benchmark_command.main(["--tiny"])
    assert exit_info.value.code == 2
    assert "runs from a clone of the sla2-jax repository" in capfd.readouterr().err
