"""Test configuration: CPU only, a fresh random seed per test; shared helpers live in tests/helpers.py."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles without LLVM optimisation: the suite is compile-bound (small shapes, Pallas interpret mode), and
# this cut tests/test_pallas_sparse_linear.py + test_routing.py from 121 s to 91 s on the 2-core CI-like machine.
# Child processes (tests/test_multidevice.py) inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

_BASE_SEED = int.from_bytes(os.urandom(4), "little")

collect_ignore = ["multidevice"]  # run by test_multidevice.py in a 4-device child process


@pytest.fixture
def seed(request):
    """A fresh seed per test (derived from the test name and a run-level random base)."""
    return (hash(request.node.nodeid) + _BASE_SEED) % (2**31)
