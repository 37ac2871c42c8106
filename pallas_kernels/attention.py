"""The kernels' dispatcher: which kernel runs each stage (from the call's KernelConfig), the plumbing of their inputs
and outputs, the custom_vjp of each precision family, and the public entry points.

  forward  (bf16/f16/f32)  linear states (linear_states.py), then the Mosaic forward (mosaic_forward.py: sparse loop,
                           linear branch and combine in one kernel) or the Triton forward (triton_forward.py)
  forward  (low bit)       the same with INT8 scores (and FP8 P V for "int8_fp8"); quantised operands from the
                           front end, or a pre-pass (quantize.py)
  backward (both)          dQ and the per-row terms (Mosaic dQ + a small Triton kernel, or one Triton kernel), the
                           linear gradient states, dK/dV (Mosaic dK/dV + a small Triton kernel, or one Triton
                           kernel); straight-through for the low-bit forward: the same backward from the original
                           q, k, v and the low-bit forward's LSE.

Without phi arrays (``sla2_fused_attention(q, k, v, None, None, lut, alpha, feature_map=phi)``, the library's
path without low bit): phi(K) in the states kernel, phi(Q) in the Mosaic epilogue; in the backward phi(Q) in the
gradient states' sums kernel, phi(K) in the dK/dV kernels, phi's vjp in the Mosaic dQ and dK/dV kernels' epilogues
(KernelConfig.phi_vjp; elsewhere one front-end pass per tensor, front_end.feature_map_vjp).

Each stage is a separate function (``forward``, ``backward_dq``, ``backward_states``, ``backward_dkv``) so that the
developer probes can time it alone. Given phi arrays, the phi Jacobian is left to JAX autodiff around these
functions, as are alpha's parametrisation and the router.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import linear_states, mosaic_dkv, mosaic_dq, mosaic_forward
from ._triton import pl
from .common import (
    F32,
    KernelCall,
    Residuals,
    checked_alpha,
    full_spec,
    pallas_triton_call,
    row_spec,
    rows_per_step,
    seq_spec,
    validate_call,
    written_phi_vjp,
)
from .front_end import feature_map_rows, feature_map_vjp
from .linear_states import forward_states, gradient_selection, gradient_states, transpose_lut
from .quantize import QUANT_MODES, Quantised, QuantisedKeys, prequantize, quantize_values_fp8
from .triton_backward import dkv_kernel, dkv_linear_kernel, dq_kernel, dq_linear_kernel
from .triton_forward import fwd_kernel, linear_epilogue_kernel, lowbit_fwd_kernel


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
def linear_inputs(q_phi, k_phi, v, lut, cfg: KernelCall, phi=None, key_sums=None):
    """The forward kernels' linear-branch inputs and the states kept as residuals: ([(name, array, BlockSpec)], h, z)
    with h, z from linear_states.forward_states (per query block for the complement scope, else the totals);
    ([], None, None) without a linear branch. phi: None, or the feature map: then k_phi is K (phi applied in the
    states kernel) and q_phi may be None (phi(Q) in the Mosaic epilogue). key_sums: the sums of phi(K), V if
    already made (linear_states.key_block_sums), else None."""
    if not cfg.linear:
        return [], None, None
    d = cfg.d
    h, z = forward_states(k_phi, v, lut, cfg, phi, key_sums)
    if cfg.track_lin:
        h_spec = pl.BlockSpec((None, None, None, d, d), lambda i, hh, bb: (bb, hh, i, 0, 0))
        z_spec = pl.BlockSpec((None, None, None, d), lambda i, hh, bb: (bb, hh, i, 0))
    else:
        h_spec, z_spec = full_spec(d, d), full_spec(d)
    return [("q_phi", q_phi, seq_spec(cfg)), ("h_lin", h, h_spec), ("z_lin", z, z_spec)], h, z


def forward_linear_inputs(q, k, v, q_phi, k_phi, lut, cfg: KernelCall, phi, key_sums, epilogue_applies_phi):
    """linear_inputs of a forward kernel. phi None: from the phi arrays q_phi, k_phi. Else (no phi arrays): the
    states from K by phi (or from key_sums), and phi(Q) left to the Mosaic epilogue where epilogue_applies_phi(named
    linear inputs) says it runs there, else a phi(Q) array made here (feature_map_rows: the Triton epilogue and the
    Triton forward read one)."""
    if phi is None:
        return linear_inputs(q_phi, k_phi, v, lut, cfg)
    linear, h_lin, z_lin = linear_inputs(None, k, v, lut, cfg, phi, key_sums)
    if linear and not epilogue_applies_phi({name: x for name, x, _ in linear}):
        q_phi = feature_map_rows(q, phi, interpret=cfg.interpret)
        linear = [(name, q_phi if name == "q_phi" else x, spec) for name, x, spec in linear]
    return linear, h_lin, z_lin


def forward_outputs(q, cfg: KernelCall, *, fused: bool, residuals: bool):
    """(name, shape struct, BlockSpec) of the forward kernels' outputs: o (fused) and/or o_s, o_l, and the
    residuals LSE and den the backward needs. Shared by the bf16 and low-bit forward kernels."""
    b, _, h, _ = q.shape
    seq, rows = seq_spec(cfg), row_spec(cfg)
    o_struct = jax.ShapeDtypeStruct(q.shape, q.dtype)
    row_struct = jax.ShapeDtypeStruct((b, h, cfg.npad), F32)
    outputs = []
    if fused:
        outputs.append(("o", o_struct, seq))
    if not fused or residuals:
        outputs.append(("o_s", o_struct, seq))
        if cfg.linear:
            outputs.append(("o_l", o_struct, seq))
    if residuals:
        outputs.append(("lse", row_struct, rows))
        if cfg.linear:
            outputs.append(("den", row_struct, rows))
    return outputs


def mosaic_epilogue_args(q, alpha, named_inputs: dict, cfg: KernelCall, *, fused: bool, residuals: bool, phi=None):
    """(mosaic_forward.LinearInputs, {"outputs", "stages", "config"}) of a Mosaic forward with the linear epilogue (bf16 and
    INT8 kernels alike), from _linear_inputs' named arrays: the outputs forward_outputs asks for, and the ring depth
    (the Q or phi(Q) tiles hold two outputs; a third goes through a finished V slot of the ring,
    mosaic_forward.ring_holds_outputs, or else needs the room of one K/V ring slot). q_phi None: phi(Q) from the
    kernel's Q tile by phi."""
    outputs = tuple(x[0] for x in forward_outputs(q, cfg, fused=fused, residuals=residuals))
    tiles = sum(x in ("o", "o_s", "o_l") for x in outputs)
    h, z = named_inputs["h_lin"], named_inputs["z_lin"]
    if not cfg.track_lin:  # scope "all": the totals (B, H, D, D) f32 as one bf16 state shared by the query blocks
        h, z = h.astype(jnp.bfloat16)[:, :, None], z[:, :, None]
    linear = mosaic_forward.LinearInputs(named_inputs["q_phi"], h, z, alpha if fused else None, cfg.eps, phi)
    stages = 4 if tiles <= 2 or mosaic_forward.ring_holds_outputs(cfg.block_k, 4, cfg.config) else 3
    return linear, {"outputs": outputs, "stages": stages, "config": cfg.config}


