"""Shared test helpers: fresh random inputs, relative errors, the softmax feature map, outputs with gradients, a
kernel lowered for CUDA."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np


def fresh_seed() -> int:
    """A new random seed per call (os.urandom): each run checks other inputs; failures print it."""
    return int.from_bytes(os.urandom(4), "little")


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def softmax_phi(x):
    """The default feature map phi (softmax over the head dim, in float32), in x's dtype."""
    return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def output_and_grads(fn, args, do, jit=False):
    """(fn(*args), the gradients of sum(fn(*args) * do) in float32 w.r.t. every argument). jit=True: each of the two
    runs as one jitted program instead of op by op (a fraction of the compile time; the same values to rounding, so
    only where no routing happens inside fn, whose top-k could flip on a near-tie)."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * do)  # noqa: E731
    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    if jit:
        fn, grad = jax.jit(fn), jax.jit(grad)
    return fn(*args), grad(*args)


def lowered_for_cuda(fn, *args) -> str:
    """The text of jit(fn)(*args) lowered for CUDA on any host: how the CPU tests check the GPU-only Mosaic kernels
    (Mosaic GPU's Python lowering runs here; compiling and running need a GPU)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def random_qkv(seed, shape, dtype=jnp.float32):
    """Fresh normal q, k, v of shape (B, N, H, D); k gets a common offset so smoothing matters."""
    kq, kk, kv, ko = jax.random.split(jax.random.PRNGKey(seed), 4)
    size = math.prod(shape)  # flat draws: XLA:CPU compiles a flat normal much faster than a 4-D one
    q = jax.random.normal(kq, (size,)).reshape(shape)
    k = jax.random.normal(kk, (size,)).reshape(shape) + 0.5 * jax.random.normal(ko, shape[-1:])
    v = jax.random.normal(kv, (size,)).reshape(shape)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def lowbit_triton_and_emulated_mosaic(q, k, v, lut, alpha, do, kw, kernel, monkeypatch):
    """Output and gradients (w.r.t. q, k, v, phi(q), phi(k), alpha) of pallas_kernels.sla2_fused_attention_lowbit
    (keywords kw) twice: with KernelConfig(forward="triton"), then with KernelConfig(forward="mosaic") and the
    GPU-only kernel (mosaic_forward._sparse_forward) replaced by `kernel` (an XLA emulation), so that the Mosaic
    path runs on any device. Returns ((o, grads) Triton, (o, grads) Mosaic)."""
    from pallas_kernels import KernelConfig, mosaic_forward, sla2_fused_attention_lowbit

    args = (q, k, v, softmax_phi(q), softmax_phi(k), alpha)

    def run(config):
        fn = lambda *a: sla2_fused_attention_lowbit(*a[:5], lut, a[5], config=config, **kw)  # noqa: E731
        return output_and_grads(fn, args, do, jit=True)  # the LUT is given: no routing inside

    triton = run(KernelConfig(forward="triton"))
    monkeypatch.setattr(mosaic_forward, "_sparse_forward", kernel)
    return triton, run(KernelConfig(forward="mosaic"))
