"""Combining the two branches (SPEC section 4): SLA2's learnable ratio alpha, and SLA v1's projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sla2_jax.blocks import expand_blocks

MASS_CLIP = 1e-6


def combine(o_s, o_l, alpha, *, block_q: int):
    """SLA2 combine o = alpha * o_s + (1 - alpha) * o_l, alpha one value per query block.

    Args:
      o_s, o_l: (B, N, H, D).
      alpha: mixing ratio in [0, 1], broadcastable to (B, H, Nq) (a scalar, (H, 1), (H, Nq), (B, H, Nq), ...).
      block_q: query block size, so that row n uses alpha[..., n // block_q].
    Returns:
      o: (B, N, H, D) in o_s.dtype, computed in float32.
    """
    batch, seq_len, heads, _ = o_s.shape
    nq = -(-seq_len // block_q)
    alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (batch, heads, nq))
    a = expand_blocks(alpha, block_q, seq_len)  # (B, N, H, 1)
    out = a * o_s.astype(jnp.float32) + (1.0 - a) * o_l.astype(jnp.float32)
    return out.astype(o_s.dtype)


def alpha_from_mass(mass, weight=1.0, bias=0.0):
    """alpha = sigmoid(w_h * logit(m) + b_h) for m (B, H, Nq) in [0, 1]; w, b scalars or (H,). w=1, b=0 gives m."""
    m = jnp.clip(mass, MASS_CLIP, 1.0 - MASS_CLIP)
    w = jnp.asarray(weight, jnp.float32)
    b = jnp.asarray(bias, jnp.float32)
    if w.ndim == 1:
        w, b = w[:, None], b[:, None]
    return jax.nn.sigmoid(w * jnp.log(m / (1.0 - m)) + b)


def sla_v1_combine(o_s, o_l, proj_kernel, proj_bias):
    """SLA v1: o = o_s + Proj(o_l), Proj a (D, D) linear layer with bias shared by the heads; o_s.dtype."""
    proj = jnp.einsum("bnhd,de->bnhe", o_l.astype(jnp.float32), proj_kernel.astype(jnp.float32)) + proj_bias
    return (o_s.astype(jnp.float32) + proj).astype(o_s.dtype)
