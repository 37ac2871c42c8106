"""The backward kernels in Pallas Triton (any CUDA GPU; on CPU in interpret mode), and the small Triton kernels
around the Mosaic backward.

* ``dq_kernel``, grid (Npad / rows, H, B): per sub-block of ``rows`` query rows of query block i,
  delta = rowsum(dO_s * O_s), c = rowsum(dO_l * O_l) (and rowsum(dO * (O_s - O_l)) for d alpha), and over the
  LUT of block i: P = exp2(S - LSE), dS = P * (dO_s V^T - delta), dQ += dS K; linear branch
  dphi(Q) = dO_l / den @ H_i^T - c / den * Z_i. 3 rows x block_k x D matmuls per LUT entry (in the fused form
  dO_s V^T is alpha times dO V^T).
* ``dkv_kernel``, grid (Nk, H, B): per key block j, over the ``rows``-row sub-blocks of the query blocks that
  selected it (the transposed LUT, linear_states.transpose_lut), keys as rows (S^T = K_j Q^T, so no computed tile
  is transposed): dV += P^T dO_s, dK += dS^T Q; then the linear part dV += phi(K_j) dH_j,
  dphi(K_j) = V_j dH_j^T + dZ_j with dH_j, dZ_j from linear_states.gradient_states. 4 block_k x rows x D matmuls
  per step.
* ``dq_linear_kernel`` and ``dkv_linear_kernel``: the same per-row terms, dphi(Q) and linear dK/dV part without a
  LUT loop, around the Mosaic dQ and dK/dV kernels (KernelConfig.backward "mosaic").
Launched by attention.py.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ._triton import pl
from .common import F32, LOG2E, KernelCall, dot, dot_mat, load_rows, scores, store_rows

def _dq_row_terms(r, i, q_start, bm, cfg: KernelCall, fused: bool):
    """Per-row terms of query rows [q_start, q_start + bm) of query block i (stored: delta, c, d alpha rows):
    delta = rowsum(dO_s * O_s), c = rowsum(dO_l * O_l). Returns (dO_s or dO as loaded, alpha or None, delta,
    dO_l float32, c, den) with the last three None without a linear branch."""
    o_s = load_rows(r["o_s"], q_start, bm, cfg.n).astype(F32)
    a = r["alpha"][i] if fused else None
    if fused:
        do = load_rows(r["do"], q_start, bm, cfg.n)
        do32 = do.astype(F32)
        delta = a * jnp.sum(do32 * o_s, axis=1)
        do_l32 = (1.0 - a) * do32
    else:
        do = load_rows(r["do_s"], q_start, bm, cfg.n)
        delta = jnp.sum(do.astype(F32) * o_s, axis=1)
        do_l32 = load_rows(r["do_l"], q_start, bm, cfg.n).astype(F32) if cfg.linear else None
    r["delta"][...] = delta
    o_l = c = den = None
    if cfg.linear:
        o_l = load_rows(r["o_l"], q_start, bm, cfg.n).astype(F32)
        den = r["den"][...]
        c = jnp.sum(do_l32 * o_l, axis=1)
        r["c"][...] = c
    if fused:
        diff = o_s if o_l is None else o_s - o_l
        r["dalpha_rows"][...] = jnp.sum(do32 * diff, axis=1)
    return do, a, delta, do_l32, c, den


def _store_dq_phi(r, q_start, do_l32, c, den, cfg: KernelCall):
    """dphi(Q) = dO_l / den @ H^T - c / den * Z with this block's H_i, Z_i (complement) or the totals (scope "all")."""
    h = r["h"][...]
    z = r["z"][...]
    dq_phi = dot_mat(do_l32 / den[:, None], h, r["o_s"].dtype, trans_b=True) - (c / den)[:, None] * z[None, :]
    store_rows(r["dq_phi"], q_start, dq_phi, cfg.n)


