"""Soft routing in which every key block is reachable: the router-training form of SLA2 (stage 1) with dense
masked attention.

With the soft top-k mask M (B, H, Nq, Nk) (rows sum to k, `soft_topk`), the sparse branch attends EVERY key,
each key's logit shifted by log M of its (query block, key block) pair:

    O_s = softmax_j(q_i k_j^T * scale + log M[block(i), block(j)]) V        (over all N keys)
    O_l = phi(q_i) H_i / (phi(q_i) Z_i + eps),  H_i = sum_j (1 - M_ij) phi(K_j)^T V_j,  Z_i likewise
          ("complement"; "all" uses every key with weight 1)
    O   = alpha * O_s + (1 - alpha) * O_l

so the loss sees what attending an unselected block exactly would give, and its gradient reaches the router's
logit of that block through M. At M = the hard 0/1 mask this is exactly the hard-routed SLA2 output. The cost is
that of dense attention (O(N^2 D) per head, memory b_q x N per query block thanks to a rematerialised loop over
query blocks): meant for stage 1 on captured Q/K/V, not for inference.

With straight_through=True (`SLA2Attention.routing == "soft_dense_st"`) the forward pass uses the hard top-k
mask, so it computes exactly the hard-routed output that inference uses, while the backward pass takes the soft
mask's gradient: the sparse branch weights keys by M (not log M in the exponent), so a block with M = 0 still gets
the finite gradient of adding it. The soft forward of "soft_dense" trains alpha and the router against an output
that inference never computes; the straight-through form does not.

The other soft form (`SLA2Attention.routing == "soft"`) attends only the hard top-k blocks with log M added to
their logits; there the sparse branch carries no gradient to an unselected block's mask entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sla2_jax.blocks import num_blocks, to_blocks
from sla2_jax.combine import combine
from sla2_jax.config import SLA2Config
from sla2_jax.feature_maps import feature_map as apply_feature_map
from sla2_jax.routing import block_scores, captured_mass, soft_topk, topk_blocks

_LOG_FLOOR = 1e-30  # M below this counts as log(1e-30) = -69 (exp of it is 0 in float32 next to any kept key)


def soft_dense_sparse_branch(q, k, v, soft_mask, *, block_q: int, block_k: int, scale=None):
    """Sparse branch over all keys with the block mask as a multiplicative weight.

    Args:
      q, k, v: (B, N, H, D), any float dtype (computed in float32).
      soft_mask: (B, H, Nq, Nk) in [0, 1] (soft or hard block mask).
      block_q, block_k: block sizes; N need not be a multiple of either.
      scale: logit scale, default 1/sqrt(D).
    Returns:
      o_s: (B, N, H, D) float32, softmax_j(q k^T scale + log M) V over the N keys.
    """
    batch, seq_len, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    nq = num_blocks(seq_len, block_q)
    kf = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # (B, H, N, D)
    vf = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    key_block = jnp.arange(seq_len) // block_k  # (N,)
    log_m = jnp.log(jnp.maximum(soft_mask.astype(jnp.float32), _LOG_FLOOR))  # (B, H, Nq, Nk)
    qb = to_blocks(q.astype(jnp.float32), block_q).transpose(2, 0, 1, 3, 4)  # (Nq, B, H, b_q, D)
    log_mb = jnp.moveaxis(log_m, 2, 0)  # (Nq, B, H, Nk)

    mb = jnp.moveaxis(soft_mask.astype(jnp.float32), 2, 0)  # (Nq, B, H, Nk)

    @jax.checkpoint
    def one_block(args):  # (B, H, b_q, D), (B, H, Nk), (B, H, Nk) -> (B, H, b_q, D)
        # p_ij = M_ij exp(s_ij) / sum_l M_il exp(s_il), written with M as a weight (not log M in the exponent) so
        # that an entry M_ij = 0 (a hard mask, or the straight-through forward) still has the finite gradient
        # exp(s_ij - m) (v_j - o_i) / Z; m (the row max of s + log M) only keeps the exponentials in range.
        qi, lm, m = args
        s = jnp.einsum("bhqd,bhnd->bhqn", qi, kf) * scale
        shift = jax.lax.stop_gradient(jnp.max(s + lm[..., key_block][:, :, None, :], axis=-1, keepdims=True))
        w = m[..., key_block][:, :, None, :] * jnp.exp(s - shift)
        return jnp.einsum("bhqn,bhnd->bhqd", w, vf) / jnp.sum(w, axis=-1, keepdims=True)

    out = jax.lax.map(one_block, (qb, log_mb, mb))  # (Nq, B, H, b_q, D)
    out = out.transpose(1, 0, 3, 2, 4).reshape(batch, nq * block_q, heads, dim)
    return out[:, :seq_len]


def soft_linear_branch(q, k, v, soft_mask, *, block_q: int, block_k: int, feature_map: str = "softmax",
                       linear_scope: str = "complement", eps: float = 1e-6):
    """Linear branch with the key blocks weighted by 1 - M ("complement") or 1 ("all").

    Args:
      q, k, v: (B, N, H, D); soft_mask: (B, H, Nq, Nk) in [0, 1].
    Returns:
      o_l: (B, N, H, D) float32, phi(q_i) H_i / (phi(q_i) Z_i + eps) with H_i = sum_j w_ij phi(K_j)^T V_j,
      Z_i = sum_j w_ij colsum(phi(K_j)), w = 1 - M or 1. Padded key rows (N not a multiple of b_k) count zero.
    """
    seq_len = q.shape[1]
    q_phi = to_blocks(apply_feature_map(q, feature_map).astype(jnp.float32), block_q)  # (B, H, Nq, b_q, D)
    valid = (jnp.arange(num_blocks(seq_len, block_k) * block_k) < seq_len).reshape(-1, block_k)  # (Nk, b_k)
    k_phi = to_blocks(apply_feature_map(k, feature_map).astype(jnp.float32), block_k) * valid[:, :, None]
    vb = to_blocks(v.astype(jnp.float32), block_k)
    h = jnp.einsum("bhjkd,bhjke->bhjde", k_phi, vb)  # (B, H, Nk, D, D)
    z = k_phi.sum(axis=3)  # (B, H, Nk, D)
    weight = jnp.ones_like(soft_mask) if linear_scope == "all" else 1.0 - soft_mask.astype(jnp.float32)
    h_i = jnp.einsum("bhij,bhjde->bhide", weight, h)  # (B, H, Nq, D, D)
    z_i = jnp.einsum("bhij,bhjd->bhid", weight, z)  # (B, H, Nq, D)
    num = jnp.einsum("bhiqd,bhide->bhiqe", q_phi, h_i)
    den = jnp.einsum("bhiqd,bhid->bhiq", q_phi, z_i)[..., None]
    o = num / (den + eps)  # (B, H, Nq, b_q, D)
    batch, heads, nq, bq, dim = o.shape
    return o.transpose(0, 2, 3, 1, 4).reshape(batch, nq * bq, heads, dim)[:, :seq_len]


def soft_dense_attention(q, k, v, config: SLA2Config, alpha_fn, *, w_q=None, w_k=None, scale=None,
                         straight_through: bool = False):
    """SLA2 output with soft routing over every key block (router training).

    Args:
      q, k, v: (B, N, H, D).
      config: SLA2Config (block sizes, topk_ratio, feature_map, linear_scope, soft_topk_tau, eps; quant and
        backend are not used: this is plain float32 XLA).
      alpha_fn: maps the soft captured mass (B, H, Nq) to alpha, broadcastable to (B, H, Nq).
      w_q, w_k: router projections (D, D) or (H, D, D), or None (SLA's router).
      straight_through: the forward pass uses the hard top-k mask (so it is the hard-routed output that
        inference computes), the backward pass the soft mask's gradient (every key block still reachable).
    Returns:
      o: (B, N, H, D) in q.dtype.
    """
    seq_len = q.shape[1]
    scores = block_scores(q, k, block_q=config.block_q, block_k=config.block_k, w_q=w_q, w_k=w_k)
    topk = config.num_selected(scores.shape[-1])
    mask = soft_topk(scores, topk, config.soft_topk_tau)
    if straight_through:
        hard = jax.nn.one_hot(topk_blocks(scores, topk), scores.shape[-1], dtype=jnp.float32).sum(-2)
        mask = hard + mask - jax.lax.stop_gradient(mask)
    o_s = soft_dense_sparse_branch(q, k, v, mask, block_q=config.block_q, block_k=config.block_k, scale=scale)
    o_l = soft_linear_branch(q, k, v, mask, block_q=config.block_q, block_k=config.block_k,
                             feature_map=config.feature_map, linear_scope=config.linear_scope, eps=config.eps)
    alpha = alpha_fn(captured_mass(scores, mask, seq_len, config.block_k))
    return combine(o_s, o_l, alpha, block_q=config.block_q).astype(q.dtype)

