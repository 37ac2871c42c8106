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
The kernels read phi(Q), phi(K) arrays; for the fused call without phi arrays (attention._fused_phi_bwd) the dK/dV
kernels apply phi to the K rows they read (phi(Q) is applied by linear_states.gradient_states), and phi's vjp
follows them (front_end.feature_map_vjp, or the Mosaic dK/dV kernel's epilogue: attention.mosaic_phi_vjp).
Launched by attention.py.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ._triton import pl
from .common import F32, LOG2E, KernelCall, dot, dot_mat, load_rows, phi_rows, scores, store_rows


def _dq_row_terms(
    i, q_start, bm, o_s_ref, do_ref, do_s_ref, do_l_ref, o_l_ref, den_ref, alpha_ref, delta_ref, c_ref,
    dalpha_rows_ref, *, cfg: KernelCall, fused: bool,
):  # fmt: skip
    """Per-row terms of query rows [q_start, q_start + bm) of query block i (stored: delta, c, d alpha rows):
    delta = rowsum(dO_s * O_s), c = rowsum(dO_l * O_l). Returns (dO_s or dO as loaded, alpha or None, delta,
    dO_l float32, c, den) with the last three None without a linear branch."""
    o_s = load_rows(o_s_ref, q_start, bm, cfg.n).astype(F32)
    a = alpha_ref[i] if fused else None
    if fused:
        do = load_rows(do_ref, q_start, bm, cfg.n)
        do32 = do.astype(F32)
        delta = a * jnp.sum(do32 * o_s, axis=1)
        do_l32 = (1.0 - a) * do32
    else:
        do = load_rows(do_s_ref, q_start, bm, cfg.n)
        delta = jnp.sum(do.astype(F32) * o_s, axis=1)
        do_l32 = load_rows(do_l_ref, q_start, bm, cfg.n).astype(F32) if cfg.linear else None
    delta_ref[...] = delta
    o_l = c = den = None
    if cfg.linear:
        o_l = load_rows(o_l_ref, q_start, bm, cfg.n).astype(F32)
        den = den_ref[...]
        c = jnp.sum(do_l32 * o_l, axis=1)
        c_ref[...] = c
    if fused:
        diff = o_s if o_l is None else o_s - o_l
        dalpha_rows_ref[...] = jnp.sum(do32 * diff, axis=1)
    return do, a, delta, do_l32, c, den


def _dq_phi(do_l32, c, den, h_lin_ref, z_lin_ref, like):
    """dphi(Q) = dO_l / den @ H^T - c / den * Z (float32) with this block's H_i, Z_i (complement) or the totals
    (scope "all"); like: the input dtype (16-bit: the D x D product on bf16 tensor cores)."""
    h = h_lin_ref[...]
    z = z_lin_ref[...]
    return dot_mat(do_l32 / den[:, None], h, like, trans_b=True) - (c / den)[:, None] * z[None, :]



def dq_kernel(
    *,
    # inputs
    lut_ref, q_ref, k_ref, v_ref, do_ref=None, do_s_ref=None, do_l_ref=None, o_s_ref, lse_ref, o_l_ref=None,
    den_ref=None, h_lin_ref=None, z_lin_ref=None, alpha_ref=None,
    # outputs
    dq_ref, delta_ref, dq_phi_ref=None, c_ref=None, dalpha_rows_ref=None,
    # static arguments
    cfg: KernelCall, fused: bool, rows: int,
):  # fmt: skip
    """Program (s, h, b) of grid (Npad / rows, H, B): query rows [s * rows, (s + 1) * rows) of one (b, h), in query
    block i = s * rows // block_q. Refs of that (b, h), None where the call has no such input or output
    (attention.backward_dq builds the lists):

    lut (Nq, topk) int32; q, k, v (N, D); do (N, D) (fused) or do_s (N, D) and, with a linear branch, do_l (N, D);
    o_s (N, D); lse (rows,) float32 (base 2); the linear branch (cfg.linear): o_l (N, D), den (rows,) float32 and
    its states h_lin (D, D), z_lin (D,) float32 (query block i's H_i, Z_i for the complement scope, else the
    totals); alpha (Nq,) float32 (fused). Outputs: dq (N, D); delta (rows,) float32; dq_phi (N, D) and c (rows,)
    float32 (linear branch); dalpha_rows (rows,) float32 (fused).
    """
    sub = pl.program_id(0)  # sub-block of `rows` query rows
    i = lax.div(sub, jnp.int32(cfg.block_q // rows))  # its query block (LUT row)
    q_start = sub * rows
    bm = rows
    q = load_rows(q_ref, q_start, bm, cfg.n)
    lse = lse_ref[...]
    do, a, delta, do_l32, c, den = _dq_row_terms(
        i, q_start, bm, o_s_ref, do_ref, do_s_ref, do_l_ref, o_l_ref, den_ref, alpha_ref, delta_ref, c_ref,
        dalpha_rows_ref, cfg=cfg, fused=fused,
    )  # fmt: skip

    carry = (jnp.zeros((bm, cfg.d), F32),)

    def body(t, carry):
        k_start = lut_ref[i, t] * cfg.block_k
        k = load_rows(k_ref, k_start, cfg.block_k, cfg.n)
        v = load_rows(v_ref, k_start, cfg.block_k, cfg.n)
        p = jnp.exp2(scores(q, k, k_start, cfg) - lse[:, None])
        x = dot(do, v, trans_b=True)
        dp = a * x if fused else x
        ds = p * (dp - delta[:, None])
        return (carry[0] + dot(ds.astype(k.dtype), k),)

    carry = lax.fori_loop(0, cfg.topk, body, carry)
    dq = carry[0] * cfg.sm_scale
    if cfg.linear:
        store_rows(dq_phi_ref, q_start, _dq_phi(do_l32, c, den, h_lin_ref, z_lin_ref, o_s_ref.dtype), cfg.n)
    store_rows(dq_ref, q_start, dq, cfg.n)


def dq_linear_kernel(
    *,
    # inputs
    do_ref=None, do_s_ref=None, do_l_ref=None, o_s_ref, o_l_ref=None, den_ref=None, h_lin_ref=None, z_lin_ref=None,
    alpha_ref=None,
    # outputs
    delta_ref, dq_phi_ref=None, c_ref=None, dalpha_rows_ref=None,
    # static arguments
    cfg: KernelCall, fused: bool, rows: int,
):  # fmt: skip
    """Program (s, h, b) of grid (Npad / rows, H, B): the per-row terms and dphi(Q) of query rows [s * rows,
    (s + 1) * rows), in query block i = s * rows // block_q, without the LUT loop (the Mosaic dQ kernel does the
    loop, with the delta stored here). Refs as dq_kernel's, less lut, q, k, v, lse and dq."""
    sub = pl.program_id(0)
    i = lax.div(sub, jnp.int32(cfg.block_q // rows))  # its query block
    q_start = sub * rows
    _, _, _, do_l32, c, den = _dq_row_terms(
        i, q_start, rows, o_s_ref, do_ref, do_s_ref, do_l_ref, o_l_ref, den_ref, alpha_ref, delta_ref,
        c_ref, dalpha_rows_ref, cfg=cfg, fused=fused,
    )  # fmt: skip
    if cfg.linear:
        store_rows(dq_phi_ref, q_start, _dq_phi(do_l32, c, den, h_lin_ref, z_lin_ref, o_s_ref.dtype), cfg.n)


def dkv_kernel(
    *,
    # inputs
    lut_t_ref, count_ref, q_ref, k_ref, v_ref, do_ref=None, do_s_ref=None, lse_ref, delta_ref, k_phi_ref=None,
    dh_ref=None, dz_ref=None, alpha_ref=None,
    # outputs
    dk_ref, dv_ref, dk_phi_ref=None,
    # static arguments
    cfg: KernelCall, fused: bool, rows: int, phi=None,
):  # fmt: skip
    """Program (j, h, b) of grid (Nk, H, B): key block j of one (b, h). Refs of that (b, h), None where the call has
    no such input or output (attention.backward_dkv builds the lists):

    lut_t (Nk, Nq) int32, the query blocks that selected key block j (ascending), count (Nk,) int32 of them; q, k, v
    (N, D); do (N, D) (fused) or do_s (N, D); lse, delta (Npad,) float32; the linear branch (cfg.linear): k_phi
    (N, D), dh (D, D) and dz (D,) float32 (key block j's dH_j, dZ_j for the complement scope, else the totals);
    alpha (Nq,) float32 (fused). Outputs: dk, dv (N, D); dk_phi (N, D) (linear branch). phi: None, or the feature
    map: then there is no k_phi and phi(K_j) is made from the loaded K tile.
    """
    j = pl.program_id(0)
    k_start = j * cfg.block_k
    k = load_rows(k_ref, k_start, cfg.block_k, cfg.n)
    v = load_rows(v_ref, k_start, cfg.block_k, cfg.n)
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
        i = lut_t_ref[j, lax.div(t, jnp.int32(nsub))]  # (plain // and % lower badly in Triton)
        q_start = i * cfg.block_q + lax.rem(t, jnp.int32(nsub)) * bm
        rws = pl.ds(q_start, bm)
        q = load_rows(q_ref, q_start, bm, cfg.n)
        lse = lse_ref[rws]
        delta = delta_ref[rws]
        s_t = dot(k, q, trans_b=True) * qk_scale  # (block_k, bm) = S^T
        p_t = jnp.where(kvalid[:, None], jnp.exp2(s_t - lse[None, :]), 0.0)
        do = load_rows(do_ref if fused else do_s_ref, q_start, bm, cfg.n)
        x_t = dot(v, do, trans_b=True)  # (dO V^T)^T
        if fused:
            a = alpha_ref[i]
            ds_t = p_t * (a * x_t - delta[None, :])
            w_t = a * p_t
        else:
            ds_t = p_t * (x_t - delta[None, :])
            w_t = p_t
        dk = dk + dot(ds_t.astype(dt), q)
        dv = dv + dot(w_t.astype(dt), do)
        return dk, dv

    carry = lax.fori_loop(0, count_ref[j] * nsub, body, carry)
    dk, dv = carry[0] * cfg.sm_scale, carry[1]
    if cfg.linear:
        k_phi = phi_rows(phi, k) if phi is not None else load_rows(k_phi_ref, k_start, cfg.block_k, cfg.n)
        dv, dk_phi = _dkv_linear(v, dv, k_phi, dh_ref, dz_ref)
        store_rows(dk_phi_ref, k_start, dk_phi, cfg.n)
    store_rows(dk_ref, k_start, dk, cfg.n)
    store_rows(dv_ref, k_start, dv, cfg.n)



def _dkv_linear(v, dv, k_phi, dh_ref, dz_ref):
    """Linear part of key block j, after the sparse loop (keeps its D x D operands out of the pipelined loop's
    shared memory): (dV + phi(K_j) dH_j, dphi(K_j) = V_j dH_j^T + dZ_j float32), k_phi the (block_k, D) tile
    phi(K_j), with dH_j, dZ_j over the query blocks that did not select j (complement) or over all of them (scope
    "all")."""
    dt = v.dtype
    dh = dh_ref[...]
    dk_phi = dot_mat(v, dh, dt, trans_b=True) + dz_ref[...][None, :]
    return dv + dot_mat(k_phi, dh, dt), dk_phi


def dkv_linear_kernel(*, v_ref, k_phi_ref, dh_ref, dz_ref, dv_ref, dk_phi_ref, cfg: KernelCall, phi=None,
                      dv_s_ref=None):
    """Program (j, h, b) of grid (Nk, H, B): the linear part of key block j for a sparse dK, dV computed elsewhere
    (the Mosaic dK/dV kernel): dv = dv_s + phi(K_j) dH_j and dphi(K_j) = V_j dH_j^T + dZ_j. Refs of one (b, h): v,
    dv_s (None: dv = phi(K_j) dH_j alone, for the Mosaic kernel to add), k_phi (N, D); dh (D, D) and dz (D,)
    float32 (key block j's, or the totals); outputs dv, dk_phi (N, D). phi: None, or the feature map: then k_phi
    holds K's rows and phi(K_j) is made here."""
    k_start = pl.program_id(0) * cfg.block_k
    v = load_rows(v_ref, k_start, cfg.block_k, cfg.n)
    dv_s = 0.0 if dv_s_ref is None else load_rows(dv_s_ref, k_start, cfg.block_k, cfg.n).astype(F32)
    k_phi = load_rows(k_phi_ref, k_start, cfg.block_k, cfg.n)
    if phi is not None:
        k_phi = phi_rows(phi, k_phi)
    dv, dk_phi = _dkv_linear(v, dv_s, k_phi, dh_ref, dz_ref)
    store_rows(dv_ref, k_start, dv, cfg.n)
    store_rows(dk_phi_ref, k_start, dk_phi, cfg.n)
