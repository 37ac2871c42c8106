"""Test configuration: CPU only, a fresh random seed per test; shared helpers live in tests/helpers.py.

Tests by area: library/ (sla2_jax), kernels/ (pallas_kernels, interpret mode or lowered for CUDA), experiments/
(the user jobs, the recipe, the Wan2.1 port), multidevice/ (run by test_multidevice.py in a child process)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles without LLVM optimisation: the suite is compile-bound (small shapes, Pallas interpret mode), and
# this cut tests/kernels/test_pallas_sparse_linear.py + tests/library/test_routing.py from 121 s to 91 s on the 2-core CI-like machine.
# Child processes (tests/test_multidevice.py) inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py for the tests in library/, kernels/, experiments/

_BASE_SEED = int.from_bytes(os.urandom(4), "little")

collect_ignore = ["multidevice"]  # run by test_multidevice.py in a 4-device child process


@pytest.fixture
def seed(request):
    """A fresh seed per test (derived from the test name and a run-level random base)."""
    return (hash(request.node.nodeid) + _BASE_SEED) % (2**31)
