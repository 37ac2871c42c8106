"""Routing: which key blocks each query block attends exactly (SPEC section 2).

Router logits are S_c = (pool(Q) W_q)(pool(K~) W_k)^T / sqrt(D) with K~ = K - mean_N(K). Without W_q/W_k this is
the SLA router (W = identity); the 1/sqrt(D) scale does not change its top-k, and makes the logits usable as
block-level attention logits for the captured-mass estimate behind alpha="mass".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sla2_jax.blocks import block_counts, to_blocks, valid_rows
from sla2_jax.checks import check_block_size, check_weight


def smooth_keys(k):
    """K~ = K - mean over the sequence (B, N, H, D), same dtype; softmax(Q K~^T) equals softmax(Q K^T)."""
    mean = jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True)
    return (k.astype(jnp.float32) - mean).astype(k.dtype)


def pool_blocks(x, block: int):
    """Mean of each block's finite rows: (B, N, H, D) -> (B, H, Nb, D) float32.

    A partial last block averages its valid rows; a row with a NaN or Inf entry is left out of its block's mean (a
    block with no finite row has mean 0), so one non-finite row does not reach the routing, the captured mass and
    alpha of the other rows of its block (as in dense attention, where it damages only its own output row)."""
    blocks = to_blocks(x.astype(jnp.float32), block)  # (B, H, Nb, block, D); rows past N are 0
    finite = jnp.all(jnp.isfinite(blocks), axis=-1, keepdims=True) & valid_rows(x.shape[1], block)[..., None]
    sums = jnp.sum(jnp.where(finite, blocks, 0.0), axis=3)
    return sums / jnp.maximum(jnp.sum(finite, axis=3, dtype=jnp.float32), 1.0)


def _project(pooled, w):
    if w is None:
        return pooled
    w = w.astype(jnp.float32)
    if w.ndim == 2:
        return pooled @ w
    return jnp.einsum("bhnd,hde->bhne", pooled, w)


def block_scores(q, k, *, block_q: int, block_k: int, w_q=None, w_k=None):
    """Router logits between query blocks and key blocks.

    Args:
      q, k: (B, N, H, D).
      block_q, block_k: block sizes (powers of two >= 16).
      w_q, w_k: optional learned (D, D) or (H, D, D) projections of the pooled blocks (SLA2 router).
    Returns:
      (B, H, Nq, Nk) float32 logits (pool(Q) W_q)(pool(K~) W_k)^T / sqrt(D).
    """
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be (B, N, H, D) of equal shape; got {q.shape} and {k.shape}")
    heads, head_dim = q.shape[2], q.shape[3]
    check_weight("w_q", w_q, heads, head_dim)
    check_weight("w_k", w_k, heads, head_dim)
    return scores_from_block_means(pool_blocks(q, block_q), pool_blocks(k, block_k), k.shape[1], block_k,
                                   w_q=w_q, w_k=w_k)


def scores_from_block_means(pq, pk, seq_len: int, block_k: int, *, w_q=None, w_k=None):
    """Router logits from the block means of Q (B, H, Nq, D) and of K (B, H, Nk, D), both float32.

    The keys are smoothed here: pool(K - mean_N K) = pool(K) - mean, and the mean over N is the count-weighted
    mean of the block means (no smoothed copy of K). Returns (B, H, Nq, Nk) float32 (see `block_scores`).
    """
    head_dim = pq.shape[-1]
    counts = block_counts(seq_len, block_k)[:, None]
    mean = jnp.sum(pk * counts, axis=2, keepdims=True) / seq_len
    pq = _project(pq, w_q)
    pk = _project(pk - mean, w_k)
    return jnp.einsum("bhid,bhjd->bhij", pq, pk) * (head_dim ** -0.5)


def topk_blocks(scores, k: int):
    """Hard top-k per row: (B, H, Nq, Nk) scores -> int32 LUT (B, H, Nq, k), ascending key-block ids."""
    num_k = scores.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= num_k:
        raise ValueError(f"k={k!r} must be an int in [1, Nk={num_k}]")
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(scores), k)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def selection_mask(lut, num_k_blocks: int):
    """LUT (B, H, Nq, k) -> float32 block mask (B, H, Nq, Nk), 1 where selected."""
    return jax.nn.one_hot(lut, num_k_blocks, dtype=jnp.float32).sum(axis=-2)


def block_probabilities(scores, seq_len: int, block_k: int):
    """Block-level softmax of the router logits, each key block weighted by its number of valid keys n_j:
    softmax_j(S_c + log n_j), (B, H, Nq, Nk) float32 (a ragged last block counts for fewer keys)."""
    return jax.nn.softmax(scores + jnp.log(block_counts(seq_len, block_k)), axis=-1)


def captured_mass(scores, mask, seq_len: int, block_k: int):
    """Router estimate of the softmax mass kept by the selected blocks, in [0, 1].

    Args: scores (B, H, Nq, Nk) float32; mask (B, H, Nq, Nk) in [0, 1] (hard or soft selection).
    Returns: (B, H, Nq) float32.
    """
    return jnp.sum(block_probabilities(scores, seq_len, block_k) * mask, axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Soft top-k (SLA2 stage 1): M_ij = sigmoid(S_ij / tau + lambda_i) with sum_j M_ij = k, lambda_i by bisection.

_BISECTION_STEPS = 60


def _solve_lambda(z, k: float):
    """lambda per row with sum_j sigmoid(z_j + lambda) = k, by bisection (z: (..., Nk) float32)."""
    lo = -jnp.max(z, axis=-1) - 40.0  # every sigmoid ~ 0
    hi = -jnp.min(z, axis=-1) + 40.0  # every sigmoid ~ 1

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_many = jnp.sum(jax.nn.sigmoid(z + mid[..., None]), axis=-1) > k
        return jnp.where(too_many, lo, mid), jnp.where(too_many, mid, hi)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (lo, hi))
    return 0.5 * (lo + hi)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def soft_topk(scores, k: int, tau: float = 0.1):
    """Differentiable top-k mask: (..., Nk) scores -> (..., Nk) float32 in (0, 1), rows summing to k.

    The gradient is implicit differentiation through lambda: dM_i/dS_j = s_i (delta_ij - s_j / sum_l s_l) with
    s = sigmoid'(.) / tau (per row).
    """
    z = scores.astype(jnp.float32) / tau
    lam = _solve_lambda(jax.lax.stop_gradient(z), float(k))
    return jax.nn.sigmoid(z + lam[..., None])


@soft_topk.defjvp
def _soft_topk_jvp(k, tau, primals, tangents):
    (scores,), (d_scores,) = primals, tangents
    mask = soft_topk(scores, k, tau)
    s = mask * (1.0 - mask) / tau
    d = d_scores.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-30)
    d_mask = s * d - s * jnp.sum(s * d, axis=-1, keepdims=True) / total
    return mask, d_mask

