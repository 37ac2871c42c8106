"""Shared test helpers: fresh random inputs, relative errors, the softmax feature map, outputs with gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def softmax_phi(x):
    """The default feature map phi (softmax over the head dim, in float32), in x's dtype."""
    return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def output_and_grads(fn, args, do):
    """(fn(*args), the gradients of sum(fn(*args) * do) in float32 w.r.t. every argument)."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * do)  # noqa: E731
    return fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def random_qkv(seed, shape, dtype=jnp.float32):
    """Fresh normal q, k, v of shape (B, N, H, D); k gets a common offset so smoothing matters."""
    kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(seed), 4)
    size = math.prod(shape)  # flat draws: XLA:CPU compiles a flat normal much faster than a 4-D one
    q = jax.random.normal(kq, (size,)).reshape(shape)
    k = jax.random.normal(kk, (size,)).reshape(shape) + 0.5 * jax.random.normal(ko, shape[-1:])
    v = jax.random.normal(kv, (size,)).reshape(shape)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
