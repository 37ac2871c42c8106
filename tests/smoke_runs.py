"""The two end-to-end smoke runs of tests/experiments (the recipe's and the study's), each in a child process.

They are compile-bound, mostly one core each, so they start as soon as the collection is known and overlap with each
other and with the other tests: started by tests/conftest.py once per pytest run, by the pytest process itself or,
under pytest-xdist, by the controller (never by a worker, so each runs once whatever the number of workers), and only
when a test of their module is selected. A test module's fixture waits for its run with `wait(base, name)` (through
the `smoke_run` fixture of tests/experiments/conftest.py), in whichever process it runs: the exit status goes to a
file. Output goes to log files, not pipes, so a child never blocks on a full pipe."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments")
ROOT = os.path.dirname(os.path.dirname(HERE))
SMOKE_RUNS = {"recipe": ("test_experiments_recipe.py", 2), "study": ("test_experiments_study.py", 3)}
_STATE = pytest.StashKey[dict]()


def _state(config) -> dict:
    """The runs' folder (in the run's temporary folder) and processes, in the process that starts them."""
    if _STATE not in config.stash:
        config.stash[_STATE] = {"base": str(config._tmp_path_factory.mktemp("smoke")), "procs": None}
    return config.stash[_STATE]


def base(config) -> str:
    """The folder of this pytest run's smoke runs, in any of its processes (xdist workers get it from the
    controller)."""
    return config.workerinput["smoke_base"] if hasattr(config, "workerinput") else _state(config)["base"]


def start_selected(config, nodeids):
    """Starts, once per pytest run, the runs of which a test is among `nodeids` (not for --collect-only)."""
    state = _state(config)
    if state["procs"] is None and not config.option.collectonly:
        state["procs"] = start(state["base"], {os.path.basename(nodeid.split("::")[0]) for nodeid in nodeids})


def stop(config):
    """Kills the runs still going (the session ended without waiting for them: -x, an interrupt, ...)."""
    for proc in config.stash.get(_STATE, {}).get("procs") or []:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(base: str, selected_files) -> list:
    """Starts the runs whose module (file name) is in `selected_files`, each in `base/<name>`; returns the processes."""
    procs = []
    for name, (module, num_dirs) in SMOKE_RUNS.items():
        if module not in selected_files:
            continue
        run_dir = os.path.join(base, name)
        dirs = [os.path.join(run_dir, f"dir{i}") for i in range(num_dirs)]
        for d in dirs:
            os.makedirs(d)
        with open(os.path.join(run_dir, "dirs.json"), "w") as f:
            json.dump(dirs, f)
        path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)  # XLA_FLAGS as tests/conftest.py set them
        # its own JAX compilation cache (as each test process has, see tests/conftest.py): the runs compile the same
        # programs again (resumed and repeated stages), 59 -> 53 s (recipe) and 99 -> 81 s (study) of CPU time
        env.update(JAX_COMPILATION_CACHE_DIR=os.path.join(run_dir, "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        with open(os.path.join(run_dir, "stdout"), "w") as out, open(os.path.join(run_dir, "stderr"), "w") as err:
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, module), *dirs], env=env, cwd=ROOT,
                                    stdout=out, stderr=err)
        threading.Thread(target=_record_exit, args=(proc, run_dir), daemon=True).start()
        procs.append(proc)
    return procs


def _record_exit(proc, run_dir):
    rc = proc.wait()
    with open(os.path.join(run_dir, "rc.tmp"), "w") as f:
        f.write(str(rc))
    os.replace(os.path.join(run_dir, "rc.tmp"), os.path.join(run_dir, "rc"))  # whole or absent for the readers


def wait(base: str, name: str, timeout: float = 900) -> dict:
    """{"dirs": [...], "log": stdout} of the run `name` once it has exited with 0 (an AssertionError otherwise)."""
    run_dir = os.path.join(base, name)
    assert os.path.isdir(run_dir), f"the smoke run {name!r} was not started (in {base})"
    rc_file, deadline = os.path.join(run_dir, "rc"), time.monotonic() + timeout
    while not os.path.exists(rc_file):
        assert time.monotonic() < deadline, f"the smoke run {name!r} did not finish in {timeout} s"
        time.sleep(0.2)
    rc = int(open(rc_file).read())
    stdout, stderr = open(os.path.join(run_dir, "stdout")).read(), open(os.path.join(run_dir, "stderr")).read()
    assert rc == 0, stdout[-3000:] + stderr[-6000:]
    return {"dirs": json.load(open(os.path.join(run_dir, "dirs.json"))), "log": stdout}
