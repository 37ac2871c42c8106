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


def lowbit_triton_and_emulated_mosaic(q, k, v, lut, alpha, do, kw, kernel, use_mosaic, monkeypatch):
    """Output and gradients (w.r.t. q, k, v, phi(q), phi(k), alpha) of int8_attention.sla2_fused_attention_lowbit
    (keywords kw) twice: on its Triton forward, then on its Mosaic path with the GPU-only kernel
    (sparse_mosaic._sparse_forward) replaced by `kernel` (an XLA emulation) and int8_attention._use_mosaic by
    `use_mosaic`, so that the Mosaic path runs on any device. Returns ((o, grads) Triton, (o, grads) Mosaic)."""
    from pallas_kernels import int8_attention as ia
    from pallas_kernels import sparse_mosaic as sm

    args = (q, k, v, softmax_phi(q), softmax_phi(k), alpha)

    def run():
        return output_and_grads(lambda *a: ia.sla2_fused_attention_lowbit(*a[:5], lut, a[5], **kw), args, do)

    with ia.options(fwd_kernel="triton"):
        triton = run()
    monkeypatch.setattr(sm, "_sparse_forward", kernel)
    monkeypatch.setattr(ia, "_use_mosaic", use_mosaic)
    with ia.options(fwd_kernel="mosaic", mosaic_q="xla"):
        mosaic = run()
    return triton, mosaic
