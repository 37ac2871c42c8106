"""Shared test helpers: fresh random inputs and relative errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def random_qkv(seed, shape, dtype=jnp.float32):
    """Fresh normal q, k, v of shape (B, N, H, D); k gets a common offset so smoothing matters."""
    kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(seed), 4)
    size = math.prod(shape)  # flat draws: XLA:CPU compiles a flat normal much faster than a 4-D one
    q = jax.random.normal(kq, (size,)).reshape(shape)
    k = jax.random.normal(kk, (size,)).reshape(shape) + 0.5 * jax.random.normal(ko, shape[-1:])
    v = jax.random.normal(kv, (size,)).reshape(shape)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
