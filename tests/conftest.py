"""Test configuration: CPU only, a fresh random seed per test; shared helpers live in tests/helpers.py.

Tests by area: library/ (sla2_jax), kernels/ (pallas_kernels, interpret mode or lowered for CUDA), experiments/
(the user jobs, the recipe, the Wan2.1 port), multidevice/ (run by test_multidevice.py in a child process)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles without LLVM optimisation: the suite is compile-bound (small shapes, Pallas interpret mode), and
# this cut tests/kernels/test_pallas_sparse_linear.py + tests/library/test_routing.py from 121 s to 91 s on the 2-core
# CI-like machine. Child processes (tests/test_multidevice.py, the smoke runs of tests/smoke_runs.py) inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py for the tests in library/, kernels/, experiments/

import smoke_runs  # noqa: E402

_BASE_SEED = int.from_bytes(os.urandom(4), "little")

collect_ignore = ["multidevice"]  # run by test_multidevice.py in a 4-device child process


@pytest.fixture
def seed(request):
    """A fresh seed per test (derived from the test name and a run-level random base)."""
    return (hash(request.node.nodeid) + _BASE_SEED) % (2**31)


# The order in which whole files go to the xdist workers (addopts: --no-loadscope-reorder, --dist loadfile): the
# longest first (CPU time on the 2-core CI machine), so that the last files to start are short ones and the two
# workers finish together; the files that wait for the smoke runs (see tests/smoke_runs.py) last, by when their child
# processes have long finished. The rest keep their collection order in between. The same order in one process.
FIRST = [
    "kernels/test_pallas_int8.py",
    "kernels/test_pallas_sparse_linear.py",
    "test_multidevice.py",  # one test: a child process with 4 simulated devices
    "kernels/test_prep.py",
    "library/test_docs_examples.py",
    "experiments/test_experiments_dit.py",
    "library/test_modules.py",
    "library/test_branches.py",
    "library/test_pallas_backend.py",
    "kernels/test_mosaic_fwd_epilogue.py",
    "kernels/test_mosaic_loops.py",
    "kernels/test_mosaic_fp8.py",
]
LAST = ["experiments/test_experiments_recipe.py", "experiments/test_experiments_study.py"]


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))

    def rank(item):
        path = os.path.relpath(str(item.path), here).replace(os.sep, "/")
        if path in FIRST:
            return FIRST.index(path)
        return len(FIRST) + 1 + LAST.index(path) if path in LAST else len(FIRST)

    items.sort(key=rank)  # stable: collection order within a file and among the rest


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin's pytest_configure
def pytest_configure(config):
    """JAX's persistent compilation cache, in a new folder per test process (never shared, so never read half
    written), for every program: the tests retrace the same computations (new closures, eager Pallas calls, the same
    shapes in several tests), and an identical program is then loaded instead of compiled again (what is computed is
    the same). Not in the xdist controller, which runs no test."""
    if _xdist_controller(config):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(config._tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The smoke runs of tests/experiments (tests/smoke_runs.py): started once per pytest run as soon as the collection is
# known, by this process, or under pytest-xdist by the controller (it knows the collection from the first worker that
# reports it, and hands the folder to the workers); a worker only waits for them.
def _xdist_worker(config):
    return hasattr(config, "workerinput")


def _xdist_controller(config):
    return config.pluginmanager.has_plugin("dsession")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["smoke_base"] = smoke_runs.base(node.config)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    smoke_runs.start_selected(node.config, ids)


def pytest_collection_finish(session):
    if not _xdist_worker(session.config) and not _xdist_controller(session.config):
        smoke_runs.start_selected(session.config, [item.nodeid for item in session.items])


def pytest_sessionfinish(session):
    if not _xdist_worker(session.config):
        smoke_runs.stop(session.config)
