"""The "reference" backend: both branches with dense N x N token masks (small N, tests only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sla2_jax import quant as quant_lib


def token_mask(block_mask, seq_len: int, block_q: int, block_k: int):
    """(B, H, Nq, Nk) block values -> (B, H, N, N) token values."""
    rows = jnp.arange(seq_len) // block_q
    cols = jnp.arange(seq_len) // block_k
    return block_mask[:, :, rows][:, :, :, cols]


def reference_sparse(q, k, v, selected, *, block_q, block_k, scale, quant_p=False):
    """Softmax attention over the selected blocks.

    selected: (B, H, Nq, Nk) float32 block weights; 0 = not attended, w > 0 adds log(w) to the logits
      (1 for hard routing). Returns (B, N, H, D) float32.
    """
    seq_len = q.shape[1]
    weights = token_mask(selected, seq_len, block_q, block_k)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = jnp.where(weights > 0, s + jnp.log(jnp.where(weights > 0, weights, 1.0)), -jnp.inf)
    p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if quant_p:
        p = quant_lib.fake_quant_probabilities(p)
    return jnp.einsum("bhqk,bkhd->bqhd", p / denom, v.astype(jnp.float32))


def reference_linear(q_phi, k_phi, v, unselected, *, block_q, block_k, eps):
    """Linear attention phi(Q) (phi(K)^T V) / (phi(Q) colsum(phi(K)) + eps) over weighted key blocks.

    unselected: (B, H, Nq, Nk) float32 weight of each key block in the linear branch. Returns (B, N, H, D) float32.
    """
    seq_len = q_phi.shape[1]
    weights = token_mask(unselected, seq_len, block_q, block_k)
    a = jnp.einsum("bqhd,bkhd->bhqk", q_phi.astype(jnp.float32), k_phi.astype(jnp.float32)) * weights
    num = jnp.einsum("bhqk,bkhd->bqhd", a, v.astype(jnp.float32))
    den = jnp.moveaxis(jnp.sum(a, axis=-1), 1, 2)[..., None]  # (B, N, H, 1)
    return num / (den + eps)

