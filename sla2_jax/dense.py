"""Exact softmax attention, the reference every backend is held to."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sla2_jax.blocks import num_blocks
from sla2_jax.checks import check_qkv

# Largest score tile (elements of B * H * chunk * N) computed at once; 2**28 float32 = 1 GiB.
_MAX_SCORE_ELEMENTS = 2**28


def _attend_chunk(q_chunk, k, v, scale):
    """q_chunk (B, c, H, D), k/v (B, N, H, D) -> (B, c, H, D) float32."""
    hi = jax.lax.Precision.HIGHEST  # no TF32 on GPU: this is the float32 reference
    s = jnp.einsum("bqhd,bkhd->bhqk", q_chunk, k, preferred_element_type=jnp.float32, precision=hi) * scale
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32), precision=hi)


def dense_attention(q, k, v, *, scale=None, chunk_size=None):
    """Exact softmax attention softmax(q k^T * scale) v with float32 accumulation.

    Args:
      q, k, v: (B, N, H, D) arrays of equal shape, bf16/f16/f32.
      scale: logit scale, default 1/sqrt(D).
      chunk_size: query rows per chunk; by default chosen so a score tile is <= 1 GiB of float32, which lets
        N = 32760 (and 75600) run on one GPU. Chunks are rematerialised in the backward pass.
    Returns:
      o: (B, N, H, D) in q.dtype.
    """
    batch, seq_len, heads, head_dim = check_qkv(q, k, v)
    scale = head_dim ** -0.5 if scale is None else scale
    if chunk_size is None:
        chunk_size = max(16, _MAX_SCORE_ELEMENTS // (batch * heads * seq_len))
    if chunk_size >= seq_len:
        return _attend_chunk(q, k, v, scale).astype(q.dtype)
    n_chunks = num_blocks(seq_len, chunk_size)
    q_pad = jnp.pad(q, ((0, 0), (0, n_chunks * chunk_size - seq_len), (0, 0), (0, 0)))
    q_chunks = jnp.moveaxis(q_pad.reshape(batch, n_chunks, chunk_size, heads, head_dim), 1, 0)
    attend = jax.checkpoint(lambda qc: _attend_chunk(qc, k, v, scale))
    out = jax.lax.map(attend, q_chunks)  # (n_chunks, B, c, H, D)
    out = jnp.moveaxis(out, 0, 1).reshape(batch, n_chunks * chunk_size, heads, head_dim)
    return out[:, :seq_len].astype(q.dtype)
