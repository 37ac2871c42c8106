"""`sparse_linear_branches`: the sparse (exact softmax) and linear branches for a given LUT, on any backend."""

from __future__ import annotations

import jax.numpy as jnp

from sla2_jax import backends, reference, xla_backend
from sla2_jax import quant as quant_lib
from sla2_jax.blocks import num_blocks
from sla2_jax.checks import check_block_size, check_lut, check_qkv
from sla2_jax.config import FEATURE_MAPS, LINEAR_SCOPES, QUANT_MODES
from sla2_jax.feature_maps import feature_map as apply_feature_map
from sla2_jax.routing import selection_mask, smooth_keys

EPS = 1e-6


def quantize_sparse_inputs(q, k, v, *, quant: str, block_q: int, block_k: int):
    """Fake-quantised (straight-through) inputs of the sparse branch: Q and smoothed K in INT8 per block,
    and for "int8_fp8" V in FP8 per channel. Returns (q, k, v), same shapes and dtypes."""
    if quant == "none":
        return q, k, v
    q = quant_lib.fake_quant_int8_blocks(q, block_q)
    k = quant_lib.fake_quant_int8_blocks(smooth_keys(k), block_k)
    if quant == "int8_fp8":
        v = quant_lib.fake_quant_fp8_channels(v)
    return q, k, v


def compute_branches(q, k, v, lut, *, block_q, block_k, feature_map, linear_scope, quant, backend,
                     scale=None, eps=EPS, soft_mask=None, kernel=None):
    """Shared worker of `sparse_linear_branches` and the modules (no validation; backend already resolved).

    soft_mask: optional (B, H, Nq, Nk) soft top-k mask (router training). The sparse branch then attends the
      LUT's blocks with log(mask) added to their logits and the linear branch removes mask-weighted blocks from
      the totals. Only the "xla" and "reference" backends support it.
    kernel: the pallas backend's KernelConfig (None: heuristics).
    Returns (o_s, o_l), (B, N, H, D) float32.
    """
    seq_len, dim = q.shape[1], q.shape[3]
    scale = dim ** -0.5 if scale is None else scale
    nk = num_blocks(seq_len, block_k)
    q_phi, k_phi = apply_feature_map(q, feature_map), apply_feature_map(k, feature_map)
    nothing_left = linear_scope == "complement" and soft_mask is None and lut.shape[-1] == nk

    if backend == "pallas":
        if soft_mask is not None:
            raise ValueError("soft routing is not supported by backend='pallas'; use 'xla' or 'reference'")
        o_s, o_l = backends.branches(q, k, v, q_phi, k_phi, lut, block_q=block_q, block_k=block_k,
                                     linear_scope=linear_scope, quant=quant, scale=scale, eps=eps, kernel=kernel)
        return o_s.astype(jnp.float32), o_l.astype(jnp.float32)

    hard = selection_mask(lut, nk)
    selected = hard if soft_mask is None else soft_mask
    sel_bias = None
    if soft_mask is not None:
        sel_bias = jnp.log(jnp.maximum(jnp.take_along_axis(soft_mask, lut, axis=-1), 1e-30))

    def sparse(q_, k_, v_, quant_p=False):
        if backend == "reference":
            weights = hard if soft_mask is None else hard * soft_mask
            return reference.reference_sparse(q_, k_, v_, weights, block_q=block_q, block_k=block_k,
                                              scale=scale, quant_p=quant_p)
        return xla_backend.xla_sparse(q_, k_, v_, lut, block_q=block_q, block_k=block_k, scale=scale,
                                      sel_bias=sel_bias, quant_p=quant_p)

    o_s = sparse(q, k, v)
    if quant != "none":
        # Straight-through at the branch level: the forward pass is the low-bit result, the backward pass the
        # full-precision gradient from the original q, k, v (SPEC section 5).
        q_s, k_s, v_s = quantize_sparse_inputs(q, k, v, quant=quant, block_q=block_q, block_k=block_k)
        o_s = quant_lib.straight_through(o_s, sparse(q_s, k_s, v_s, quant == "int8_fp8"))

    if nothing_left:
        o_l = jnp.zeros(q.shape, jnp.float32)  # every block selected: nothing left for the linear branch
    elif backend == "reference":
        unselected = jnp.ones_like(hard) if linear_scope == "all" else 1.0 - selected
        o_l = reference.reference_linear(q_phi, k_phi, v, unselected, block_q=block_q, block_k=block_k, eps=eps)
    else:
        o_l = xla_backend.xla_linear(q_phi, k_phi, v, None if linear_scope == "all" else selected,
                                     block_q=block_q, block_k=block_k, eps=eps)
    return o_s, o_l


def sparse_linear_branches(q, k, v, lut, *, block_q=128, block_k=64, feature_map="softmax",
                           linear_scope="complement", quant="none", backend="auto", scale=None, eps=EPS):
    """The two SLA branches for a given routing.

    Args:
      q, k, v: (B, N, H, D), bf16/f16/f32, N arbitrary.
      lut: int32 (B, H, Nq, k), ascending key-block ids without duplicates (see `topk_blocks`).
      block_q, block_k: block sizes (powers of two >= 16).
      feature_map: "softmax" | "elu" | "relu" (phi of the linear branch).
      linear_scope: "complement" (unselected blocks) | "all" (all keys).
      quant: "none" | "int8" | "int8_fp8": low-bit sparse branch (fake quantisation, straight-through).
      backend: "auto" | "pallas" | "xla" | "reference".
      scale: logit scale, default 1/sqrt(D).
    Returns:
      (o_s, o_l): sparse-branch and linear-branch outputs, (B, N, H, D) in q.dtype.
    """
    batch, seq_len, heads, _ = check_qkv(q, k, v)
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    for name, value, choices in (("feature_map", feature_map, FEATURE_MAPS),
                                 ("linear_scope", linear_scope, LINEAR_SCOPES), ("quant", quant, QUANT_MODES)):
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {choices}")
    check_lut(lut, batch, heads, num_blocks(seq_len, block_q), num_blocks(seq_len, block_k))
    o_s, o_l = compute_branches(q, k, v, lut.astype(jnp.int32), block_q=block_q, block_k=block_k,
                                feature_map=feature_map, linear_scope=linear_scope, quant=quant,
                                backend=backends.resolve_backend(backend, q, k, v, block_q=block_q, block_k=block_k),
                                scale=scale, eps=eps)
    return o_s.astype(q.dtype), o_l.astype(q.dtype)
