"""The forward kernels in Pallas Triton (any CUDA GPU; on CPU in interpret mode): bf16 / f16 / f32 and low bit.

Notation (per batch b and head h): Q, K, V, phi(Q), phi(K) are N x D; query blocks of ``block_q`` rows
(Nq = ceil(N / block_q)), key blocks of ``block_k`` rows (Nk = ceil(N / block_k)); ``lut[b, h, i]`` lists the
``topk`` key blocks that query block i attends to exactly (ascending, no duplicates).

  sparse branch   O_s[i] = softmax(Q_i K_sel^T * sm_scale) V_sel            (keys >= N never attended)
  linear branch   O_l[i] = phi(Q_i) H_i / (phi(Q_i) Z_i + eps), H_i, Z_i from linear_states.py
  SLA2 combine    O = alpha * O_s + (1 - alpha) * O_l, alpha one value per (b, h, query block)

* ``fwd_kernel``, grid (Nq, H, B) (the block index fastest, so the programs of one head run together and its K, V
  stay in L2). Program (i, h, b) loads Q_i (block_q x D) once, then for each of the topk LUT blocks j: loads K_j,
  V_j, S = Q_i K_j^T (exp2 online softmax with m_i, l_i, acc in f32), acc += P V_j. Epilogue: O_s = acc / l_i,
  LSE = m_i + log2 l_i (base 2), den = phi(Q_i) Z_i + eps, O_l = phi(Q_i) H_i / den, the SLA2 combine when fused.
  Flop per program: topk * 4 * block_q * block_k * D + 4 * block_q * D^2. Bytes per program: topk * block_k * D *
  2 * itemsize of K/V (L2-resident in practice) + the Q, phi(Q), H_i and output tiles. The f32 D x D products run
  on bf16 tensor cores as hi + lo bf16 parts of the f32 matrix (~2^-16 relative) for 16-bit inputs.
* ``linear_epilogue_kernel``, grid (Nq, H, B): the epilogue alone, for a sparse output computed by the Mosaic
  forward (KernelConfig.epilogue "triton", or float32 states).
* ``lowbit_fwd_kernel``, grid (Nq, H, B): the forward with S = (Q8 K8~^T)[int32 -> f32] * s_q * s_k (INT8 Q and
  smoothed K, one scale per block) and P V in q's dtype, or in FP8 e4m3 for "int8_fp8" (P * 448, V^T per-channel
  scales); the LSE gets q . mean_N(K) back so the 16-bit backward can use it.

Ragged N: every tile load/store is masked by row (< N); keys >= N get score -1e30 and zero phi(K), V.
Launched by attention.py; launch parameters from the call's KernelConfig.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ._triton import pl, plgpu
from .common import F32, LOG2E, MASK_VALUE, KernelCall, dot, dot_mat, load_rows, scores, store_rows
from .quantize import FP8_MAX, _quantize_tile

_FP8 = jnp.float8_e4m3fn


def _initial_carry(cfg: KernelCall):
    """Loop state of the forward kernels (bf16 and low bit): acc (block_q, D), running max m and sum l (block_q,),
    all float32."""
    return (
        jnp.zeros((cfg.block_q, cfg.d), F32),
        jnp.full((cfg.block_q,), -jnp.inf, F32),
        jnp.zeros((cfg.block_q,), F32),
    )


def fwd_kernel(
    *,
    # inputs
    lut_ref, q_ref, k_ref, v_ref, q_phi_ref=None, h_lin_ref=None, z_lin_ref=None, alpha_ref=None,
    # outputs
    o_ref=None, o_s_ref=None, o_l_ref=None, lse_ref=None, den_ref=None,
    # static arguments
    cfg: KernelCall, fused: bool, unroll: int = 1,
):  # fmt: skip
    """Program (i, h, b) of grid (Nq, H, B): query block i of one (b, h). Refs of that (b, h), None where the call
    has no such input or output (attention.forward builds the lists):

    lut (Nq, topk) int32; q, k, v (N, D); the linear branch (cfg.linear): q_phi (N, D) and its states h_lin (D, D),
    z_lin (D,) float32 (this query block's H_i, Z_i for the complement scope, else the totals); alpha (Nq,) float32
    (fused).
    Outputs: o (N, D) (fused); o_s and o_l (N, D) (branches, or as residuals; o_l with a linear branch); lse and
    den (block_q,) float32 (residuals; den with a linear branch).
    """
    i = pl.program_id(0)
    q_start = i * cfg.block_q
    q = load_rows(q_ref, q_start, cfg.block_q, cfg.n)

    carry = _initial_carry(cfg)

    def step(ts, carry):
        """One online-softmax update over the LUT entries ts (1 or more key blocks: one rescale of acc)."""
        acc, m_i, l_i = carry
        js = [lut_ref[i, t] for t in ts]
        starts = [j * cfg.block_k for j in js]
        ks = [load_rows(k_ref, st, cfg.block_k, cfg.n) for st in starts]
        vs = [load_rows(v_ref, st, cfg.block_k, cfg.n) for st in starts]
        ss = [scores(q, k, st, cfg) for k, st in zip(ks, starts)]
        m_new = m_i
        for s in ss:
            m_new = jnp.maximum(m_new, jnp.max(s, axis=1))
        correction = jnp.exp2(m_i - m_new)
        l_i = l_i * correction
        acc = acc * correction[:, None]
        for s, v in zip(ss, vs):
            p = jnp.exp2(s - m_new[:, None])
            l_i = l_i + jnp.sum(p, axis=1)
            acc = acc + dot(p.astype(v.dtype), v)
        return acc, m_new, l_i

    # `unroll` LUT entries per loop step (launch table), then the remainder one at a time.
    n_main = cfg.topk // unroll
    carry = lax.fori_loop(0, n_main, lambda t, c: step([t * unroll + u for u in range(unroll)], c), carry)
    if cfg.topk % unroll:
        carry = lax.fori_loop(n_main * unroll, cfg.topk, lambda t, c: step([t], c), carry)
    acc, m_i, l_i = carry
    if lse_ref is not None:
        lse_ref[...] = m_i + jnp.log2(l_i)
    store_forward_outputs(
        i, acc / l_i[:, None], q_phi_ref, h_lin_ref, z_lin_ref, alpha_ref, o_ref, o_s_ref, o_l_ref, den_ref,
        cfg=cfg, fused=fused,
    )  # fmt: skip


def store_forward_outputs(
    i, o_s, q_phi_ref, h_lin_ref, z_lin_ref, alpha_ref, o_ref, o_s_ref, o_l_ref, den_ref, *, cfg: KernelCall,
    fused: bool,
):  # fmt: skip
    """Epilogue of the forward kernels (bf16 and low bit): the linear branch of query block i from its states, the
    SLA2 combine, and the stores of o / o_s, o_l, den (whichever refs are not None).

    o_s: (block_q, D) float32; h_lin_ref, z_lin_ref hold this block's H_i, Z_i (complement) or the totals."""
    q_start = i * cfg.block_q
    o_l = None
    if cfg.linear:
        q_phi = load_rows(q_phi_ref, q_start, cfg.block_q, cfg.n)
        h = h_lin_ref[...]
        z = z_lin_ref[...][None, :]
        q_phi32 = q_phi.astype(F32)
        den = jnp.sum(q_phi32 * z, axis=1) + cfg.eps
        o_l = dot_mat(q_phi32, h, q_phi.dtype) / den[:, None]
        if den_ref is not None:
            den_ref[...] = den
    if fused:
        a = alpha_ref[i]
        o = a * o_s if o_l is None else a * o_s + (1.0 - a) * o_l
        store_rows(o_ref, q_start, o, cfg.n)
    if o_s_ref is not None:
        store_rows(o_s_ref, q_start, o_s, cfg.n)
    if o_l_ref is not None:
        store_rows(o_l_ref, q_start, o_l, cfg.n)


def linear_epilogue_kernel(
    *,
    # inputs
    o_s_in_ref, q_phi_ref=None, h_lin_ref=None, z_lin_ref=None, alpha_ref=None,
    # outputs
    o_ref=None, o_l_ref=None, den_ref=None,
    # static arguments
    cfg: KernelCall, fused: bool,
):  # fmt: skip
    """Program (i, h, b) of grid (Nq, H, B): the epilogue of fwd_kernel alone (linear branch, SLA2 combine, stores)
    for a sparse output computed elsewhere (the Mosaic GPU forward, which also stores o_s and lse). Refs as
    fwd_kernel's, with the input o_s_in (N, D) (that sparse output) in place of lut, q, k, v."""
    i = pl.program_id(0)
    o_s = load_rows(o_s_in_ref, i * cfg.block_q, cfg.block_q, cfg.n).astype(F32)
    store_forward_outputs(
        i, o_s, q_phi_ref, h_lin_ref, z_lin_ref, alpha_ref, o_ref, None, o_l_ref, den_ref, cfg=cfg, fused=fused
    )


def _int8_scores(q8, k8, scale, k_start, cfg: KernelCall):
    """S = (q8 k8^T)[int32 -> float32] * scale, float32 (block_q, block_k); keys >= N masked."""
    dims = (((1,), (1,)), ((), ()))  # transposed-B: both operands K-major
    s = lax.dot_general(q8, k8, dims, preferred_element_type=jnp.int32).astype(F32) * scale
    kvalid = (k_start + jnp.arange(cfg.block_k)) < cfg.n
    return jnp.where(kvalid[None, :], s, MASK_VALUE)


def _load_int8_rows(ref, start, size, n):
    """Rows [start, start + size) of an (N, D) int8 ref; rows >= N read as 0."""
    d = ref.shape[-1]
    rows = start + jnp.arange(size)
    mask = jnp.broadcast_to((rows < n)[:, None], (size, d))
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=mask, other=0)


