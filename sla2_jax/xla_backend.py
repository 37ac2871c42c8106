"""The "xla" backend: both branches in pure JAX with memory linear in N (any device).

Sparse branch: query blocks are processed in chunks (lax.map, rematerialised in the backward pass); each chunk
gathers its selected K/V blocks (B, H, c, k, b_k, D) and runs a masked softmax over them.
Linear branch: per key block h_j = phi(K_j)^T V_j (D x D) and z_j = colsum phi(K_j) in float32, their totals, and
per query block H_i = total - sum_j w_ij h_j ("totals minus selected"), where w is the (hard or soft) selection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sla2_jax import quant as quant_lib
from sla2_jax.blocks import from_blocks, num_blocks, to_blocks, valid_rows

# Largest score tile B * H * c * b_q * k * b_k computed at once (float32 elements; 2**27 = 512 MiB).
_MAX_TILE_ELEMENTS = 2**27


def _gather_blocks(blocks, lut):
    """blocks (B, H, Nk, b_k, D), lut (B, H, c, k) -> (B, H, c, k, b_k, D)."""
    return jax.vmap(jax.vmap(lambda x, idx: x[idx]))(blocks, lut)


def xla_sparse(q, k, v, lut, *, block_q, block_k, scale, sel_bias=None, quant_p=False, chunk_blocks=None):
    """Softmax attention of each query block over its LUT's key blocks.

    Args:
      q, k, v: (B, N, H, D).
      lut: int32 (B, H, Nq, k) key-block ids (no duplicates).
      sel_bias: optional float32 (B, H, Nq, k) added to the logits of each selected block (soft routing).
      quant_p: fake-quantise the unnormalised probabilities to FP8.
      chunk_blocks: query blocks per chunk (default: fit a 512 MiB score tile).
    Returns:
      (B, N, H, D) float32.
    """
    batch, seq_len, heads, dim = q.shape
    nq = num_blocks(seq_len, block_q)
    topk = lut.shape[-1]
    if chunk_blocks is None:
        chunk_blocks = max(1, _MAX_TILE_ELEMENTS // (batch * heads * block_q * topk * block_k))
    chunk_blocks = min(chunk_blocks, nq)
    n_chunks = num_blocks(nq, chunk_blocks)
    pad_q = n_chunks * chunk_blocks - nq

    qb = jnp.pad(to_blocks(q, block_q), ((0, 0), (0, 0), (0, pad_q), (0, 0), (0, 0)))
    lut = jnp.pad(lut, ((0, 0), (0, 0), (0, pad_q), (0, 0)))
    bias = jnp.zeros(lut.shape, jnp.float32) if sel_bias is None else jnp.pad(
        sel_bias.astype(jnp.float32), ((0, 0), (0, 0), (0, pad_q), (0, 0)))
    kb, vb = to_blocks(k, block_k), to_blocks(v, block_k)
    key_valid = valid_rows(seq_len, block_k)  # (Nk, b_k)

    def split(x):  # (B, H, Nq', ...) -> (n_chunks, B, H, c, ...)
        return jnp.moveaxis(x.reshape(batch, heads, n_chunks, chunk_blocks, *x.shape[3:]), 2, 0)

    def attend(args):
        q_c, lut_c, bias_c = args  # (B, H, c, b_q, D), (B, H, c, k), (B, H, c, k)
        k_c, v_c = _gather_blocks(kb, lut_c), _gather_blocks(vb, lut_c)  # (B, H, c, k, b_k, D)
        s = jnp.einsum("bhcqd,bhcktd->bhcqkt", q_c, k_c, preferred_element_type=jnp.float32) * scale
        s = s + bias_c[:, :, :, None, :, None]
        s = jnp.where(key_valid[lut_c][:, :, :, None], s, -jnp.inf)
        s = s.reshape(*s.shape[:4], topk * block_k)
        p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        if quant_p:
            p = quant_lib.fake_quant_probabilities(p)
        v_c = v_c.reshape(*v_c.shape[:3], topk * block_k, dim).astype(jnp.float32)
        return jnp.einsum("bhcqs,bhcsd->bhcqd", p, v_c) / denom

    out = jax.lax.map(jax.checkpoint(attend), (split(qb), split(lut), split(bias)))  # (n, B, H, c, b_q, D)
    out = jnp.moveaxis(out, 0, 2).reshape(batch, heads, n_chunks * chunk_blocks, block_q, dim)[:, :, :nq]
    return from_blocks(out, seq_len)


def key_block_states(k_phi, v, block_k):
    """Per key block h_j = phi(K_j)^T V_j (B, H, Nk, D, D) and z_j = colsum phi(K_j) (B, H, Nk, D), float32.

    Padded key rows (index >= N) are zeroed first: phi of a zero row is not zero.
    """
    seq_len = k_phi.shape[1]
    valid = valid_rows(seq_len, block_k)[:, :, None]
    kb = to_blocks(k_phi.astype(jnp.float32), block_k) * valid
    vb = to_blocks(v.astype(jnp.float32), block_k)
    return jnp.einsum("bhjtd,bhjte->bhjde", kb, vb), kb.sum(axis=3)


def xla_linear(q_phi, k_phi, v, selected, *, block_q, block_k, eps):
    """Linear attention over the key blocks not selected.

    Args:
      q_phi, k_phi, v: (B, N, H, D), feature-mapped q and k.
      selected: (B, H, Nq, Nk) float32 weight of each key block's removal from the totals (one-hot sum of the
        LUT for hard routing, the soft top-k mask for soft routing), or None for linear_scope="all".
    Returns:
      (B, N, H, D) float32: phi(Q_i) H_i / (phi(Q_i) Z_i + eps).
    """
    seq_len = q_phi.shape[1]
    h, z = key_block_states(k_phi, v, block_k)
    h_i, z_i = h.sum(axis=2, keepdims=True), z.sum(axis=2, keepdims=True)  # totals, (B, H, 1, ...)
    if selected is not None:
        h_i = h_i - jnp.einsum("bhij,bhjde->bhide", selected, h)
        z_i = z_i - jnp.einsum("bhij,bhjd->bhid", selected, z)
    qb = to_blocks(q_phi.astype(jnp.float32), block_q)  # (B, H, Nq, b_q, D)
    num = jnp.einsum("bhiqd,bhide->bhiqe", qb, jnp.broadcast_to(h_i, (*qb.shape[:3], *h_i.shape[3:])))
    den = jnp.einsum("bhiqd,bhid->bhiq", qb, jnp.broadcast_to(z_i, (*qb.shape[:3], z_i.shape[-1])))
    return from_blocks(num / (den[..., None] + eps), seq_len)