def uses_mosaic_epilogue(named_inputs: dict, cfg: KernelCall, dtype) -> bool:
    """The linear branch runs in the Mosaic forward's epilogue: KernelConfig.epilogue "mosaic" and bf16 states:
    the complement's per-block H_i (B, H, Nq, D, D) in bf16 (KernelConfig.state_dtype; float32 states need the hi +
    lo products of the Triton epilogue), or for scope "all" the shared totals, rounded to bf16 when state_dtype is
    "bfloat16" (one (D, D) state per (batch, head): no per-block states at all). dtype: the inputs' dtype."""
    h = named_inputs.get("h_lin")
    if cfg.config.epilogue != "mosaic" or h is None:
        return False
    if cfg.track_lin:
        return h.ndim == 5 and jnp.dtype(h.dtype) == jnp.dtype(jnp.bfloat16)
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return sixteen_bit and cfg.config.state_dtype == "bfloat16"


def linear_epilogue(q, o_s, lse, alpha, linear_inputs, cfg: KernelCall, *, fused: bool, residuals: bool):
    """The forward's outputs (dict, as _forward) from a sparse branch computed elsewhere: o_s (B, N, H, D) and lse
    (B, H, Npad) f32 base 2 (the Mosaic kernels, bf16 or INT8), plus the linear branch and the SLA2 combine of
    the Triton epilogue kernel (linear_inputs from _linear_inputs, per-block states)."""
    b, _, h, _ = q.shape
    out = {"o_s": o_s, "lse": lse}
    outputs = [x for x in forward_outputs(q, cfg, fused=fused, residuals=residuals) if x[0] not in out]
    if outputs:
        inputs = [("o_s_in", o_s, seq_spec(cfg))] + linear_inputs
        if fused:
            inputs += [("alpha", alpha, full_spec(cfg.nq))]
        res = pallas_triton_call(linear_epilogue_kernel, (cfg.nq, h, b), inputs, outputs, cfg, "fwd", {"fused": fused})
        out.update(zip([x[0] for x in outputs], res))
    return out


def _forward_mosaic(q, k, v, lut, alpha, linear_inputs, cfg: KernelCall, *, fused: bool, residuals: bool, phi=None):
    """Sparse branch by the Mosaic GPU kernel; the linear branch and combine in its epilogue (KernelConfig.epilogue
    "mosaic", where uses_mosaic_epilogue allows) or in a Triton epilogue kernel after it (o_s, LSE through memory).
    A q_phi input of None: phi(Q) in the Mosaic epilogue (by phi)."""
    named = {name: x for name, x, _ in linear_inputs}
    if uses_mosaic_epilogue(named, cfg, q.dtype):
        linear, kw = mosaic_epilogue_args(q, alpha, named, cfg, fused=fused, residuals=residuals, phi=phi)
        return mosaic_forward.sparse_linear_attention_mosaic(
            q, k, v, lut, linear, block_k=cfg.block_k, sm_scale=cfg.sm_scale, **kw
        )
    o_s, lse = mosaic_forward.sparse_attention_mosaic(
        q, k, v, lut, block_k=cfg.block_k, sm_scale=cfg.sm_scale, stages=4, config=cfg.config
    )
    return linear_epilogue(q, o_s, lse, alpha, linear_inputs, cfg, fused=fused, residuals=residuals)


