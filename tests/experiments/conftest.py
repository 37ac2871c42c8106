"""The two end-to-end smoke runs (the recipe's and the study's) each run in a child process. Both start when the
first test of this folder starts, so that they overlap with each other and with the other tests (they are
compile-bound, mostly one core each); the fixtures of their test modules wait for them (`smoke_run(name)`).
Output goes to log files, not pipes, so a child never blocks on a full pipe."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SMOKE_RUNS = {"recipe": ("test_experiments_recipe.py", 2), "study": ("test_experiments_study.py", 3)}


class SmokeRun:
    """One child process `python <module> DIR...`; `wait()` returns the folders once it has exited with 0."""

    def __init__(self, module: str, dirs: list, log_dir: str):
        path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
        if "--xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
        self.dirs, self.stdout, self.stderr = dirs, os.path.join(log_dir, "stdout"), os.path.join(log_dir, "stderr")
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, module), *dirs], env=env, cwd=ROOT,
                                         stdout=out, stderr=err)

    def wait(self, timeout: float = 900) -> dict:
        rc = self.proc.wait(timeout=timeout)
        stdout, stderr = open(self.stdout).read(), open(self.stderr).read()
        assert rc == 0, stdout[-3000:] + stderr[-6000:]
        return {"dirs": self.dirs, "log": stdout}


@pytest.fixture(scope="session", autouse=True)
def _smoke_runs(request, tmp_path_factory):
    selected = {os.path.basename(str(item.fspath)) for item in request.session.items}
    runs = {}
    for name, (module, num_dirs) in SMOKE_RUNS.items():
        if module in selected:
            dirs = [str(tmp_path_factory.mktemp(f"{name}{i}")) for i in range(num_dirs)]
            runs[name] = SmokeRun(module, dirs, str(tmp_path_factory.mktemp(f"{name}-log")))
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()


@pytest.fixture(scope="session")
def smoke_run(_smoke_runs):
    """smoke_run(name) -> {"dirs": [...], "log": stdout} of the finished child run `name` ("recipe" or "study")."""
    return lambda name: _smoke_runs[name].wait()
