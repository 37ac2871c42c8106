"""Dense, token-level float32 reference of the SLA branches (small N only: it builds N x N masks).

Used by the tests and by experiments/dev/check_kernels_gpu.py; independent of the kernels' algebra.
"""

from __future__ import annotations

import jax.numpy as jnp


def token_mask(lut, n, block_q, block_k):
    """(B, H, N, N) bool: query token attends key token exactly (block selected by the LUT, key < N)."""
    b, h, nq, _ = lut.shape
    nk = -(-n // block_k)
    sel = jnp.zeros((b, h, nq, nk), jnp.bool_)
    sel = sel.at[
        jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None], jnp.arange(nq)[None, None, :, None], lut
    ].set(True)
    return jnp.repeat(jnp.repeat(sel, block_q, axis=2), block_k, axis=3)[:, :, :n, :n]


def reference_branches(
    q, k, v, q_phi, k_phi, lut, *, block_q=128, block_k=64, linear_scope="complement", sm_scale=None, eps=1e-6
):
    """(o_s, o_l) in float32, computed densely with token-level masks."""
    n, d = q.shape[1], q.shape[3]
    f32 = lambda x: x.astype(jnp.float32)
    q, k, v, q_phi, k_phi = map(f32, (q, k, v, q_phi, k_phi))
    scale = d**-0.5 if sm_scale is None else sm_scale
    mask = token_mask(lut, n, block_q, block_k)
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale
    s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    o_s = jnp.einsum("bhnm,bmhd->bnhd", p, v)
    lin = (~mask) if linear_scope == "complement" else jnp.ones_like(mask)
    a = jnp.einsum("bnhd,bmhd->bhnm", q_phi, k_phi) * lin
    num = jnp.einsum("bhnm,bmhd->bnhd", a, v)
    den = jnp.swapaxes(jnp.sum(a, axis=-1), 1, 2)[..., None] + eps
    o_l = num / den
    if linear_scope == "complement" and lut.shape[-1] == -(-n // block_k):
        o_l = jnp.zeros_like(o_l)
    return o_s, o_l


def reference_fused(q, k, v, q_phi, k_phi, lut, alpha, *, block_q=128, block_k=64, **kw):
    """alpha * o_s + (1 - alpha) * o_l with alpha (B, H, Nq) broadcast over each block's rows."""
    n = q.shape[1]
    o_s, o_l = reference_branches(q, k, v, q_phi, k_phi, lut, block_q=block_q, block_k=block_k, **kw)
    a = jnp.repeat(alpha.astype(jnp.float32), block_q, axis=-1)[:, :, :n]  # (B, H, N)
    a = jnp.swapaxes(a, 1, 2)[..., None]
    return a * o_s + (1.0 - a) * o_l
