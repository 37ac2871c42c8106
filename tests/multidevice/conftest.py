"""Multi-device tests: run in their own process with 4 simulated CPU devices (see tests/test_multidevice.py)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/ for conftest helpers