def _query_tile(q8_ref, q_scale_ref, q_ref, i, q_start, cfg: KernelCall):
    """This program's int8 Q tile and its scale (from the pre-pass, or quantised here)."""
    if q8_ref is not None:
        return _load_int8_rows(q8_ref, q_start, cfg.block_q, cfg.n), q_scale_ref[i]
    q32 = load_rows(q_ref, q_start, cfg.block_q, cfg.n).astype(F32)  # rows >= N are 0: amax unchanged
    return _quantize_tile(q32, cfg.interpret)


def lowbit_fwd_kernel(
    *,
    # inputs
    lut_ref, q8_ref=None, q_scale_ref=None, q_ref=None, k8_ref, k_scale_ref, k_mean_ref=None, v8t_ref=None,
    v_scale_ref=None, v_ref=None, q_phi_ref=None, h_lin_ref=None, z_lin_ref=None, alpha_ref=None,
    # outputs
    o_ref=None, o_s_ref=None, o_l_ref=None, lse_ref=None, den_ref=None,
    # static arguments
    cfg: KernelCall, fused: bool, fp8: bool,
):  # fmt: skip
    """Program (i, h, b) of grid (Nq, H, B): query block i of one (b, h) with INT8 scores. Refs of that (b, h),
    None where the call has no such input or output (attention.forward_lowbit_triton builds the lists):

    lut (Nq, topk) int32; Q as q8 (N, D) int8 with q_scale (Nq,) float32 (quantised before), and/or q (N, D) (then
    quantised here when q8 is absent, and read for the LSE shift when lse is stored); k8 (N, D) int8, the smoothed
    keys K~ = K - mean, with k_scale (Nk,) float32 per key block; k_mean (D,) float32 (with lse); the values as
    v (N, D) (P V in q's dtype) or, with fp8, v8t (D, Nk * block_k) e4m3 (V^T, zero past N) and v_scale (D,)
    float32 per channel; the linear branch and alpha as fwd_kernel's. Outputs as fwd_kernel's.
    """
    i = pl.program_id(0)
    q_start = i * cfg.block_q
    q8, s_q = _query_tile(q8_ref, q_scale_ref, q_ref, i, q_start, cfg)
    qk_scale = s_q * (cfg.sm_scale * LOG2E)

    carry = _initial_carry(cfg)

    def body(t, carry):
        acc, m_i, l_i = carry
        j = lut_ref[i, t]
        k_start = j * cfg.block_k
        k8 = _load_int8_rows(k8_ref, k_start, cfg.block_k, cfg.n)
        s = _int8_scores(q8, k8, qk_scale * k_scale_ref[j], k_start, cfg)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        correction = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_i = l_i * correction + jnp.sum(p, axis=1)
        v = load_rows(v_ref, k_start, cfg.block_k, cfg.n) if v_ref is not None else None
        if fp8:
            v8t = v8t_ref[:, pl.ds(k_start, cfg.block_k)]  # (D, block_k), zero-padded past N
            p8 = (p * FP8_MAX).astype(_FP8)
            pv = lax.dot_general(p8, v8t, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        else:
            pv = dot(p.astype(v.dtype), v)
        return acc * correction[:, None] + pv, m_new, l_i

    carry = lax.fori_loop(0, cfg.topk, body, carry)
    acc, m_i, l_i = carry
    if fp8:
        acc = acc * (v_scale_ref[...] * (1.0 / FP8_MAX))[None, :]
    o_s = acc / l_i[:, None]
    # The scores used the smoothed K~ = K - mean: softmax is unchanged, but the LSE is shifted by q . mean per
    # row. Add it back so that the bf16 backward (which recomputes S from the unsmoothed K) sees a consistent LSE.
    if lse_ref is not None:
        q32 = load_rows(q_ref, q_start, cfg.block_q, cfg.n).astype(F32)
        shift = jnp.sum(q32 * k_mean_ref[...][None, :], axis=1) * (cfg.sm_scale * LOG2E)
        lse_ref[...] = m_i + jnp.log2(l_i) + shift
    store_forward_outputs(
        i, o_s, q_phi_ref, h_lin_ref, z_lin_ref, alpha_ref, o_ref, o_s_ref, o_l_ref, den_ref, cfg=cfg, fused=fused
    )
