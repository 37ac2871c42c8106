"""Shared helpers of the GPU probe scripts (probe_mosaic_*.py, check_mosaic_library.py): timing (synchronised and
kernel-only), relative error, error recording, option switches and random LUTs."""

from __future__ import annotations

import statistics
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import time_fn


def bench(fn, *args, runs=20):
    """Median milliseconds of synchronised calls of jit(fn)(*args) after 3 warm-up calls."""
    return 1e3 * time_fn(jax.jit(fn), *args, warmup=3, iters=runs)


def kernel_ms(fn, args, iterations=20):
    """Kernel-only milliseconds of jit(fn)(*args) on the GPU (CUPTI, jax.experimental.mosaic.gpu.profiler.measure),
    after one warm-up call: (median over `iterations` calls of the call's summed kernel times, the calls' lists of
    (kernel name, ms)). The wall clock of one synchronised call adds ~0.2 ms of dispatch and synchronisation."""
    from jax.experimental.mosaic.gpu import profiler

    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    _, per_iter = profiler.measure(jitted, aggregate=False, iterations=iterations)(*args)
    return statistics.median(sum(ms for _, ms in it) for it in per_iter), per_iter


def rel(a, b):
    """Norm-wise relative error |a - b| / |b| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def error_text(e):
    """'Type: message' of an exception, cut to 3000 characters (for the probes' JSON)."""
    return f"{type(e).__name__}: {e}"[:3000]


def record_error(row, key, e):
    """row[key] = error_text(e), and the traceback to stderr: a failing part is recorded and the probe goes on."""
    row[key] = error_text(e)
    traceback.print_exc()


def with_options(options: dict, fn, **values):
    """fn with options[key] = value for each keyword set while it runs and restored after (a kernel module's OPTIONS
    dict is read when a call is traced: jit(with_options(...)) traces with these values on its first call)."""

    def run(*args):
        old = {key: options[key] for key in values}
        options.update(values)
        try:
            return fn(*args)
        finally:
            options.update(old)

    return run


def uniform_lut(rng, b, h, nq, nk, topk):
    """(B, H, Nq, topk) int32: per query block `topk` distinct key blocks drawn uniformly, ascending."""
    lut = np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(b * h * nq)]), axis=-1)
    return jnp.asarray(lut.reshape(b, h, nq, topk), jnp.int32)
