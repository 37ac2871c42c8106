"""The `sla2-benchmark` command: runs ``experiments/benchmark.py`` of the repository this library was installed
from (an editable install, ``pip install -e .``). The benchmark is an experiment, not part of the wheel: from a
wheel the command says where it runs (a clone of the repository: ``python -m experiments.benchmark``)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


def repository_root() -> pathlib.Path | None:
    """The checkout holding this package and experiments/benchmark.py, or None (an installed wheel)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    return root if (root / "experiments" / "benchmark.py").is_file() else None


def main(argv=None):
    root = repository_root()
    if root is None:
        print("sla2-benchmark runs from a clone of the sla2-jax repository (the benchmark is an experiment and is not "
              "in the wheel): clone it, `pip install -e .` there, then run `sla2-benchmark --tiny` or "
              "`python -m experiments.benchmark --tiny`.", file=sys.stderr)
        raise SystemExit(2)
    # a child process, so that the library imports nothing from experiments/ (data flows experiments -> sla2_jax)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    args = sys.argv[1:] if argv is None else list(argv)
    raise SystemExit(subprocess.call([sys.executable, "-m", "experiments.benchmark", *args], env=env))


if __name__ == "__main__":
    main()