def dq_kernel(*refs, names, cfg: KernelCall, fused: bool, rows: int):
    r = dict(zip(names, refs))
    sub = pl.program_id(0)  # sub-block of `rows` query rows
    i = lax.div(sub, jnp.int32(cfg.block_q // rows))  # its query block (LUT row)
    q_start = sub * rows
    bm = rows
    q = load_rows(r["q"], q_start, bm, cfg.n)
    lse = r["lse"][...]
    do, a, delta, do_l32, c, den = _dq_row_terms(r, i, q_start, bm, cfg, fused)

    carry = (jnp.zeros((bm, cfg.d), F32),)

    def body(t, carry):
        k_start = r["lut"][i, t] * cfg.block_k
        k = load_rows(r["k"], k_start, cfg.block_k, cfg.n)
        v = load_rows(r["v"], k_start, cfg.block_k, cfg.n)
        p = jnp.exp2(scores(q, k, k_start, cfg) - lse[:, None])
        x = dot(do, v, trans_b=True)
        dp = a * x if fused else x
        ds = p * (dp - delta[:, None])
        return (carry[0] + dot(ds.astype(k.dtype), k),)

    carry = lax.fori_loop(0, cfg.topk, body, carry)
    store_rows(r["dq"], q_start, carry[0] * cfg.sm_scale, cfg.n)
    if cfg.linear:
        _store_dq_phi(r, q_start, do_l32, c, den, cfg)


def dq_linear_kernel(*refs, names, cfg: KernelCall, fused: bool):
    """Program (i, h, b): the per-row terms and dphi(Q) of query block i without the LUT loop (the Mosaic dQ
    kernel does the loop, with the delta stored here)."""
    r = dict(zip(names, refs))
    i = pl.program_id(0)
    _, _, _, do_l32, c, den = _dq_row_terms(r, i, i * cfg.block_q, cfg.block_q, cfg, fused)
    if cfg.linear:
        _store_dq_phi(r, i * cfg.block_q, do_l32, c, den, cfg)


def dkv_kernel(*refs, names, cfg: KernelCall, fused: bool, rows: int):
    r = dict(zip(names, refs))
    j = pl.program_id(0)
    k_start = j * cfg.block_k
    k = load_rows(r["k"], k_start, cfg.block_k, cfg.n)
    v = load_rows(r["v"], k_start, cfg.block_k, cfg.n)
    dt = k.dtype
    bm, nsub = rows, cfg.block_q // rows  # the loop walks `rows`-row sub-blocks of each query block
    zeros = jnp.zeros((cfg.block_k, cfg.d), F32)
    carry = (zeros, zeros)

    qk_scale = cfg.sm_scale * LOG2E
    kvalid = (k_start + jnp.arange(cfg.block_k)) < cfg.n

    # Keys-as-rows orientation (as in the Triton fused-attention tutorial's dK/dV loop): every matmul has a
    # register tile or a loaded tile as A and a loaded tile as B, so no computed tile needs transposing.
    def body(t, carry):
        dk, dv = carry
        i = r["lut_t"][j, lax.div(t, jnp.int32(nsub))]  # (plain // and % lower badly in Triton)
        q_start = i * cfg.block_q + lax.rem(t, jnp.int32(nsub)) * bm
        rws = pl.ds(q_start, bm)
        q = load_rows(r["q"], q_start, bm, cfg.n)
        lse = r["lse"][rws]
        delta = r["delta"][rws]
        s_t = dot(k, q, trans_b=True) * qk_scale  # (block_k, bm) = S^T
        p_t = jnp.where(kvalid[:, None], jnp.exp2(s_t - lse[None, :]), 0.0)
        do = load_rows(r["do" if fused else "do_s"], q_start, bm, cfg.n)
        x_t = dot(v, do, trans_b=True)  # (dO V^T)^T
        if fused:
            a = r["alpha"][i]
            ds_t = p_t * (a * x_t - delta[None, :])
            w_t = a * p_t
        else:
            ds_t = p_t * (x_t - delta[None, :])
            w_t = p_t
        dk = dk + dot(ds_t.astype(dt), q)
        dv = dv + dot(w_t.astype(dt), do)
        return dk, dv

    carry = lax.fori_loop(0, r["count"][j] * nsub, body, carry)
    store_rows(r["dk"], k_start, carry[0] * cfg.sm_scale, cfg.n)
    dv = carry[1]
    if cfg.linear:
        dv = _add_dkv_linear(r, k_start, v, dv, cfg)
    store_rows(r["dv"], k_start, dv, cfg.n)


def _add_dkv_linear(r, k_start, v, dv, cfg: KernelCall):
    """Linear part of key block j, after the sparse loop (keeps its D x D operands out of the pipelined loop's
    shared memory): returns dV + phi(K_j) dH_j and stores dphi(K_j) = V_j dH_j^T + dZ_j, with dH_j, dZ_j over the
    query blocks that did not select j (complement) or over all of them (scope "all")."""
    dt = v.dtype
    k_phi = load_rows(r["k_phi"], k_start, cfg.block_k, cfg.n)
    dh = r["dh"][...]
    dk_phi = dot_mat(v, dh, dt, trans_b=True) + r["dz"][...][None, :]
    store_rows(r["dk_phi"], k_start, dk_phi, cfg.n)
    return dv + dot_mat(k_phi, dh, dt)


def dkv_linear_kernel(*refs, names, cfg: KernelCall):
    """Program (j, h, b): the linear part of key block j for a sparse dV computed elsewhere (the Mosaic dK/dV
    kernel): dv = dv_s + phi(K_j) dH_j, dphi(K_j) = V_j dH_j^T + dZ_j."""
    r = dict(zip(names, refs))
    k_start = pl.program_id(0) * cfg.block_k
    v = load_rows(r["v"], k_start, cfg.block_k, cfg.n)
    dv_s = load_rows(r["dv_s"], k_start, cfg.block_k, cfg.n).astype(F32)
    store_rows(r["dv"], k_start, _add_dkv_linear(r, k_start, v, dv_s, cfg), cfg.n)
