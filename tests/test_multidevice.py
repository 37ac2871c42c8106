"""Runs tests/multidevice in a child process with 4 simulated CPU devices (XLA_FLAGS must be set before jax
starts, so these cannot share this process). The child compiles with LLVM optimisation off: its tests are
compile-bound (about 35% faster) and the HLO, hence what is computed, is the same."""

import os
import subprocess
import sys


def test_multidevice_suite():
    here = os.path.dirname(__file__)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
               " --xla_backend_optimization_level=0")
    # -o addopts=: the child runs its tests itself, not through pytest-xdist workers (pyproject.toml's addopts)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           os.path.join(here, "multidevice")], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(here), timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
