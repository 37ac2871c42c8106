"""Synthetic attention inputs for demos and benchmarks (never zeros)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_qkv(seed: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype=jnp.bfloat16):
    """Independent standard-normal q, k, v of shape (B, N, H, D)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (batch, seq_len, heads, head_dim), jnp.float32).astype(dtype) for kk in keys)


def structured_qkv(seed: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype=jnp.bfloat16,
                   sharpness: float = 1.2):
    """Video-like q, k, v (B, N, H, D): q and k share a smooth positional code, so each query attends mostly to
    keys near it in the sequence (a few large attention weights, many small ones), plus noise; v is random."""
    kf, kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 4)
    pos = jnp.arange(seq_len, dtype=jnp.float32)[:, None] / seq_len
    freqs = jax.random.normal(kf, (heads, head_dim // 2)) * 40.0
    angles = pos[:, None, :] * freqs[None]  # (N, H, D/2)
    code = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1) * sharpness  # (N, H, D), |code|^2 ~ D
    shape = (batch, seq_len, heads, head_dim)
    q = code + jax.random.normal(kq, shape)
    k = code + jax.random.normal(kk, shape)
    v = jax.random.normal(kv, shape)
    return tuple(x.astype(dtype) for x in (q, k, v))
