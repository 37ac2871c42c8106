"""`sla2_attention`: the functional entry point (routing + both branches + combine)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sla2_jax.blocks import num_blocks
from sla2_jax import backends
from sla2_jax.branches import compute_branches
from sla2_jax.checks import check_alpha, check_block_size, check_qkv, check_weight
from sla2_jax.combine import combine
from sla2_jax.config import SLA2Config
from sla2_jax.routing import (
    block_probabilities,
    block_scores,
    captured_mass,
    soft_topk,
    topk_blocks,
)


def route(q, k, config: SLA2Config, *, w_q=None, w_k=None, soft: bool = False):
    """Router: (lut (B, H, Nq, k) int32, soft mask (B, H, Nq, Nk) or None, captured mass (B, H, Nq) float32).

    Hard routing on the pallas backend runs the Pallas front end (`route_with_features`); the xla/reference
    backends and soft routing run the XLA formulas below (the correctness baseline)."""
    backend = backends.resolve_backend(config.backend, q, k, block_q=config.block_q, block_k=config.block_k,
                                       soft=soft)
    if backend == "pallas":
        lut, mass, _, _ = route_with_features(q, k, config, w_q=w_q, w_k=w_k, feature_map=None)
        return lut, None, mass
    seq_len = q.shape[1]
    scores = block_scores(q, k, block_q=config.block_q, block_k=config.block_k, w_q=w_q, w_k=w_k)
    topk = config.num_selected(scores.shape[-1])
    lut = topk_blocks(scores, topk)
    if soft:
        soft_mask = soft_topk(scores, topk, config.soft_topk_tau)
        return lut, soft_mask, captured_mass(scores, soft_mask, seq_len, config.block_k)
    probs = block_probabilities(scores, seq_len, config.block_k)
    return lut, None, jnp.sum(jnp.take_along_axis(probs, lut, axis=-1), axis=-1)


def route_with_features(q, k, config: SLA2Config, *, w_q=None, w_k=None, feature_map: str | None = None):
    """Hard routing and phi(Q), phi(K) by the Pallas front end: one read of Q and one of K give the feature maps
    and the block means, one kernel selects the blocks from the router logits.

    Same results as `route` (hard) and `feature_map` on the XLA path up to float32 rounding of the block means.
    Returns (lut (B, H, Nq, k) int32 ascending, mass (B, H, Nq) float32, phi(q), phi(k)) with phi in q.dtype
    (None when feature_map is None).
    """
    _check_front_end_args(q, config, w_q, w_k)
    return backends.front_end(q, k, config, w_q=w_q, w_k=w_k, feature_map=feature_map)[:4]


def _check_front_end_args(q, config: SLA2Config, w_q, w_k):
    check_block_size("block_q", config.block_q)
    check_block_size("block_k", config.block_k)
    heads, head_dim = q.shape[2], q.shape[3]
    check_weight("w_q", w_q, heads, head_dim)
    check_weight("w_k", w_k, heads, head_dim)


def sparse_linear_outputs(q, k, v, config: SLA2Config, *, w_q=None, w_k=None, soft: bool = False):
    """Routing and both branches: (o_s, o_l) float32 (B, N, H, D) and the captured mass (B, H, Nq)."""
    backend = backends.resolve_backend(config.backend, q, k, v, block_q=config.block_q, block_k=config.block_k,
                                       soft=soft)
    lut, soft_mask, mass = route(q, k, config.replace(backend=backend), w_q=w_q, w_k=w_k, soft=soft)
    o_s, o_l = compute_branches(
        q,
        k,
        v,
        lut,
        block_q=config.block_q,
        block_k=config.block_k,
        feature_map=config.feature_map,
        linear_scope=config.linear_scope,
        quant=config.quant,
        backend=backend,
        eps=config.eps,
        soft_mask=soft_mask,
        kernel=config.kernel,
    )
    return o_s, o_l, mass


def sla2_output(q, k, v, config: SLA2Config, alpha_fn, *, w_q=None, w_k=None, soft: bool = False):
    """Routing, branches and SLA2 combine; alpha_fn maps the captured mass (B, H, Nq) to alpha (broadcastable
    to (B, H, Nq)). On the pallas backend with hard routing, one fused kernel does the branches and the combine
    (the low-bit kernel when config.quant != "none"). Returns o (B, N, H, D) in q.dtype."""
    backend = backends.resolve_backend(config.backend, q, k, v, block_q=config.block_q, block_k=config.block_k,
                                       soft=soft)
    if backend == "pallas":
        _check_front_end_args(q, config, w_q, w_k)
        # the kernels compute phi(Q), phi(K) from q, k: the front end routes (and makes the low-bit operands)
        lut, mass, key_sums, keys, queries = backends.hard_route(q, k, v, config, w_q=w_q, w_k=w_k)
        alpha = jnp.broadcast_to(alpha_fn(jax.lax.stop_gradient(mass)), mass.shape)
        return backends.fused(q, k, v, None, None, lut, alpha, config, keys=keys, queries=queries,
                              key_sums=key_sums).astype(q.dtype)
    o_s, o_l, mass = sparse_linear_outputs(q, k, v, config.replace(backend=backend), w_q=w_q, w_k=w_k, soft=soft)
    if not soft:
        mass = jax.lax.stop_gradient(mass)
    return combine(o_s, o_l, alpha_fn(mass), block_q=config.block_q).astype(q.dtype)


def sla2_attention(q, k, v, *, config: SLA2Config, w_q=None, w_k=None, alpha=None):
    """SLA2 attention o = alpha * O_sparse + (1 - alpha) * O_linear, usable training-free on any JAX model.

    The functional form has no learned parameters, so no learned alpha: ``config.alpha`` (the granularity of the
    modules' learnable alpha, see `SLA2Attention`) is not read here. alpha=None always means the router's
    captured mass, whatever config.alpha says; pass alpha to set it yourself (e.g. a trained module's values).

    Args:
      q, k, v: (B, N, H, D) of one dtype, bf16/f16/f32, N arbitrary.
      config: `SLA2Config` (block sizes, topk_ratio, feature map, scope, quant, backend; alpha is not used).
      w_q, w_k: optional learned router projections (D, D) or (H, D, D); None = SLA router (identity).
      alpha: optional mixing ratio in [0, 1] broadcastable to (B, H, Nq) (a number or an array; a concrete value
        outside [0, 1] raises ValueError). None: alpha = the softmax mass the router estimates the selected blocks
        capture (the "mass" form with w=1, b=0), which needs no training.
    Returns:
      o: (B, N, H, D) in q.dtype.
    """
    if not isinstance(config, SLA2Config):
        raise ValueError(f"config must be an SLA2Config; got {type(config).__name__}")
    batch, seq_len, heads, dim = check_qkv(q, k, v)
    check_weight("w_q", w_q, heads, dim)
    check_weight("w_k", w_k, heads, dim)
    check_alpha(alpha, batch, heads, num_blocks(seq_len, config.block_q))
    return sla2_output(
        q, k, v, config, (lambda mass: mass) if alpha is None else (lambda mass: alpha), w_q=w_q, w_k=w_k
    )