def forward(q, k, v, q_phi, k_phi, lut, alpha, cfg: KernelCall, *, fused: bool, residuals: bool, phi=None,
            key_sums=None):
    """The forward of the bf16 family: {output name: array} with o (fused) or o_s, o_l, and with residuals lse,
    den and the states h_lin, z_lin. q_phi = k_phi = None: phi(Q), phi(K) computed from q, k by phi (the feature
    map) inside the kernels: phi(K) in the states kernel, phi(Q) in the Mosaic epilogue (a phi(Q) array only where
    the linear branch runs in a Triton kernel). key_sums: the sums of phi(K), V (per key block for the complement
    scope, the totals for "all") if the caller made them (with the block means the router read,
    linear_states.key_block_sums)."""
    b, n, h, d = q.shape
    in_epilogue = lambda named: cfg.mosaic_forward and uses_mosaic_epilogue(named, cfg, q.dtype)  # noqa: E731
    linear, h_lin, z_lin = forward_linear_inputs(q, k, v, q_phi, k_phi, lut, cfg, phi, key_sums, in_epilogue)
    if cfg.mosaic_forward:
        out = _forward_mosaic(q, k, v, lut, alpha, linear, cfg, fused=fused, residuals=residuals, phi=phi)
        out["h_lin"], out["z_lin"] = h_lin, z_lin
        return out
    seq = seq_spec(cfg)
    inputs = [("lut", lut, full_spec(cfg.nq, cfg.topk)), ("q", q, seq), ("k", k, seq), ("v", v, seq)]
    inputs += linear
    if fused:
        inputs += [("alpha", alpha, full_spec(cfg.nq))]
    outputs = forward_outputs(q, cfg, fused=fused, residuals=residuals)
    unroll = max(1, cfg.config.launch_params("fwd").rows // cfg.block_k)
    launch = dict(fused=fused, unroll=unroll)
    res = pallas_triton_call(fwd_kernel, (cfg.nq, h, b), inputs, outputs, cfg, "fwd", launch)
    out = dict(zip([x[0] for x in outputs], res))
    out["h_lin"], out["z_lin"] = h_lin, z_lin
    return out


# ----------------------------------------------------------------------------------------------------------
# Backward (both families)
# ----------------------------------------------------------------------------------------------------------
def backward(res, cfg: KernelCall, *, fused, do=None, do_s=None, do_l=None, phi=None):
    """All input cotangents (dq, dk, dv, dq_phi, dk_phi, dalpha or None) from the residuals: dQ stage, gradient
    states, dK/dV stage (each a separate function for timing). phi: None (the residuals hold phi(Q), phi(K)), or the
    feature map, which the gradient states / the dK/dV stage then apply to the rows of Q / K they read (res.q_phi /
    res.k_phi are not read)."""
    res_dq = backward_dq(res, cfg, fused=fused, do=do, do_s=do_s, do_l=do_l, phi=phi)
    sel = gradient_selection(res.lut, cfg) if cfg.track_lin else None  # one selection for both stages
    totals = backward_states(res, res_dq, cfg, fused=fused, do=do, do_l=do_l, phi=phi, sel=sel)
    res_dkv = backward_dkv(res, res_dq, totals, cfg, fused=fused, do=do, do_s=do_s, do_l=do_l, phi=phi, sel=sel)
    q = res[0]
    b, _, h, _ = q.shape
    zeros = jnp.zeros_like(q)
    in_kernels = mosaic_phi_vjp(cfg, phi)  # then phi's vjp is already in dq / dk: dphi(Q), dphi(K) None
    dq_phi = None if in_kernels else res_dq.get("dq_phi", zeros)
    dk_phi = None if in_kernels else res_dkv.get("dk_phi", zeros)
    dalpha = None
    if fused:
        dalpha = res_dq["dalpha_rows"].reshape(b, h, cfg.nq, cfg.block_q).sum(-1)
    return res_dq["dq"], res_dkv["dk"], res_dkv["dv"], dq_phi, dk_phi, dalpha


def mosaic_phi_vjp(cfg: KernelCall, phi) -> bool:
    """Whether the Mosaic dQ and dK/dV kernels apply phi's vjp themselves (KernelConfig.phi_vjp "mosaic"; only with a
    linear branch and a feature map with a written-out vjp, common.written_phi_vjp)."""
    chosen = cfg.config.phi_vjp == "mosaic" and cfg.mosaic_backward and cfg.linear
    return chosen and phi is not None and written_phi_vjp(phi) is not None


def backward_dq(res, cfg: KernelCall, *, fused, do=None, do_s=None, do_l=None, phi=None):
    """dQ, dphi(Q) (and delta, c, d alpha per row) over the LUT: one Triton kernel, or with the Mosaic backward a
    Triton kernel for the per-row terms and dphi(Q) followed by the Mosaic dQ kernel (mosaic_dq.py), which adds
    phi's vjp applied to dphi(Q) where mosaic_phi_vjp (then dq is the whole dQ)."""
    q, k, v, q_phi, k_phi, lut, alpha, o_s, o_l, lse, den, h_lin, z_lin = res
    b, n, h, d = q.shape
    seq = seq_spec(cfg)
    mosaic = cfg.mosaic_backward
    rows_dq = rows_per_step("dq_linear" if mosaic else "dq", cfg)
    rows = pl.BlockSpec((None, None, rows_dq), lambda i, hh, bb: (bb, hh, i))
    row_struct = jax.ShapeDtypeStruct((b, h, cfg.npad), F32)
    inputs = [] if mosaic else [("lut", lut, full_spec(cfg.nq, cfg.topk)), ("q", q, seq), ("k", k, seq), ("v", v, seq)]
    if fused:
        inputs += [("do", do, seq)]
    else:
        inputs += [("do_s", do_s, seq)] + ([("do_l", do_l, seq)] if cfg.linear else [])
    inputs += [("o_s", o_s, seq)] + ([] if mosaic else [("lse", lse, rows)])
    if cfg.linear:
        inputs += [("o_l", o_l, seq), ("den", den, rows)]
        if cfg.track_lin:
            ratio = cfg.block_q // rows_dq  # programs per query block
            blk = lambda s: lax.div(s, jnp.int32(ratio))
            h_spec = pl.BlockSpec((None, None, None, d, d), lambda s, hh, bb: (bb, hh, blk(s), 0, 0))
            z_spec = pl.BlockSpec((None, None, None, d), lambda s, hh, bb: (bb, hh, blk(s), 0))
            inputs += [("h_lin", h_lin, h_spec), ("z_lin", z_lin, z_spec)]  # this query block's H_i, Z_i
        else:
            inputs += [("h_lin", h_lin, full_spec(d, d)), ("z_lin", z_lin, full_spec(d))]
    if fused:
        inputs += [("alpha", alpha, full_spec(cfg.nq))]
    q_struct = jax.ShapeDtypeStruct(q.shape, q.dtype)
    outputs = [] if mosaic else [("dq", q_struct, seq)]
    outputs += [("delta", row_struct, rows)]
    if cfg.linear:
        outputs += [("dq_phi", q_struct, seq), ("c", row_struct, rows)]
    if fused:
        outputs += [("dalpha_rows", row_struct, rows)]
    kernel, name = (dq_linear_kernel, "dq_linear") if mosaic else (dq_kernel, "dq")
    launch = {"fused": fused, "rows": rows_dq}
    res_dq = pallas_triton_call(kernel, (cfg.npad // rows_dq, h, b), inputs, outputs, cfg, name, launch,
                                kernel_name="sla_dq")
    res_dq = dict(zip([x[0] for x in outputs], res_dq))
    if mosaic:
        do_sparse, a = (do, alpha) if fused else (do_s, None)
        # a ring of 4 K/V slots: 0.88 vs 0.92 ms with 2 (H100, wan-1.3b at 95%)
        kw = {"block_k": cfg.block_k, "sm_scale": cfg.sm_scale, "stages": 4, "config": cfg.config}
        if mosaic_phi_vjp(cfg, phi):
            kw.update(dq_phi=res_dq["dq_phi"], feature_map=phi)
        res_dq["dq"] = mosaic_dq.sparse_attention_dq_mosaic(q, k, v, do_sparse, lse, res_dq["delta"], lut, a, **kw)
    return res_dq


def backward_states(res, res_dq, cfg: KernelCall, *, fused, do=None, do_l=None, phi=None, sel=None):
    """Linear-branch gradient states for the dK/dV stage: dH = sum_r phi~_r^T dO_l,r, dZ = -sum_r c_r phi~_r
    (phi~ = phi(Q) / den) over all query rows, (B, H, D, D) and (B, H, D) float32; for the complement scope per
    key block j over the query blocks that did not select j, (B, H, Nk, D, D) and (B, H, Nk, D)
    (linear_states.gradient_states). phi: None (phi(Q) from res.q_phi), or the feature map applied to res.q
    inside the sums kernel. sel: linear_states.gradient_selection of the LUT if already made."""
    q, k, v, q_phi, k_phi, lut, alpha, o_s, o_l, lse, den, h_lin, z_lin = res
    if not cfg.linear:
        return None, None
    inv_den = 1.0 / den
    if fused:
        w = (1.0 - jnp.repeat(alpha, cfg.block_q, axis=-1)) * inv_den
        x = do
    else:
        w, x = inv_den, do_l
    u = -res_dq["c"] * inv_den
    return gradient_states(q_phi if phi is None else q, x, w, u, lut, cfg, phi=phi, sel=sel)


def _dkv_linear_inputs(k_phi, totals, cfg: KernelCall):
    """(name, array, BlockSpec) of the dK/dV kernels' linear-branch inputs: phi(K) (none where k_phi is None: the
    kernel applies phi to the K tile it loads) and dH, dZ (per key block, or the totals)."""
    dh, dz = totals
    d = cfg.d
    if dh.ndim == 5:  # per key block
        dh_spec = pl.BlockSpec((None, None, None, d, d), lambda j, hh, bb: (bb, hh, j, 0, 0))
        dz_spec = pl.BlockSpec((None, None, None, d), lambda j, hh, bb: (bb, hh, j, 0))
    else:
        dh_spec, dz_spec = full_spec(d, d), full_spec(d)
    k_input = [] if k_phi is None else [("k_phi", k_phi, seq_spec(cfg))]
    return k_input + [("dh", dh, dh_spec), ("dz", dz, dz_spec)]


def _linear_dkv_call(v, k_rows, totals, cfg: KernelCall, phi, dv_s):
    """The linear dK/dV kernel beside the Mosaic one: (dv_s + phi(K_j) dH_j, or that term alone where dv_s is None;
    dphi(K_j)), both (B, N, H, D) in k's dtype. k_rows: phi(K), or K with phi the feature map."""
    b, _, h, _ = v.shape
    seq = seq_spec(cfg)
    kv_struct = jax.ShapeDtypeStruct(v.shape, v.dtype)
    dv_in = [] if dv_s is None else [("dv_s", dv_s, seq)]
    inputs = [("v", v, seq)] + dv_in + _dkv_linear_inputs(k_rows, totals, cfg)
    outputs = [("dv", kv_struct, seq), ("dk_phi", kv_struct, seq)]
    return pallas_triton_call(dkv_linear_kernel, (cfg.nk, h, b), inputs, outputs, cfg, "dkv", {"phi": phi})


def backward_dkv(res, res_dq, totals, cfg: KernelCall, *, fused, do=None, do_s=None, do_l=None, phi=None, sel=None):
    """dK, dV, dphi(K) over the transposed LUT (built here): one Triton kernel, or the Mosaic dK/dV kernel
    (mosaic_dkv.py) and a Triton kernel for the linear part: after it, or where mosaic_phi_vjp before it, the Mosaic
    kernel then adding phi's vjp applied to dphi(K) and the linear dV (dk, dv whole). phi: None (phi(K) from
    res.k_phi), or the feature map, applied to the K rows the linear part reads. sel: the LUT's selection if already
    made (linear_states.gradient_selection; the transposed LUT reads its first Nq columns)."""
    q, k, v, q_phi, k_phi, lut, alpha, o_s, o_l, lse, den, h_lin, z_lin = res
    b, n, h, d = q.shape
    seq = seq_spec(cfg)
    lut_t, count = transpose_lut(lut, cfg.nk, sel=sel)
    kv_struct = jax.ShapeDtypeStruct(k.shape, k.dtype)
    if cfg.mosaic_backward:
        do_sparse, a = (do, alpha) if fused else (do_s, None)
        kw = {"block_k": cfg.block_k, "sm_scale": cfg.sm_scale, "config": cfg.config}
        sparse_dkv = functools.partial(mosaic_dkv.sparse_attention_dkv_mosaic, q, k, v, do_sparse, lse,
                                       res_dq["delta"], lut_t, count, a, **kw)
        if not cfg.linear:
            dk, dv_s = sparse_dkv()
            return {"dk": dk, "dv": dv_s}
        k_rows = k if phi is not None else k_phi  # the kernel applies phi to K's rows
        linear = functools.partial(_linear_dkv_call, v, k_rows, totals, cfg, phi)
        if mosaic_phi_vjp(cfg, phi):  # linear part first: the Mosaic kernel adds it and phi's vjp
            dv_lin, dk_phi = linear(None)
            dk, dv = sparse_dkv(dk_phi=dk_phi, dv_add=dv_lin, feature_map=phi)
            return {"dk": dk, "dv": dv}
        dk, dv_s = sparse_dkv()
        dv, dk_phi = linear(dv_s)
        return {"dk": dk, "dv": dv, "dk_phi": dk_phi}
    inputs = [
        ("lut_t", lut_t, full_spec(cfg.nk, cfg.nq)),
        ("count", count, full_spec(cfg.nk)),
        ("q", q, seq),
        ("k", k, seq),
        ("v", v, seq),
    ]
    if fused:
        inputs += [("do", do, seq)]
    else:
        inputs += [("do_s", do_s, seq)]
    full_rows = full_spec(cfg.npad)
    inputs += [("lse", lse, full_rows), ("delta", res_dq["delta"], full_rows)]
    if cfg.linear:  # with phi, phi(K_j) from the K tile the kernel loads anyway
        inputs += _dkv_linear_inputs(None if phi is not None else k_phi, totals, cfg)
    if fused:
        inputs += [("alpha", alpha, full_spec(cfg.nq))]
    outputs = [("dk", kv_struct, seq), ("dv", kv_struct, seq)]
    if cfg.linear:
        outputs += [("dk_phi", kv_struct, seq)]
    launch = {"fused": fused, "rows": rows_per_step("dkv", cfg), "phi": phi}
    res_dkv = pallas_triton_call(dkv_kernel, (cfg.nk, h, b), inputs, outputs, cfg, "dkv", launch)
    return dict(zip([x[0] for x in outputs], res_dkv))


# ----------------------------------------------------------------------------------------------------------
# Low-bit forward
# ----------------------------------------------------------------------------------------------------------
def forward_lowbit(
    q, k, v, q_phi, k_phi, lut, alpha, keys, cfg: KernelCall, quant: str, *, fused: bool, residuals: bool, queries=None,
    phi=None, key_sums=None,
):
    """The low-bit forward; returns the same dict as ``forward`` (o / o_s, o_l, lse, den, h_lin, z_lin).

    keys: ``QuantisedKeys`` made before (then Q is quantised inside the forward kernel and there is no pre-pass)
    or None (quantize.prequantize). queries: None or Q quantised before (``quantize.QuantisedQueries``, with keys):
    the kernels read its int8 Q and scales instead of quantising Q. q_phi = k_phi = None with phi (the feature map)
    and optionally key_sums: as ``forward``'s form without phi arrays (phi(K) in the states kernel, phi(Q) in the
    INT8 Mosaic epilogue from q's rows, or a phi(Q) array where the linear branch runs in a Triton kernel).
    """
    if _lowbit_on_mosaic(cfg, quant):
        return _forward_lowbit_mosaic(
            q, k, v, q_phi, k_phi, lut, alpha, keys, cfg, fused=fused, residuals=residuals, queries=queries, quant=quant,
            phi=phi, key_sums=key_sums,
        )
    q_given = (None, None) if queries is None else tuple(queries)[:2]
    quantised = prequantize(q, k, cfg.block_q, cfg.block_k, cfg.interpret) if keys is None else Quantised(*q_given, *keys)
    return forward_lowbit_triton(
        q, k, v, q_phi, k_phi, lut, alpha, quantised, cfg, quant, fused=fused, residuals=residuals, phi=phi,
        key_sums=key_sums,
    )


def _lowbit_on_mosaic(cfg: KernelCall, quant: str) -> bool:
    """The low-bit forward runs in the INT8 Mosaic kernel: KernelConfig.forward "mosaic" and quant "int8", or
    "int8_fp8" with KernelConfig.mosaic_fp8 (and block_k % 16 == 0)."""
    fp8_ok = cfg.config.mosaic_fp8 and cfg.block_k % 16 == 0
    return cfg.mosaic_forward and (quant == "int8" or (quant == "int8_fp8" and fp8_ok))


def _forward_lowbit_mosaic(
    q, k, v, q_phi, k_phi, lut, alpha, keys, cfg: KernelCall, *, fused: bool, residuals: bool, queries=None, quant="int8",
    phi=None, key_sums=None,
):
    """INT8 sparse branch by the Mosaic GPU kernel; the linear branch and the combine in its epilogue (quant "int8",
    where uses_mosaic_epilogue allows, as for bf16) or in the Triton epilogue after it (o_s, LSE through memory);
    the same dict as ``forward_lowbit_triton``. keys None: a K pre-pass first.
    quant "int8_fp8": P V in FP8 too, V quantised per channel by ``quantize_values_fp8`` (interleaved keys)."""
    if keys is None:
        qz = prequantize(q, k, cfg.block_q, cfg.block_k, cfg.interpret, queries=False)
        keys = QuantisedKeys(qz.k8, qz.k_scale, qz.k_mean)
    in_epilogue = lambda named: quant == "int8" and uses_mosaic_epilogue(named, cfg, q.dtype)  # noqa: E731
    linear, h_lin, z_lin = forward_linear_inputs(q, k, v, q_phi, k_phi, lut, cfg, phi, key_sums, in_epilogue)
    named = {name: x for name, x, _ in linear}
    kw = {"block_k": cfg.block_k, "sm_scale": cfg.sm_scale, "queries": queries}
    if in_epilogue(named):
        # shared memory at D = 128: int8 Q 16 KB, ring of 4 (8 + 16 KB), phi(Q) (or Q's rows), H_i, 1 tile of its own
        # (three outputs)
        lin, plan = mosaic_epilogue_args(q, alpha, named, cfg, fused=fused, residuals=residuals, phi=phi)
        out = mosaic_forward.sparse_linear_attention_mosaic_int8(q, k, v, lut, keys, lin, **plan, **kw)
    else:
        values = quantize_values_fp8(v, cfg.block_k, interleave=True) if quant == "int8_fp8" else None
        o_s, lse = mosaic_forward.sparse_attention_mosaic_int8(
            q, k, v, lut, keys, stages=4, values=values, config=cfg.config, **kw
        )
        out = linear_epilogue(q, o_s, lse, alpha, linear, cfg, fused=fused, residuals=residuals)
    out["h_lin"], out["z_lin"] = h_lin, z_lin
    return out


def forward_lowbit_triton(
    q, k, v, q_phi, k_phi, lut, alpha, quantised: Quantised, cfg: KernelCall, quant: str, *, fused: bool, residuals: bool,
    phi=None, key_sums=None,
):
    """The Triton low-bit forward kernel given the quantised operands (timed on its own by the GPU probes); phi,
    key_sums as forward_lowbit's."""
    b, _, h, d = q.shape
    fp8 = quant == "int8_fp8"
    seq = seq_spec(cfg)
    qz = quantised
    inputs = [("lut", lut, full_spec(cfg.nq, cfg.topk))]
    if qz.q8 is not None:
        inputs += [("q8", qz.q8, seq), ("q_scale", qz.q_scale, full_spec(cfg.nq))]
    if qz.q8 is None or residuals:
        inputs += [("q", q, seq)]
    inputs += [("k8", qz.k8, seq), ("k_scale", qz.k_scale, full_spec(cfg.nk))]
    if residuals:
        inputs += [("k_mean", qz.k_mean, full_spec(d))]
    if fp8:
        v8t, v_scale = quantize_values_fp8(v, cfg.block_k)
        inputs += [("v8t", v8t, full_spec(d, cfg.nk * cfg.block_k)), ("v_scale", v_scale, full_spec(d))]
    if not fp8:
        inputs += [("v", v, seq)]
    no_epilogue = lambda named: False  # noqa: E731 - the Triton forward reads a phi(Q) array
    linear, h_lin, z_lin = forward_linear_inputs(q, k, v, q_phi, k_phi, lut, cfg, phi, key_sums, no_epilogue)
    inputs += linear
    if fused:
        inputs += [("alpha", alpha, full_spec(cfg.nq))]
    outputs = forward_outputs(q, cfg, fused=fused, residuals=residuals)
    launch = "lowbit" if quant == "int8" else "fwd"
    res = pallas_triton_call(lowbit_fwd_kernel, (cfg.nq, h, b), inputs, outputs, cfg, launch,
                             {"fused": fused, "fp8": fp8}, kernel_name=f"sla_fwd_{quant}")
    out = dict(zip([x[0] for x in outputs], res))
    out["h_lin"], out["z_lin"] = h_lin, z_lin
    return out


# ----------------------------------------------------------------------------------------------------------
# custom_vjp wiring: one pair (branches, fused) per precision family
# ----------------------------------------------------------------------------------------------------------
def residuals(q, k, v, q_phi, k_phi, lut, alpha, out) -> Residuals:
    """The Residuals of a forward's output dict."""
    return Residuals(
        q, k, v, q_phi, k_phi, lut, alpha, out["o_s"], out.get("o_l"), out["lse"], out.get("den"), out["h_lin"],
        out["z_lin"],
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _branches(q, k, v, q_phi, k_phi, lut, cfg):
    out = forward(q, k, v, q_phi, k_phi, lut, None, cfg, fused=False, residuals=False)
    return out["o_s"], out.get("o_l", jnp.zeros_like(q))


def _branches_fwd(q, k, v, q_phi, k_phi, lut, cfg):
    out = forward(q, k, v, q_phi, k_phi, lut, None, cfg, fused=False, residuals=True)
    return (out["o_s"], out.get("o_l", jnp.zeros_like(q))), residuals(q, k, v, q_phi, k_phi, lut, None, out)


def _branches_bwd(cfg, res, cts):
    do_s, do_l = cts
    dq, dk, dv, dq_phi, dk_phi, _ = backward(
        res, cfg, fused=False, do_s=do_s.astype(res[0].dtype), do_l=do_l.astype(res[0].dtype)
    )
    return dq, dk, dv, dq_phi, dk_phi, None


_branches.defvjp(_branches_fwd, _branches_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(q, k, v, q_phi, k_phi, lut, alpha, cfg):
    return forward(q, k, v, q_phi, k_phi, lut, alpha, cfg, fused=True, residuals=False)["o"]


def _fused_fwd(q, k, v, q_phi, k_phi, lut, alpha, cfg):
    out = forward(q, k, v, q_phi, k_phi, lut, alpha, cfg, fused=True, residuals=True)
    return out["o"], residuals(q, k, v, q_phi, k_phi, lut, alpha, out)


def _fused_bwd(cfg, res, do):
    dq, dk, dv, dq_phi, dk_phi, dalpha = backward(res, cfg, fused=True, do=do.astype(res[0].dtype))
    return dq, dk, dv, dq_phi, dk_phi, None, dalpha


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused_phi(q, k, v, lut, alpha, key_sums, cfg, phi):
    return forward(q, k, v, None, None, lut, alpha, cfg, fused=True, residuals=False, phi=phi, key_sums=key_sums)["o"]


def _fused_phi_fwd(q, k, v, lut, alpha, key_sums, cfg, phi):
    out = forward(q, k, v, None, None, lut, alpha, cfg, fused=True, residuals=True, phi=phi, key_sums=key_sums)
    return out["o"], residuals(q, k, v, None, None, lut, alpha, out)


def _fused_phi_bwd(cfg, phi, res, do):
    """The backward of _fused without phi arrays in the residuals: the gradient states' sums kernel applies phi to
    the Q rows it reads and the dK/dV linear part to the K rows it reads; then phi's vjp onto dphi(Q), dphi(K) (one
    front-end kernel per tensor, which also adds the direct dQ, dK). (Writing phi(Q), phi(K) arrays first, and
    applying phi's vjp at Q inside the dQ kernels, were both slower on an H100 and were deleted:
    docs/dev/backward_kernels.md.) key_sums (made from stopped K, V by the caller) get no cotangent: dK, dV here are
    the whole gradients."""
    do = do.astype(res.q.dtype)
    dq, dk, dv, dq_phi, dk_phi, dalpha = backward(res, cfg, fused=True, do=do, phi=phi)
    if dq_phi is not None and cfg.linear:  # None: the Mosaic dQ kernel applied phi's vjp (KernelConfig.phi_vjp)
        dq = feature_map_vjp(res.q, dq_phi, dq, phi, interpret=cfg.interpret)
    if dk_phi is not None and cfg.linear:
        dk = feature_map_vjp(res.k, dk_phi, dk, phi, interpret=cfg.interpret)
    return dq, dk, dv, None, dalpha, None


_fused_phi.defvjp(_fused_phi_fwd, _fused_phi_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _branches_lowbit(q, k, v, q_phi, k_phi, lut, keys, queries, cfg, quant):
    out = forward_lowbit(
        q, k, v, q_phi, k_phi, lut, None, keys, cfg, quant, fused=False, residuals=False, queries=queries
    )
    return out["o_s"], out.get("o_l", jnp.zeros_like(q))


def _branches_lowbit_fwd(q, k, v, q_phi, k_phi, lut, keys, queries, cfg, quant):
    out = forward_lowbit(q, k, v, q_phi, k_phi, lut, None, keys, cfg, quant, fused=False, residuals=True, queries=queries)
    res = residuals(q, k, v, q_phi, k_phi, lut, None, out)
    return (out["o_s"], out.get("o_l", jnp.zeros_like(q))), res


def _branches_lowbit_bwd(cfg, quant, res, cts):
    del quant  # straight-through: the full-precision backward
    return (*_branches_bwd(cfg, res, cts), None, None)  # no gradient to the quantised keys / queries


_branches_lowbit.defvjp(_branches_lowbit_fwd, _branches_lowbit_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _fused_lowbit(q, k, v, q_phi, k_phi, lut, alpha, keys, queries, cfg, quant):
    out = forward_lowbit(q, k, v, q_phi, k_phi, lut, alpha, keys, cfg, quant, fused=True, residuals=False, queries=queries)
    return out["o"]


def _fused_lowbit_fwd(q, k, v, q_phi, k_phi, lut, alpha, keys, queries, cfg, quant):
    out = forward_lowbit(q, k, v, q_phi, k_phi, lut, alpha, keys, cfg, quant, fused=True, residuals=True, queries=queries)
    return out["o"], residuals(q, k, v, q_phi, k_phi, lut, alpha, out)


def _fused_lowbit_bwd(cfg, quant, res, do):
    del quant  # straight-through: the full-precision backward
    return (*_fused_bwd(cfg, res, do), None, None)  # no gradient to the quantised keys / queries


_fused_lowbit.defvjp(_fused_lowbit_fwd, _fused_lowbit_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _fused_lowbit_phi(q, k, v, lut, alpha, key_sums, keys, queries, cfg, quant, phi):
    return forward_lowbit(q, k, v, None, None, lut, alpha, keys, cfg, quant, fused=True, residuals=False,
                          queries=queries, phi=phi, key_sums=key_sums)["o"]


def _fused_lowbit_phi_fwd(q, k, v, lut, alpha, key_sums, keys, queries, cfg, quant, phi):
    out = forward_lowbit(q, k, v, None, None, lut, alpha, keys, cfg, quant, fused=True, residuals=True,
                         queries=queries, phi=phi, key_sums=key_sums)
    return out["o"], residuals(q, k, v, None, None, lut, alpha, out)


def _fused_lowbit_phi_bwd(cfg, quant, phi, res, do):
    del quant  # straight-through: the full-precision backward of the form without phi arrays
    return (*_fused_phi_bwd(cfg, phi, res, do), None, None)  # no gradient to the quantised keys / queries


_fused_lowbit_phi.defvjp(_fused_lowbit_phi_fwd, _fused_lowbit_phi_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
def sparse_linear_attention(
    q, k, v, q_phi, k_phi, lut, *, block_q=128, block_k=64, linear_scope="complement", sm_scale=None, eps=1e-6,
    interpret=None, config=None,
):
    """Sparse (LUT) and linear branches of SLA / SLA2 attention, returned separately: (o_s, o_l).

    Args:
      q, k, v: (B, N, H, D) bf16/f16/f32 (same dtype), D in {32, 64, 128}, any N (ragged is fine).
      q_phi, k_phi: phi(q), phi(k) (B, N, H, D), the feature-mapped queries/keys (cast to q.dtype).
      lut: int32 (B, H, ceil(N/block_q), topk): selected key-block ids, ascending, no duplicates.
      block_q, block_k: the SLA block sizes the LUT refers to (powers of two in [16, 256]).
      linear_scope: "complement" (linear branch over unselected blocks) or "all" (over all keys).
      sm_scale: softmax scale, default 1/sqrt(D).  eps: added to the linear branch's denominator.
      interpret: None -> Pallas interpret mode unless the default backend is a GPU.
      config: KernelConfig (which kernels and launch parameters); None -> heuristic_config for the call.
    Returns:
      (o_s, o_l), each (B, N, H, D) in q.dtype. Differentiable w.r.t. q, k, v, q_phi, k_phi.
    """
    cfg = validate_call(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret, config)
    return _branches(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, cfg)


def sla2_fused_attention(
    q, k, v, q_phi, k_phi, lut, alpha, *, block_q=128, block_k=64, linear_scope="complement", sm_scale=None, eps=1e-6,
    interpret=None, config=None, feature_map=None, key_sums=None,
):
    """SLA2 output o = alpha * o_s + (1 - alpha) * o_l in one forward kernel (see sparse_linear_attention).

    alpha: float (B, H, Nq) (anything broadcastable to it), one value per query block; differentiable
    (d alpha = sum over the block's rows and channels of dO * (O_s - O_l)). Returns o (B, N, H, D) in q.dtype.
    q_phi = k_phi = None with feature_map (phi: a function of a float32 (rows, D) tile -> float32 (rows, D), e.g.
    ``sla2_jax.feature_maps.softmax_phi``, the same object each call): the kernels compute phi(Q), phi(K) from q, k
    (no phi arrays in memory, forward or backward), differentiable w.r.t. q, k, v, alpha. A map that also carries its
    vjp written out as an attribute, ``phi.vjp(x32, d_phi32) -> dx32`` (the library's maps do), has it applied
    inside the Mosaic backward kernels (KernelConfig.phi_vjp); other maps get one more pass per tensor for it.
    key_sums (with feature_map): the sums of key_block_sums(k, v) of the same linear_scope made for the routing, so
    that the forward does not read K and V for them again; not differentiated (the gradients of q, k, v are whole
    without them).
    """
    cfg, key_sums = _validate_phi_form(q, k, v, q_phi, k_phi, lut, feature_map, key_sums, block_q, block_k,
                                       linear_scope, sm_scale, eps, interpret, config)
    alpha = checked_alpha(alpha, q, cfg)
    if q_phi is None:
        return _fused_phi(q, k, v, lut, alpha, key_sums, cfg, feature_map)
    return _fused(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, alpha, cfg)


def _validate_phi_form(q, k, v, q_phi, k_phi, lut, feature_map, key_sums, *call_args):
    """(KernelCall, key_sums stopped or None) of a fused entry point given either phi arrays, or neither with
    feature_map (and optionally key_sums); call_args: validate_call's from block_q on. ValueError otherwise."""
    if q_phi is None and k_phi is None:
        if not callable(feature_map):
            raise ValueError("q_phi = k_phi = None needs feature_map, a function of a float32 (rows, D) tile")
        cfg = validate_call(q, k, v, q, k, lut, *call_args)
        if key_sums is not None:
            _check_key_sums(key_sums, q, cfg)
            key_sums = jax.lax.stop_gradient(key_sums) if cfg.linear else None  # None: no linear branch
        return cfg, key_sums
    if key_sums is not None:
        raise ValueError("key_sums goes with q_phi = k_phi = None and feature_map")
    if q_phi is None or k_phi is None or feature_map is not None:
        raise ValueError("give q_phi and k_phi (and no feature_map), or neither of them with feature_map")
    return validate_call(q, k, v, q_phi, k_phi, lut, *call_args), None


def key_block_sums(k, v, *, block_q=128, block_k=64, linear_scope="complement", feature_map, interpret=None,
                   config=None):
    """One read of K and V for the routing and the linear states: (key_sums, means).

    k, v: (B, N, H, D) bf16 / f16 / f32; feature_map: phi as for sla2_fused_attention. key_sums: to pass to
    ``sla2_fused_attention(..., key_sums=)`` of the same linear_scope with the LUT routed from `means`: for
    "complement" the per-key-block sums phi(K_j)^T V_j, colsum phi(K_j) (stored for ``linear_states.stored_blocks(
    Nk)`` blocks, Nk rounded up to a multiple of 64 from 512 on, else of 8, zero past Nk: the masked matmul that
    makes the query blocks' states then runs aligned), for "all" their totals over every key;
    means: (B, H, ceil(N / block_k), D) float32, the block means of K (finite rows; a ragged last block averages its
    valid rows), as ``front_end.block_means_and_phi`` gives them. Not differentiable (take it of stopped k, v)."""
    if not callable(feature_map):
        raise ValueError("key_block_sums needs feature_map, a function of a float32 (rows, D) tile")
    b, n, h, _ = k.shape if hasattr(k, "shape") and len(k.shape) == 4 else (0, 0, 0, 0)
    nq = -(-n // block_q) if isinstance(block_q, int) and block_q > 0 else 0
    no_lut = jax.ShapeDtypeStruct((b, h, nq, 1), jnp.int32)  # a LUT's shape for validate_call: the sums need none
    cfg = validate_call(k, k, v, k, k, no_lut, block_q, block_k, linear_scope, None, 1e-6, interpret, config)
    return linear_states.key_block_sums(k, v, cfg, feature_map)


def _check_key_sums(key_sums, q, cfg: KernelCall):
    b, h, d = q.shape[0], q.shape[2], cfg.d
    expected = (b, h, linear_states.stored_blocks(cfg.nk), d, d) if cfg.complement else (b, h, d, d)
    what = "per-block states" if cfg.complement else "totals (linear_scope 'all')"
    blocks = cfg.nk if cfg.complement else None
    if not hasattr(key_sums, "h") or tuple(key_sums.h.shape) != expected or key_sums.blocks != blocks:
        raise ValueError(f"key_sums must come from key_block_sums(k, v) of these k, v and this linear_scope: "
                         f"{what} {expected}")


def _check_quant(quant):
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")


def _check_keys(keys, k, cfg: KernelCall):
    """keys: None or a QuantisedKeys matching k (B, N, H, D) and block_k; returned with stopped gradients."""
    if keys is None:
        return None
    b, n, h, d = k.shape
    expect = {"k8": ((b, n, h, d), jnp.int8), "scale": ((b, h, cfg.nk), F32), "mean": ((b, h, d), F32)}
    if not isinstance(keys, QuantisedKeys):
        raise ValueError(f"keys must be a QuantisedKeys or None, got {type(keys).__name__}")
    for name, (shape, dtype) in expect.items():
        x = getattr(keys, name)
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise ValueError(f"keys.{name} must be {jnp.dtype(dtype).name} {shape}, got {x.dtype} {tuple(x.shape)}")
    return QuantisedKeys(*(lax.stop_gradient(x) for x in keys))


def _check_queries(queries, keys, q, cfg: KernelCall):
    """queries: None or (q8, scale, shift) (``quantize.QuantisedQueries``) matching q and block_q, given with keys
    (the shift holds keys.mean); returned as a tuple with stopped gradients."""
    if queries is None:
        return None
    if keys is None:
        raise ValueError("queries need keys (the shift q . mean_N(K) belongs to the quantised keys)")
    b, n, h, d = q.shape
    expect = (((b, n, h, d), jnp.int8), ((b, h, cfg.nq), F32), ((b, h, cfg.nq * cfg.block_q), F32))
    if len(queries) != 3:
        raise ValueError(f"queries must be (q8, scale, shift), got {len(queries)} arrays")
    for name, x, (shape, dtype) in zip(("q8", "scale", "shift"), queries, expect):
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise ValueError(f"queries.{name} must be {jnp.dtype(dtype).name} {shape}, got {x.dtype} {tuple(x.shape)}")
    return tuple(lax.stop_gradient(x) for x in queries)


def sparse_linear_attention_lowbit(
    q,
    k,
    v,
    q_phi,
    k_phi,
    lut,
    *,
    quant="int8",
    block_q=128,
    block_k=64,
    linear_scope="complement",
    sm_scale=None,
    eps=1e-6,
    interpret=None,
    keys=None,
    queries=None,
    config=None,
):
    """Sparse (LUT) and linear branches with a low-bit sparse-branch forward: (o_s, o_l).

    Same arguments (config included) and outputs as ``sparse_linear_attention`` plus
      quant: "int8" (Q and smoothed K in INT8 per block, P V in q.dtype) or "int8_fp8" (also P and V in FP8 e4m3).
      keys: optional ``QuantisedKeys`` of k (made where k is read anyway, e.g. ``front_end.block_means_phi_int8``):
        the kernel then runs without a pre-pass and quantises Q itself. None: a pre-pass quantises K~ (and Q).
      queries: optional int8 Q with scales and LSE shift, given with keys (``quantize.QuantisedQueries``, from the read
        of Q that gives phi(Q): ``front_end.block_means_phi_int8_queries`` with block_q and sm_scale * log2 e): then
        nothing quantises Q here.
    q, k, v are the original (unquantised) tensors; K is smoothed inside. The forward of the sparse branch is
    low bit; gradients (w.r.t. q, k, v, q_phi, k_phi) are the full-precision ones (straight-through).
    """
    _check_quant(quant)
    cfg = validate_call(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret, config)
    keys = _check_keys(keys, k, cfg)
    queries = _check_queries(queries, keys, q, cfg)
    return _branches_lowbit(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, keys, queries, cfg, quant)


def sla2_fused_attention_lowbit(
    q,
    k,
    v,
    q_phi,
    k_phi,
    lut,
    alpha,
    *,
    quant="int8",
    block_q=128,
    block_k=64,
    linear_scope="complement",
    sm_scale=None,
    eps=1e-6,
    interpret=None,
    keys=None,
    queries=None,
    config=None,
    feature_map=None,
    key_sums=None,
):
    """SLA2 output o = alpha * o_s + (1 - alpha) * o_l in one kernel, o_s from the low-bit sparse branch.

    Same arguments as ``sla2_fused_attention`` (q_phi = k_phi = None with feature_map and optionally key_sums
    included: no phi arrays in the forward) plus ``quant``, ``keys`` and ``queries`` (see
    ``sparse_linear_attention_lowbit``). Differentiable w.r.t. q, k, v, q_phi, k_phi and alpha (straight-through:
    the bf16 backward kernels with the low-bit forward's LSE and O_s).
    """
    _check_quant(quant)
    cfg, key_sums = _validate_phi_form(q, k, v, q_phi, k_phi, lut, feature_map, key_sums, block_q, block_k,
                                       linear_scope, sm_scale, eps, interpret, config)
    alpha = checked_alpha(alpha, q, cfg)
    keys = _check_keys(keys, k, cfg)
    queries = _check_queries(queries, keys, q, cfg)
    if q_phi is None:
        return _fused_lowbit_phi(q, k, v, lut, alpha, key_sums, keys, queries, cfg, quant, feature_map)
    return _fused_lowbit(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, alpha, keys, queries, cfg, quant)
