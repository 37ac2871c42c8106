"""SLA / SLA2 fused sparse + linear attention: Pallas GPU kernels (Triton backend), forward and backward.

Notation (per batch b and head h): Q, K, V, phi(Q), phi(K) are N x D; query blocks of ``block_q`` rows
(Nq = ceil(N / block_q)), key blocks of ``block_k`` rows (Nk = ceil(N / block_k)); ``lut[b, h, i]`` lists the
``topk`` key blocks that query block i attends to exactly (ascending, no duplicates).

  sparse branch   O_s[i] = softmax(Q_i K_sel^T * sm_scale) V_sel            (keys >= N never attended)
  linear branch   H_i = sum_{j unselected} phi(K_j)^T V_j,  Z_i = sum_{j unselected} colsum phi(K_j)
                  O_l[i] = phi(Q_i) H_i / (phi(Q_i) Z_i + eps)               ("complement", SLA paper form)
                  H, Z over all keys for linear_scope="all" (SLA `main` form)
  SLA2 combine    O = alpha * O_s + (1 - alpha) * O_l, alpha one value per (b, h, query block)

Kernels (all grids are (blocks, H, B) with the block index fastest, so the programs of one head run together
and that head's K, V, phi(K) stay in L2). Launch configurations: launch_config.py (autotuned per GPU generation).

* ``_outer_sum_kernel`` (pre-pass and gradient totals), grid (ceil(N / 1024), H, B), split-K over row chunks:
  H_tot = phi(K)^T V (D x D, f32), Z_tot = colsum phi(K); the chunk partials are added by XLA. 2*N*D^2 flop and
  one read of phi(K), V per head. The per-key-block colsums z_j (B, H, Nk, D) come from one XLA reduction.
* ``_fwd_kernel``, grid (Nq, H, B). Program (i, h, b) loads Q_i (block_q x D) once, then for each of the topk
  LUT blocks j: loads K_j, V_j (and phi(K_j), z_j for "complement"), S = Q_i K_j^T (exp2 online softmax with
  m_i, l_i, acc in f32), acc += P V_j, and G += phi(K_j)^T V_j, z += z_j (the selected part of H, Z).
  At the end H_i = H_tot - G, Z_i = Z_tot - z, O_l = phi(Q_i) H_i / (phi(Q_i) Z_i + eps), O_s = acc / l_i,
  LSE = m_i + log2 l_i (base 2), den = phi(Q_i) Z_i + eps; SLA2 combine in-kernel when fused.
  Flop per program: topk * (4 * block_q * block_k * D  [+ 2 * block_k * D^2 "complement"]) + 4 * block_q * D^2.
  Bytes per program: topk * block_k * D * (2 [+1]) * itemsize of K/V/phi(K) (L2-resident in practice) + the
  Q, phi(Q) and output tiles. The f32 D x D products (phi(Q) H_i here, and the totals in the backward) run on
  bf16 tensor cores as hi + lo bf16 parts of the f32 matrix (~2^-16 relative) for 16-bit inputs.
* ``_dq_kernel``, grid (Npad / rows, H, B): per sub-block of ``rows`` query rows of query block i,
  delta = rowsum(dO_s * O_s), c = rowsum(dO_l * O_l) (and rowsum(dO * (O_s - O_l)) for d alpha), and over the
  LUT of block i: P = exp2(S - LSE), dS = P * (dO_s V^T - delta), dQ += dS K; linear branch
  dphi(Q) = dO_l / den @ H_i^T - c / den * Z_i, with the selected part folded into the loop as
  -sum_j ((dO_l V_j^T - c) / den) phi(K_j).  3 (+1) rows x block_k x D matmuls per LUT entry (in the fused
  form dO_s V^T and dO_l V^T are alpha and 1 - alpha times one product).
* ``_dkv_kernel``, grid (Nk, H, B): per key block j, over the ``rows``-row sub-blocks of the query blocks that
  selected it (transposed LUT and counts built on device: comparison, running count, one scatter), keys as rows
  (S^T = K_j Q^T, so no computed tile is transposed): dV += P^T dO_s, dK += dS^T Q; linear branch: subtracts the
  selected query blocks, dV -= (phi~_i phi(K_j)^T)^T dO_l, dphi(K_j) -= (dO_l V_j^T - c)^T phi~_i
  (phi~ = phi(Q) / den), then after the loop adds the totals: dV += phi(K_j) dH_tot,
  dphi(K_j) += V_j dH_tot^T + dZ_tot (dH_tot = phi~(Q)^T dO_l, dZ_tot = -phi~(Q)^T c over all queries, by
  ``_outer_sum_kernel``).  4 (+2..3) block_k x rows x D matmuls per step.

Complement scope, default (OPTIONS "blocks", the description above is the "loop" form): the selected part of the
linear branch leaves the loops. Before the forward, ``_complement_states`` builds H_i, Z_i per query block (per-key-
block outer sums phi(K_j)^T V_j, stored for 16-bit inputs as float16 with one power-of-two scale per block, then
one masked cuBLAS matmul over the unselected blocks, the scales folded into the 0/1 mask); the
forward kernel reads H_i instead of accumulating G, and the dq kernel reuses H_i (residual). Before the dkv kernel,
``_backward_totals`` builds dH_j, dZ_j per key block the same way from per-query-block sums phi~_i^T dO_l,i. Extra
work: 2 * 2 * Nq * Nk * D^2 flop per head and matmul (dense in the mask, independent of topk), extra memory
(B, H, Nk, D, D) float32 in the backward and the (B, H, Nq, D, D) float32 residual.

Mosaic GPU kernels on Hopper (OPTIONS "fwd_kernel" / "bwd_kernel"): the sparse loops can run in warp-specialised
Mosaic GPU kernels instead (sparse_mosaic.py forward; sparse_mosaic_dq.py, sparse_mosaic_dkv.py backward). The rest
stays here as small Triton kernels without a LUT loop: ``_linear_epilogue_kernel`` (linear branch + combine after
the Mosaic forward when OPTIONS "fwd_epilogue" is "triton" or the states are float32; by default the Mosaic forward
does them in its own epilogue), ``_dq_linear_kernel`` (delta, c, d alpha rows and dphi(Q) before the Mosaic dQ kernel, which
takes delta) and ``_dkv_linear_kernel`` (dV += phi(K_j) dH_j and dphi(K_j) after the Mosaic dK/dV kernel).

Ragged N: every tile load/store is masked by row (< N); keys >= N get score -1e30 and zero phi(K), V.
The phi Jacobian, alpha's parametrisation and the router are left to JAX autodiff around these functions.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._triton import CompilerParams, pl, plgpu
from .launch_config import gpu_generation, launch_config

_MASK_VALUE = -1e30
_LOG2E = math.log2(math.e)
_F32 = jnp.float32
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_SUPPORTED_HEAD_DIMS = (32, 64, 128)


class _Cfg(NamedTuple):
    """Static configuration of one call (hashable: it is a nondiff argument of the custom_vjp)."""

    n: int
    nq: int
    nk: int
    topk: int
    d: int
    block_q: int
    block_k: int
    sm_scale: float
    eps: float
    linear: bool  # the linear branch is non-empty
    complement: bool  # linear branch over the unselected blocks only (else over all keys)
    interpret: bool

    @property
    def npad(self) -> int:
        return self.nq * self.block_q

    @property
    def track_lin(self) -> bool:
        return self.linear and self.complement


# ----------------------------------------------------------------------------------------------------------
# In-kernel helpers
# ----------------------------------------------------------------------------------------------------------
def _dot(a, b, trans_a=False, trans_b=False):
    """a @ b (optionally transposed operands) with float32 accumulation (pl.dot is gone in jax 0.12)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _dot_mat(x, m, like, trans_b=False):
    """x (rows, D) @ m (D, D) float32 matrix (m^T if trans_b). For 16-bit inputs (``like``) on the bf16 tensor
    cores: x rounded to bf16 (like the data itself), m split into bf16 hi + lo parts (~2^-16 relative)."""
    if jnp.dtype(like) == jnp.dtype(jnp.float32):
        return _dot(x.astype(_F32), m, trans_b=trans_b)
    xb = x.astype(jnp.bfloat16)
    if m.dtype == jnp.bfloat16:  # per-block states stored in bf16 (OPTIONS["state_dtype"])
        return _dot(xb, m, trans_b=trans_b)
    m_hi = m.astype(jnp.bfloat16)
    m_lo = (m - m_hi.astype(_F32)).astype(jnp.bfloat16)
    return _dot(xb, m_hi, trans_b=trans_b) + _dot(xb, m_lo, trans_b=trans_b)


def _load_rows(ref, start, size, n):
    """Loads rows [start, start + size) of an (N, D) ref; rows >= N read as 0."""
    d = ref.shape[-1]
    rows = start + jnp.arange(size)
    mask = jnp.broadcast_to((rows < n)[:, None], (size, d))
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=mask, other=0.0)


def _store_rows(ref, start, val, n):
    size, d = val.shape
    rows = start + jnp.arange(size)
    mask = jnp.broadcast_to((rows < n)[:, None], (size, d))
    plgpu.store(ref.at[pl.ds(start, size), :], val.astype(ref.dtype), mask=mask)


def _scores(q, k, k_start, cfg):
    """S = Q K^T * sm_scale * log2(e) (base-2 logits); keys >= N masked."""
    s = _dot(q, k, trans_b=True) * (cfg.sm_scale * _LOG2E)
    kvalid = (k_start + jnp.arange(cfg.block_k)) < cfg.n
    return jnp.where(kvalid[None, :], s, _MASK_VALUE)


# ----------------------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------------------
def _initial_carry(cfg: _Cfg, lin_in_loop: bool):
    """Loop state of the forward kernels (bf16 and low bit): acc (block_q, D), running max m and sum l (block_q,),
    all float32, plus G (D, D) and z_sel (1, D) when the loop accumulates the complement's selected part."""
    carry = (
        jnp.zeros((cfg.block_q, cfg.d), _F32),
        jnp.full((cfg.block_q,), -jnp.inf, _F32),
        jnp.zeros((cfg.block_q,), _F32),
    )
    if lin_in_loop:
        carry += (jnp.zeros((cfg.d, cfg.d), _F32), jnp.zeros((1, cfg.d), _F32))
    return carry


def _fwd_kernel(*refs, names, cfg: _Cfg, fused: bool, unroll: int = 1, lin_in_loop: bool | None = None):
    r = dict(zip(names, refs))
    lin_in_loop = cfg.track_lin if lin_in_loop is None else lin_in_loop
    i = pl.program_id(0)
    q_start = i * cfg.block_q
    q = _load_rows(r["q"], q_start, cfg.block_q, cfg.n)

    carry = _initial_carry(cfg, lin_in_loop)

    def step(ts, carry):
        """One online-softmax update over the LUT entries ts (1 or more key blocks: one rescale of acc)."""
        acc, m_i, l_i = carry[:3]
        js = [r["lut"][i, t] for t in ts]
        starts = [j * cfg.block_k for j in js]
        ks = [_load_rows(r["k"], st, cfg.block_k, cfg.n) for st in starts]
        vs = [_load_rows(r["v"], st, cfg.block_k, cfg.n) for st in starts]
        ss = [_scores(q, k, st, cfg) for k, st in zip(ks, starts)]
        m_new = m_i
        for s in ss:
            m_new = jnp.maximum(m_new, jnp.max(s, axis=1))
        correction = jnp.exp2(m_i - m_new)
        l_i = l_i * correction
        acc = acc * correction[:, None]
        for s, v in zip(ss, vs):
            p = jnp.exp2(s - m_new[:, None])
            l_i = l_i + jnp.sum(p, axis=1)
            acc = acc + _dot(p.astype(v.dtype), v)
        out = (acc, m_new, l_i)
        if lin_in_loop:
            g, z_sel = carry[3:]
            for j, st, v in zip(js, starts, vs):
                k_phi = _load_rows(r["k_phi"], st, cfg.block_k, cfg.n)
                g = g + _dot(k_phi, v, trans_a=True)
                z_sel = z_sel + r["z_blk"][pl.ds(j, 1), :]  # precomputed colsum phi(K_j): no cross-warp reduction
            out += (g, z_sel)
        return out

    # `unroll` LUT entries per loop step (launch table), then the remainder one at a time.
    n_main = cfg.topk // unroll
    carry = lax.fori_loop(0, n_main, lambda t, c: step([t * unroll + u for u in range(unroll)], c), carry)
    if cfg.topk % unroll:
        carry = lax.fori_loop(n_main * unroll, cfg.topk, lambda t, c: step([t], c), carry)
    acc, m_i, l_i = carry[:3]
    if "lse" in r:
        r["lse"][...] = m_i + jnp.log2(l_i)
    _store_forward_outputs(r, i, acc / l_i[:, None], carry[3:] if lin_in_loop else None, cfg, fused)


def _store_forward_outputs(r, i, o_s, selected, cfg: _Cfg, fused: bool):
    """Epilogue of the forward kernels (bf16 and low bit): the linear branch of query block i from its states, the
    SLA2 combine, and the stores of o / o_s, o_l, den (whichever outputs the call has).

    o_s: (block_q, D) float32. selected: (G, z_sel) accumulated over the LUT when the states are the totals
    (B, H, D, D) / (B, H, D) ("loop" form), None when h_tot, z_tot already hold this block's H_i, Z_i."""
    q_start = i * cfg.block_q
    o_l = None
    if cfg.linear:
        q_phi = _load_rows(r["q_phi"], q_start, cfg.block_q, cfg.n)
        h = r["h_tot"][...]
        z = r["z_tot"][...][None, :]
        if selected is not None:
            h = h - selected[0]
            z = z - selected[1]
        q_phi32 = q_phi.astype(_F32)
        den = jnp.sum(q_phi32 * z, axis=1) + cfg.eps
        o_l = _dot_mat(q_phi32, h, q_phi.dtype) / den[:, None]
        if "den" in r:
            r["den"][...] = den
    if fused:
        a = r["alpha"][i]
        o = a * o_s if o_l is None else a * o_s + (1.0 - a) * o_l
        _store_rows(r["o"], q_start, o, cfg.n)
    if "o_s" in r:
        _store_rows(r["o_s"], q_start, o_s, cfg.n)
    if "o_l" in r:
        _store_rows(r["o_l"], q_start, o_l, cfg.n)


# ----------------------------------------------------------------------------------------------------------
# BlockSpecs (grid (blocks, H, B))
# ----------------------------------------------------------------------------------------------------------
def _seq_spec(cfg):  # (B, N, H, D) -> the whole (N, D) of one (b, h)
    return pl.BlockSpec((None, cfg.n, None, cfg.d), lambda i, h, b: (b, 0, h, 0))


def _row_spec(cfg):  # (B, H, Npad) -> this program's block_q rows
    return pl.BlockSpec((None, None, cfg.block_q), lambda i, h, b: (b, h, i))


def _full_spec(*tail):  # (B, H, *tail) -> the whole tail of one (b, h)
    nt = len(tail)
    return pl.BlockSpec((None, None) + tuple(tail), lambda i, h, b: (b, h) + (0,) * nt)


def _params(kernel, cfg):
    num_warps, num_stages, _ = launch_config(kernel, cfg.d, cfg.block_q, cfg.block_k)
    return CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rows(kernel, cfg):
    """Query rows per step of the backward kernels (a divisor of block_q, from the launch table)."""
    return max(16, min(cfg.block_q, launch_config(kernel, cfg.d, cfg.block_q, cfg.block_k)[2]))


def _call(kernel, grid, inputs, outputs, cfg, name, launch):
    """inputs/outputs: lists of (name, array or ShapeDtypeStruct, BlockSpec)."""
    names = tuple(x[0] for x in inputs) + tuple(x[0] for x in outputs)
    return pl.pallas_call(
        functools.partial(kernel, names=names, cfg=cfg, **launch),
        grid=grid,
        in_specs=[x[2] for x in inputs],
        out_specs=[x[2] for x in outputs],
        out_shape=[x[1] for x in outputs],
        compiler_params=_params(name, cfg),
        interpret=cfg.interpret,
        name=f"sla_{name}",
    )(*[x[1] for x in inputs])


def _pow2_scale(amax):
    """s = 2^(e - 13) for amax in [2^e, 2^(e+1)) (e clipped to [-11, 28]): a power of two (exact in float16 and in
    every product with it) such that x / s is in (-2^14, 2^14) for |x| <= amax (float16 holds up to 65504)."""
    e = lax.shift_right_logical(lax.bitcast_convert_type(amax, jnp.int32), 23)  # biased exponent (amax >= 0)
    e_s = jnp.clip(e - 13, 127 - 24, 127 + 15)
    s = lax.bitcast_convert_type(lax.shift_left(e_s, 23), _F32)
    inv_s = lax.bitcast_convert_type(lax.shift_left(254 - e_s, 23), _F32)
    return s, inv_s


def _outer_sum_kernel(*refs, names, cfg: _Cfg, chunk: int, block: int, weighted: bool, scaled: bool):
    """Program (c, h, b): rows [c*chunk, (c+1)*chunk) of X, Y -> sum_r w_r X_r^T Y_r (D x D), sum_r u_r X_r.
    scaled: the D x D sum is stored as h / s in float16 with s (a power of two, see _pow2_scale) in output "s"."""
    r = dict(zip(names, refs))
    start0 = pl.program_id(0) * chunk

    def body(t, carry):
        h, z = carry
        start = start0 + t * block
        x = _load_rows(r["x"], start, block, cfg.n)
        y = _load_rows(r["y"], start, block, cfg.n)
        x32 = x.astype(_F32)
        if weighted:
            w = r["w"][pl.ds(t * block, block)]
            u = r["u"][pl.ds(t * block, block)]
            h = h + _dot((x32 * w[:, None]).astype(x.dtype), y, trans_a=True)
            z = z + jnp.sum(x32 * u[:, None], axis=0)
        else:
            h = h + _dot(x, y, trans_a=True)
            z = z + jnp.sum(x32, axis=0)
        return h, z

    h, z = lax.fori_loop(0, chunk // block, body, (jnp.zeros((cfg.d, cfg.d), _F32), jnp.zeros((cfg.d,), _F32)))
    if scaled:
        s, inv_s = _pow2_scale(jnp.max(jnp.max(jnp.abs(h), axis=1), axis=0))
        r["h"][...] = (h * inv_s).astype(jnp.float16)
        r["s"][...] = jnp.full((cfg.d,), s, _F32)
    else:
        r["h"][...] = h
    r["z"][...] = z


_SUM_CHUNK, _SUM_BLOCK = 1024, 128


def _outer_sum(x, y, cfg: _Cfg, w=None, u=None, block_rows=None):
    """sum over rows of (w_r x_r)^T y_r -> (B, H, D, D) and of u_r x_r -> (B, H, D), float32.

    Grid (C, H, B), C = ceil(N / 1024) chunks of rows (split-K: B*H alone is too few programs to fill the GPU);
    the C partial sums are added by XLA. Flop 2*N*D^2 per head; bytes: one read of x and y.
    w, u: optional (B, H, >= N) per-row float32 weights (both or neither).
    block_rows: if given, one sum per block of that many rows instead (no reduction over the blocks): the input of
    _sum_over_blocks, a _BlockSums of C = ceil(N / block_rows) blocks.
    """
    b, n, h, d = x.shape
    if block_rows is None:
        chunk = min(_SUM_CHUNK, max(_SUM_BLOCK, pl.next_power_of_2(n)))
    else:
        chunk = block_rows
    nc = -(-n // chunk)
    seq = _seq_spec(cfg)
    inputs = [("x", x, seq), ("y", y, seq)]
    weighted = w is not None
    if weighted:
        pad = lambda a: jnp.pad(a[:, :, :n].astype(_F32), ((0, 0), (0, 0), (0, nc * chunk - n)))
        rows = pl.BlockSpec((None, None, chunk), lambda c, hh, bb: (bb, hh, c))
        inputs += [("w", pad(w), rows), ("u", pad(u), rows)]
    scaled = block_rows is not None and jnp.dtype(x.dtype) != jnp.dtype(_F32)
    vec = (
        jax.ShapeDtypeStruct((b, h, nc, d), _F32),
        pl.BlockSpec((None, None, None, d), lambda c, hh, bb: (bb, hh, c, 0)),
    )
    outputs = [
        (
            "h",
            jax.ShapeDtypeStruct((b, h, nc, d, d), jnp.float16 if scaled else _F32),
            pl.BlockSpec((None, None, None, d, d), lambda c, hh, bb: (bb, hh, c, 0, 0)),
        ),
        ("z", *vec),
    ]
    if scaled:
        outputs.append(("s", *vec))
    sums = _call(
        _outer_sum_kernel,
        (nc, h, b),
        inputs,
        outputs,
        cfg,
        "sum",
        dict(chunk=chunk, block=min(chunk, _SUM_BLOCK), weighted=weighted, scaled=scaled),
    )
    if block_rows is not None:
        return _BlockSums(sums[0], sums[1], sums[2][..., 0] if scaled else None)
    return jnp.sum(sums[0], axis=2), jnp.sum(sums[1], axis=2)


class _BlockSums(NamedTuple):
    """Per-block outer sums (from _outer_sum with block_rows), C blocks: h (B, H, C, D, D), z (B, H, C, D) float32.
    For 16-bit inputs h is float16 and holds h / scale with scale (B, H, C) a power of two per block (~2^-11
    relative, the input's own precision is 2^-8 / 2^-11); for float32 inputs h is float32 and scale is None."""

    h: jax.Array
    z: jax.Array
    scale: jax.Array | None


def _sum_over_blocks(mask, sums: _BlockSums):
    """out[m] = sum_c mask[m, c] h[c] (and the same for z), per (b, h).

    mask (B, H, M, C) bool -> (B, H, M, D, D) float32 (bf16 for float16 sums if OPTIONS["state_dtype"] says so),
    (B, H, M, D) float32. One dense batched matmul in XLA (cuBLAS) contracting over the blocks with float32
    accumulation; for float16 sums the mask carries the per-block scale (a power of two: exact); z (small) in float32.
    """
    b, nh, c, d, _ = sums.h.shape
    h_flat = sums.h.reshape(b, nh, c, d * d)
    if sums.scale is None:
        weights, precision = mask.astype(_F32), lax.Precision.HIGHEST
    else:
        weights, precision = jnp.where(mask, sums.scale[:, :, None, :], 0.0).astype(jnp.float16), None
    h_out = jnp.einsum("bhmc,bhcf->bhmf", weights, h_flat, precision=precision, preferred_element_type=_F32)
    if sums.scale is not None and OPTIONS["state_dtype"] == "bfloat16":
        h_out = h_out.astype(jnp.bfloat16)
    z_out = jnp.einsum("bhmc,bhcd->bhmd", mask.astype(_F32), sums.z, precision=lax.Precision.HIGHEST)
    return h_out.reshape(b, nh, -1, d, d), z_out


# Where the selected part of the complement linear branch is handled (sparse_linear.OPTIONS, read at trace time):
#   "blocks": per-block states before the kernels, from per-block outer sums (_outer_sum with block_rows) and one
#             dense masked matmul (cuBLAS): forward H_i, Z_i = sums over the key blocks that query block i did not
#             select (kept as residuals, (B, H, Nq, D, D) + (B, H, Nq, D) float32 in place of H_tot, Z_tot, so the
#             dq kernel reuses them), backward dH_j, dZ_j = sums over the query blocks that did not select key
#             block j of phi~_i^T dO_l,i and -phi~_i^T c_i. The fwd / dq / dkv loops are then sparse attention only.
#   "loop":   the session-1 kernels: G = sum_j phi(K_j)^T V_j accumulated in the forward loop (H_i = H_tot - G),
#             the selected part subtracted inside the dq loop (+1 accumulator, +1 matmul per step) and the dkv
#             loop (+1 accumulator, +2 matmuls per step). Residuals H_tot, Z_tot (B, H, D, D) + (B, H, D).
# H100, wan-1.3b, 95%: fwd+bwd 9.05 ms ("loop") -> 5.70 ms ("blocks" everywhere); see docs/perf_notes.md.
# The dq / dkv options are independent of the forward's (the INT8 forward always hands over H_tot, Z_tot).
# "fwd_kernel": "triton" (the kernel of this file), "mosaic" (pallas_kernels/sparse_mosaic.py, Hopper GPUs: the
# sparse branch by a warp-specialised Mosaic GPU kernel, then the linear branch in a Triton epilogue) or "auto"
# (mosaic on Hopper; H100 wan-1.3b module fwd 2.26 / 1.74 / 1.47 ms vs 2.82 / 1.92 / 1.60 at 90 / 95 / 97%). On CPU
# (interpret mode) and for calls the Mosaic kernel does not support the Triton kernel runs.
# "state_dtype": dtype of the per-block states H_i (forward, residual) and dH_j (backward) for 16-bit inputs:
# "bfloat16" (default: half the bytes written and read; ~2^-9 relative per element, once rounded after the float32
# sum) or "float32". float32 inputs keep float32 states. H100 wan-1.3b 95%, Mosaic fwd + bwd: module fwd+bwd 5.59 ->
# 5.40 ms, fwd 1.74 -> 1.63; dphi(Q) / dphi(K) vs the f32-state path 3.1e-3 / 2.6e-3 (docs/perf_notes.md, session 4).
# "fwd_epilogue": where the Mosaic forward's linear branch and SLA2 combine run: "mosaic" (default: in the Mosaic
# kernel's epilogue, sparse_mosaic.sparse_linear_attention_mosaic: phi(Q_i) H_i as one more wgmma per warpgroup,
# den = phi(Q_i) . Z_i + eps in registers, the outputs stored by TMA; bf16 per-block states only, else the Triton
# one) or "triton" (a Triton epilogue kernel after the sparse kernel, reading o_s back). H100 wan-1.3b module fwd
# 1.57 -> 1.45 ms (95%), 1.36 -> 1.28 (97%); docs/perf_notes.md "Session 5: Mosaic forward".
# "bwd_kernel": the same choice for the backward's sparse loops (pallas_kernels/sparse_mosaic_dq.py and
# sparse_mosaic_dkv.py; the per-row terms and the linear-branch parts stay in small Triton kernels). H100 wan-1.3b
# module fwd+bwd 6.30 -> 5.59 ms (95%), 6.15 -> 4.69 (97%) with the Mosaic forward in both.
# "lut_cumsum": how _transpose_lut takes the running count of selections along Nq: "matmul" (the 0/1 selection
# times an upper-triangular ones matrix on the tensor cores, exact in float32) or "xla" (jnp.cumsum, which XLA
# lowers to a reduce-window: 0.063 ms with what it fuses at wan-1.3b, session 5).
OPTIONS = {
    "fwd_linear": "blocks",
    "dq_linear": "blocks",
    "dkv_linear": "blocks",
    "fwd_kernel": "auto",
    "bwd_kernel": "auto",
    "state_dtype": "bfloat16",
    "fwd_epilogue": "mosaic",
    "lut_cumsum": "matmul",
}


def _lin_in_loop(kernel, cfg: _Cfg):
    return cfg.track_lin and OPTIONS[f"{kernel}_linear"] == "loop"


def _selection(lut, nk):
    """sel (B, H, Nk, Nq) bool: key block j selected by query block i (comparison against the LUT, no scatter;
    ids outside [0, Nk) select nothing). A scatter of the LUT instead measured the same on H100 (XLA fusions of the
    fwd+bwd 128.0 -> 126.5 us at wan-1.3b, 95%; docs/perf_notes.md, session 5)."""
    return jnp.any(lut[:, :, None, :, :] == jnp.arange(nk, dtype=lut.dtype)[None, None, :, None, None], axis=-1)


def _complement_states(k_phi, v, lut, cfg: _Cfg):
    """H_i = sum_{j not in lut[i]} phi(K_j)^T V_j (B, H, Nq, D, D) and Z_i likewise of colsum phi(K_j)
    (B, H, Nq, D), float32: the linear branch's state of each query block (what the forward builds as
    H_tot - G in-kernel), from per-key-block outer sums and one masked matmul."""
    sums = _outer_sum(k_phi, v, cfg, block_rows=cfg.block_k)
    unsel = jnp.logical_not(jnp.swapaxes(_selection(lut, cfg.nk), 2, 3))  # (B, H, Nq, Nk)
    return _sum_over_blocks(unsel, sums)


def _prepass(k_phi, v, cfg: _Cfg):
    """H_tot = phi(K)^T V (B, H, D, D) and Z_tot = colsum phi(K) (B, H, D), float32."""
    return _outer_sum(k_phi, v, cfg)


def _block_colsums(k_phi, cfg: _Cfg):
    """z_j = colsum phi(K_j) per key block, (B, H, Nk, D) float32 (XLA; padded rows are zero)."""
    b, n, h, d = k_phi.shape
    x = jnp.pad(k_phi, ((0, 0), (0, cfg.nk * cfg.block_k - n), (0, 0), (0, 0)))
    z = jnp.sum(x.reshape(b, cfg.nk, cfg.block_k, h, d), axis=2, dtype=_F32)
    return jnp.transpose(z, (0, 2, 1, 3))


def _linear_inputs(q_phi, k_phi, v, lut, cfg: _Cfg, lin_in_loop: bool):
    """The forward kernels' linear-branch inputs (bf16 and low bit) and the states kept as residuals:
    ([(name, array, BlockSpec)], h_tot, z_tot). States: this query block's H_i, Z_i, (B, H, Nq, D, D) / (B, H, Nq, D)
    float32 ("blocks": the dq kernel reuses them), else the totals (B, H, D, D) / (B, H, D), with phi(K) and the
    per-block colsums when the loop subtracts the selected part itself; (None, None) without a linear branch."""
    if not cfg.linear:
        return [], None, None
    d, seq = cfg.d, _seq_spec(cfg)
    inputs = [("q_phi", q_phi, seq)]
    if cfg.track_lin and not lin_in_loop:
        h_tot, z_tot = _complement_states(k_phi, v, lut, cfg)
        h_spec = pl.BlockSpec((None, None, None, d, d), lambda i, hh, bb: (bb, hh, i, 0, 0))
        z_spec = pl.BlockSpec((None, None, None, d), lambda i, hh, bb: (bb, hh, i, 0))
    else:
        h_tot, z_tot = _prepass(k_phi, v, cfg)
        h_spec, z_spec = _full_spec(d, d), _full_spec(d)
    if lin_in_loop:
        inputs += [("k_phi", k_phi, seq), ("z_blk", _block_colsums(k_phi, cfg), _full_spec(cfg.nk, d))]
    return inputs + [("h_tot", h_tot, h_spec), ("z_tot", z_tot, z_spec)], h_tot, z_tot


def _forward_outputs(q, cfg: _Cfg, *, fused: bool, residuals: bool):
    """(name, shape struct, BlockSpec) of the forward kernels' outputs: o (fused) and/or o_s, o_l, and the
    residuals LSE and den the backward needs. Shared by the bf16 and low-bit forward kernels."""
    b, _, h, _ = q.shape
    seq, rows = _seq_spec(cfg), _row_spec(cfg)
    o_struct = jax.ShapeDtypeStruct(q.shape, q.dtype)
    row_struct = jax.ShapeDtypeStruct((b, h, cfg.npad), _F32)
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


def _linear_epilogue_kernel(*refs, names, cfg: _Cfg, fused: bool):
    """Program (i, h, b): the epilogue of _fwd_kernel alone (linear branch, SLA2 combine, stores) for a sparse
    output o_s computed elsewhere (the Mosaic GPU forward)."""
    r = dict(zip(names, refs))
    i = pl.program_id(0)
    o_s = _load_rows(r["o_s_in"], i * cfg.block_q, cfg.block_q, cfg.n).astype(_F32)
    _store_forward_outputs(r, i, o_s, None, cfg, fused)


def _mosaic_supports(q, cfg: _Cfg) -> bool:
    """The Mosaic GPU kernels support the call: GPU (not interpret), 16-bit, N % 8 == 0, D % 64 == 0, block_q 128,
    block_k 64 (their shared-memory plans: the forward's ring of 64-key slots beside its Q, phi(Q) and H_i tiles, the
    dK/dV kernel's 64-key programs; other block sizes take the Triton kernels)."""
    return (
        not cfg.interpret
        and cfg.block_q == 128
        and cfg.block_k == 64
        and cfg.n % 8 == 0  # Mosaic's GMEM tiling of the (N, H, D) operands
        and cfg.d % 64 == 0
        and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )


def _mosaic_chosen(choice: str, q, cfg: _Cfg) -> bool:
    """A kernel option (OPTIONS "fwd_kernel" / "bwd_kernel", or the INT8 forward's) asks for Mosaic GPU ("mosaic",
    or "auto" on a Hopper GPU) and the Mosaic kernels support the call (_mosaic_supports)."""
    wanted = choice == "mosaic" or (choice == "auto" and gpu_generation() == "hopper")
    return wanted and _mosaic_supports(q, cfg)


def _use_mosaic(q, cfg: _Cfg, lin_in_loop: bool) -> bool:
    """The forward's sparse part runs in the Mosaic GPU kernel: chosen and supported (_mosaic_chosen) with per-block
    linear states."""
    return not lin_in_loop and _mosaic_chosen(OPTIONS["fwd_kernel"], q, cfg)


def _forward_mosaic(q, k, v, lut, alpha, linear_inputs, cfg: _Cfg, *, fused: bool, residuals: bool):
    """Sparse branch by the Mosaic GPU kernel; the linear branch and combine in its epilogue (OPTIONS "fwd_epilogue"
    "mosaic", where _mosaic_epilogue allows) or in a Triton epilogue kernel after it (o_s, LSE through memory)."""
    from . import sparse_mosaic as sm

    named = {name: x for name, x, _ in linear_inputs}
    if _mosaic_epilogue(named, cfg):
        linear, kw = _mosaic_epilogue_args(q, alpha, named, cfg, fused=fused, residuals=residuals)
        return sm.sparse_linear_attention_mosaic(q, k, v, lut, linear, block_k=cfg.block_k, sm_scale=cfg.sm_scale, **kw)
    o_s, lse = sm.sparse_attention_mosaic(q, k, v, lut, block_k=cfg.block_k, sm_scale=cfg.sm_scale, stages=4)
    return _linear_epilogue(q, o_s, lse, alpha, linear_inputs, cfg, fused=fused, residuals=residuals)


def _mosaic_epilogue_args(q, alpha, named_inputs: dict, cfg: _Cfg, *, fused: bool, residuals: bool):
    """(sparse_mosaic.LinearInputs, {"outputs", "stages"}) of a Mosaic forward with the linear epilogue (bf16 and
    INT8 kernels alike), from _linear_inputs' named arrays: the outputs _forward_outputs asks for, and the ring depth
    (the Q or phi(Q) tiles hold two outputs; a third goes through a finished V slot of the ring,
    sparse_mosaic.ring_holds_outputs, or else needs the room of one K/V ring slot)."""
    from . import sparse_mosaic as sm

    outputs = tuple(x[0] for x in _forward_outputs(q, cfg, fused=fused, residuals=residuals))
    tiles = sum(x in ("o", "o_s", "o_l") for x in outputs)
    linear = sm.LinearInputs(
        named_inputs["q_phi"], named_inputs["h_tot"], named_inputs["z_tot"], alpha if fused else None, cfg.eps
    )
    stages = 4 if tiles <= 2 or sm.ring_holds_outputs(cfg.block_k, 4) else 3
    return linear, {"outputs": outputs, "stages": stages}


def _mosaic_epilogue(named_inputs: dict, cfg: _Cfg) -> bool:
    """The linear branch runs in the Mosaic forward's epilogue: OPTIONS["fwd_epilogue"] "mosaic", complement scope
    with per-block states H_i (B, H, Nq, D, D) in bf16 (OPTIONS "state_dtype"; float32 states need the hi + lo
    products of the Triton epilogue)."""
    h = named_inputs.get("h_tot")
    return (
        OPTIONS["fwd_epilogue"] == "mosaic"
        and cfg.track_lin
        and h is not None
        and h.ndim == 5
        and jnp.dtype(h.dtype) == jnp.dtype(jnp.bfloat16)
    )


def _linear_epilogue(q, o_s, lse, alpha, linear_inputs, cfg: _Cfg, *, fused: bool, residuals: bool):
    """The forward's outputs (dict, as _forward) from a sparse branch computed elsewhere: o_s (B, N, H, D) and lse
    (B, H, Npad) f32 base 2 (the Mosaic kernels, bf16 or INT8), plus the linear branch and the SLA2 combine of
    the Triton epilogue kernel (linear_inputs from _linear_inputs, per-block states)."""
    b, _, h, _ = q.shape
    out = {"o_s": o_s, "lse": lse}
    outputs = [x for x in _forward_outputs(q, cfg, fused=fused, residuals=residuals) if x[0] not in out]
    if outputs:
        inputs = [("o_s_in", o_s, _seq_spec(cfg))] + linear_inputs
        if fused:
            inputs += [("alpha", alpha, _full_spec(cfg.nq))]
        res = _call(_linear_epilogue_kernel, (cfg.nq, h, b), inputs, outputs, cfg, "fwd", {"fused": fused})
        out.update(zip([x[0] for x in outputs], res))
    return out


def _forward(q, k, v, q_phi, k_phi, lut, alpha, cfg: _Cfg, *, fused: bool, residuals: bool):
    b, n, h, d = q.shape
    lin_in_loop = _lin_in_loop("fwd", cfg)
    linear_inputs, h_tot, z_tot = _linear_inputs(q_phi, k_phi, v, lut, cfg, lin_in_loop)
    if _use_mosaic(q, cfg, lin_in_loop):
        out = _forward_mosaic(q, k, v, lut, alpha, linear_inputs, cfg, fused=fused, residuals=residuals)
        out["h_tot"], out["z_tot"] = h_tot, z_tot
        return out
    seq = _seq_spec(cfg)
    inputs = [("lut", lut, _full_spec(cfg.nq, cfg.topk)), ("q", q, seq), ("k", k, seq), ("v", v, seq)]
    inputs += linear_inputs
    if fused:
        inputs += [("alpha", alpha, _full_spec(cfg.nq))]
    outputs = _forward_outputs(q, cfg, fused=fused, residuals=residuals)
    unroll = max(1, launch_config("fwd", cfg.d, cfg.block_q, cfg.block_k)[2] // cfg.block_k)
    launch = dict(fused=fused, unroll=unroll, lin_in_loop=lin_in_loop)
    res = _call(_fwd_kernel, (cfg.nq, h, b), inputs, outputs, cfg, "fwd", launch)
    out = dict(zip([x[0] for x in outputs], res))
    out["h_tot"], out["z_tot"] = h_tot, z_tot
    return out


# ----------------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------------
def _dq_row_terms(r, i, q_start, bm, cfg: _Cfg, fused: bool):
    """Per-row terms of query rows [q_start, q_start + bm) of query block i (stored: delta, c, d alpha rows):
    delta = rowsum(dO_s * O_s), c = rowsum(dO_l * O_l). Returns (dO_s or dO as loaded, alpha or None, delta,
    dO_l float32, c, den) with the last three None without a linear branch."""
    o_s = _load_rows(r["o_s"], q_start, bm, cfg.n).astype(_F32)
    a = r["alpha"][i] if fused else None
    if fused:
        do = _load_rows(r["do"], q_start, bm, cfg.n)
        do32 = do.astype(_F32)
        delta = a * jnp.sum(do32 * o_s, axis=1)
        do_l32 = (1.0 - a) * do32
    else:
        do = _load_rows(r["do_s"], q_start, bm, cfg.n)
        delta = jnp.sum(do.astype(_F32) * o_s, axis=1)
        do_l32 = _load_rows(r["do_l"], q_start, bm, cfg.n).astype(_F32) if cfg.linear else None
    r["delta"][...] = delta
    o_l = c = den = None
    if cfg.linear:
        o_l = _load_rows(r["o_l"], q_start, bm, cfg.n).astype(_F32)
        den = r["den"][...]
        c = jnp.sum(do_l32 * o_l, axis=1)
        r["c"][...] = c
    if fused:
        diff = o_s if o_l is None else o_s - o_l
        r["dalpha_rows"][...] = jnp.sum(do32 * diff, axis=1)
    return do, a, delta, do_l32, c, den


def _store_dq_phi(r, q_start, do_l32, c, den, selected, cfg: _Cfg):
    """dphi(Q) = dO_l / den @ H^T - c / den * Z with this block's H_i, Z_i (complement, precomputed) or H_tot,
    Z_tot (scope "all", or the selected part `selected` accumulated in the dq loop; None otherwise)."""
    h = r["h"][...]
    z = r["z"][...]
    dq_phi = _dot_mat(do_l32 / den[:, None], h, r["o_s"].dtype, trans_b=True) - (c / den)[:, None] * z[None, :]
    if selected is not None:
        dq_phi = dq_phi + selected
    _store_rows(r["dq_phi"], q_start, dq_phi, cfg.n)


def _dq_kernel(*refs, names, cfg: _Cfg, fused: bool, rows: int, lin_in_loop: bool):
    r = dict(zip(names, refs))
    sub = pl.program_id(0)  # sub-block of `rows` query rows
    i = lax.div(sub, jnp.int32(cfg.block_q // rows))  # its query block (LUT row)
    q_start = sub * rows
    bm = rows
    q = _load_rows(r["q"], q_start, bm, cfg.n)
    lse = r["lse"][...]
    do, a, delta, do_l32, c, den = _dq_row_terms(r, i, q_start, bm, cfg, fused)
    if lin_in_loop and not fused:
        do_l = do_l32.astype(q.dtype)

    carry = (jnp.zeros((bm, cfg.d), _F32),)
    if lin_in_loop:
        carry += (jnp.zeros((bm, cfg.d), _F32),)

    def body(t, carry):
        k_start = r["lut"][i, t] * cfg.block_k
        k = _load_rows(r["k"], k_start, cfg.block_k, cfg.n)
        v = _load_rows(r["v"], k_start, cfg.block_k, cfg.n)
        p = jnp.exp2(_scores(q, k, k_start, cfg) - lse[:, None])
        x = _dot(do, v, trans_b=True)
        dp = a * x if fused else x
        ds = p * (dp - delta[:, None])
        out = (carry[0] + _dot(ds.astype(k.dtype), k),)
        if lin_in_loop:
            k_phi = _load_rows(r["k_phi"], k_start, cfg.block_k, cfg.n)
            y = (1.0 - a) * x if fused else _dot(do_l, v, trans_b=True)
            e = (y - c[:, None]) / den[:, None]
            out += (carry[1] - _dot(e.astype(k_phi.dtype), k_phi),)
        return out

    carry = lax.fori_loop(0, cfg.topk, body, carry)
    _store_rows(r["dq"], q_start, carry[0] * cfg.sm_scale, cfg.n)
    if cfg.linear:
        _store_dq_phi(r, q_start, do_l32, c, den, carry[1] if lin_in_loop else None, cfg)


def _dq_linear_kernel(*refs, names, cfg: _Cfg, fused: bool):
    """Program (i, h, b): the per-row terms and dphi(Q) of query block i without the LUT loop (the Mosaic dQ
    kernel does the loop, with the delta stored here)."""
    r = dict(zip(names, refs))
    i = pl.program_id(0)
    _, _, _, do_l32, c, den = _dq_row_terms(r, i, i * cfg.block_q, cfg.block_q, cfg, fused)
    if cfg.linear:
        _store_dq_phi(r, i * cfg.block_q, do_l32, c, den, None, cfg)


def _dkv_kernel(*refs, names, cfg: _Cfg, fused: bool, rows: int, lin_in_loop: bool):
    r = dict(zip(names, refs))
    j = pl.program_id(0)
    k_start = j * cfg.block_k
    k = _load_rows(r["k"], k_start, cfg.block_k, cfg.n)
    v = _load_rows(r["v"], k_start, cfg.block_k, cfg.n)
    dt = k.dtype
    bm, nsub = rows, cfg.block_q // rows  # the loop walks `rows`-row sub-blocks of each query block
    zeros = jnp.zeros((cfg.block_k, cfg.d), _F32)
    carry = (zeros, zeros) + ((zeros,) if lin_in_loop else ())
    if lin_in_loop:
        k_phi = _load_rows(r["k_phi"], k_start, cfg.block_k, cfg.n)

    qk_scale = cfg.sm_scale * _LOG2E
    kvalid = (k_start + jnp.arange(cfg.block_k)) < cfg.n

    # Keys-as-rows orientation (as in the Triton fused-attention tutorial's dK/dV loop): every matmul has a
    # register tile or a loaded tile as A and a loaded tile as B, so no computed tile needs transposing.
    def body(t, carry):
        dk, dv = carry[:2]
        i = r["lut_t"][j, lax.div(t, jnp.int32(nsub))]  # (plain // and % lower badly in Triton)
        q_start = i * cfg.block_q + lax.rem(t, jnp.int32(nsub)) * bm
        rws = pl.ds(q_start, bm)
        q = _load_rows(r["q"], q_start, bm, cfg.n)
        lse = r["lse"][rws]
        delta = r["delta"][rws]
        s_t = _dot(k, q, trans_b=True) * qk_scale  # (block_k, bm) = S^T
        p_t = jnp.where(kvalid[:, None], jnp.exp2(s_t - lse[None, :]), 0.0)
        do = _load_rows(r["do" if fused else "do_s"], q_start, bm, cfg.n)
        x_t = _dot(v, do, trans_b=True)  # (dO V^T)^T
        if fused:
            a = r["alpha"][i]
            ds_t = p_t * (a * x_t - delta[None, :])
            w_t = a * p_t
        else:
            ds_t = p_t * (x_t - delta[None, :])
            w_t = p_t
        dk = dk + _dot(ds_t.astype(dt), q)
        out_extra = ()
        if lin_in_loop:
            dk_phi = carry[2]
            q_phi = _load_rows(r["q_phi"], q_start, bm, cfg.n)
            inv_den = 1.0 / r["den"][rws]
            c = r["c"][rws]
            c_t = _dot(k_phi, q_phi, trans_b=True) * inv_den[None, :]  # (phi~_i phi(K_j)^T)^T
            if fused:
                y_t = (1.0 - a) * x_t
                dv = dv + _dot((w_t - (1.0 - a) * c_t).astype(dt), do)
            else:
                do_l = _load_rows(r["do_l"], q_start, bm, cfg.n)
                y_t = _dot(v, do_l, trans_b=True)
                dv = dv + _dot(w_t.astype(dt), do) - _dot(c_t.astype(dt), do_l)
            dk_phi = dk_phi - _dot(((y_t - c[None, :]) * inv_den[None, :]).astype(dt), q_phi)
            out_extra = (dk_phi,)
        else:
            dv = dv + _dot(w_t.astype(dt), do)
        return (dk, dv) + out_extra

    carry = lax.fori_loop(0, r["count"][j] * nsub, body, carry)
    _store_rows(r["dk"], k_start, carry[0] * cfg.sm_scale, cfg.n)
    dv = carry[1]
    if cfg.linear:
        dv = _add_dkv_linear(r, k_start, v, k_phi if lin_in_loop else None, dv, carry[2] if lin_in_loop else None, cfg)
    _store_rows(r["dv"], k_start, dv, cfg.n)


def _add_dkv_linear(r, k_start, v, k_phi, dv, selected, cfg: _Cfg):
    """Linear part of key block j, after the sparse loop (keeps its D x D operands out of the pipelined loop's
    shared memory): returns dV + phi(K_j) dH_j and stores dphi(K_j) = V_j dH_j^T + dZ_j (+ `selected`, the part
    the loop subtracted), with dH_j, dZ_j over the query blocks that did not select j (precomputed) or over all
    of them (scope "all", or the selected ones subtracted in the loop). k_phi: loaded here when None."""
    dt = v.dtype
    if k_phi is None:
        k_phi = _load_rows(r["k_phi"], k_start, cfg.block_k, cfg.n)
    dh = r["dh"][...]
    dk_phi = _dot_mat(v, dh, dt, trans_b=True) + r["dz"][...][None, :]
    if selected is not None:
        dk_phi = dk_phi + selected
    _store_rows(r["dk_phi"], k_start, dk_phi, cfg.n)
    return dv + _dot_mat(k_phi, dh, dt)


def _dkv_linear_kernel(*refs, names, cfg: _Cfg):
    """Program (j, h, b): the linear part of key block j for a sparse dV computed elsewhere (the Mosaic dK/dV
    kernel): dv = dv_s + phi(K_j) dH_j, dphi(K_j) = V_j dH_j^T + dZ_j."""
    r = dict(zip(names, refs))
    k_start = pl.program_id(0) * cfg.block_k
    v = _load_rows(r["v"], k_start, cfg.block_k, cfg.n)
    dv_s = _load_rows(r["dv_s"], k_start, cfg.block_k, cfg.n).astype(_F32)
    _store_rows(r["dv"], k_start, _add_dkv_linear(r, k_start, v, None, dv_s, None, cfg), cfg.n)


def _transpose_lut(lut, nk):
    """For each key block, the query blocks that selected it (ascending, padded with Nq) and their count.

    Built on device without a sort: sel (B, H, Nk, Nq) by comparison, the slot of each selected query block is
    the running count along Nq, and one scatter (unselected entries dropped) writes the ids.
    """
    b, h, nq, topk = lut.shape
    sel = _selection(lut, nk)
    count = jnp.sum(sel, axis=-1, dtype=jnp.int32)
    slot = jnp.where(sel, _running_count(sel) - 1, nq)
    ids = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32), sel.shape)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(h)[None, :, None, None]
    ji = jnp.arange(nk)[None, None, :, None]
    lut_t = jnp.full((b, h, nk, nq), nq, jnp.int32).at[bi, hi, ji, slot].set(ids, mode="drop")
    return lut_t, count


def _running_count(sel):
    """Inclusive running count of True along the last axis, int32 of sel's shape (OPTIONS["lut_cumsum"]): a matmul
    with the (Nq, Nq) upper-triangular ones matrix (0/1 operands in bf16, float32 sums: exact up to 2^24) or
    jnp.cumsum."""
    if OPTIONS["lut_cumsum"] == "xla":
        return jnp.cumsum(sel, axis=-1, dtype=jnp.int32)
    n = sel.shape[-1]
    upper = (jnp.arange(n)[:, None] <= jnp.arange(n)[None, :]).astype(jnp.bfloat16)
    counts = jnp.matmul(sel.astype(jnp.bfloat16), upper, preferred_element_type=_F32)
    return counts.astype(jnp.int32)


def _backward(res, cfg: _Cfg, *, fused, do=None, do_s=None, do_l=None):
    """All input cotangents: dq kernel, gradient totals, dkv kernel (each a separate function for timing)."""
    res_dq = _backward_dq(res, cfg, fused=fused, do=do, do_s=do_s, do_l=do_l)
    totals = _backward_totals(res, res_dq, cfg, fused=fused, do=do, do_l=do_l)
    res_dkv = _backward_dkv(res, res_dq, totals, cfg, fused=fused, do=do, do_s=do_s, do_l=do_l)
    q = res[0]
    b, _, h, _ = q.shape
    zeros = jnp.zeros_like(q)
    dq_phi = res_dq.get("dq_phi", zeros)
    dk_phi = res_dkv.get("dk_phi", zeros)
    dalpha = None
    if fused:
        dalpha = res_dq["dalpha_rows"].reshape(b, h, cfg.nq, cfg.block_q).sum(-1)
    return res_dq["dq"], res_dkv["dk"], res_dkv["dv"], dq_phi, dk_phi, dalpha


def _use_mosaic_bwd(q, cfg: _Cfg) -> bool:
    """The backward's sparse loops run in the Mosaic GPU dQ and dK/dV kernels: OPTIONS["bwd_kernel"] chosen and
    supported (_mosaic_chosen), and the loops carry no linear-branch terms."""
    lin_in_loop = _lin_in_loop("dq", cfg) or _lin_in_loop("dkv", cfg)
    return not lin_in_loop and _mosaic_chosen(OPTIONS["bwd_kernel"], q, cfg)


def _backward_dq(res, cfg: _Cfg, *, fused, do=None, do_s=None, do_l=None):
    """dQ, dphi(Q) (and delta, c, d alpha per row) over the LUT: one Triton kernel, or with the Mosaic backward a
    Triton kernel for the per-row terms and dphi(Q) followed by the Mosaic dQ kernel (sparse_mosaic_dq.py)."""
    q, k, v, q_phi, k_phi, lut, alpha, o_s, o_l, lse, den, h_tot, z_tot = res
    b, n, h, d = q.shape
    seq = _seq_spec(cfg)
    per_block_states = h_tot is not None and h_tot.ndim == 5  # H_i, Z_i from the forward (option fwd "blocks")
    lin_in_loop = _lin_in_loop("dq", cfg) and not per_block_states
    mosaic = _use_mosaic_bwd(q, cfg)
    rows_dq = cfg.block_q if mosaic else _rows("dq", cfg)
    rows = pl.BlockSpec((None, None, rows_dq), lambda i, hh, bb: (bb, hh, i))
    row_struct = jax.ShapeDtypeStruct((b, h, cfg.npad), _F32)
    inputs = [] if mosaic else [("lut", lut, _full_spec(cfg.nq, cfg.topk)), ("q", q, seq), ("k", k, seq), ("v", v, seq)]
    if fused:
        inputs += [("do", do, seq)]
    else:
        inputs += [("do_s", do_s, seq)] + ([("do_l", do_l, seq)] if cfg.linear else [])
    inputs += [("o_s", o_s, seq)] + ([] if mosaic else [("lse", lse, rows)])
    if cfg.linear:
        inputs += [("o_l", o_l, seq), ("den", den, rows)]
        if lin_in_loop:
            inputs += [("k_phi", k_phi, seq)]
        if cfg.track_lin and not lin_in_loop:
            h_blk, z_blk = (h_tot, z_tot) if per_block_states else _complement_states(k_phi, v, lut, cfg)
            ratio = cfg.block_q // rows_dq  # programs per query block
            blk = lambda s: lax.div(s, jnp.int32(ratio))
            h_spec = pl.BlockSpec((None, None, None, d, d), lambda s, hh, bb: (bb, hh, blk(s), 0, 0))
            z_spec = pl.BlockSpec((None, None, None, d), lambda s, hh, bb: (bb, hh, blk(s), 0))
            inputs += [("h", h_blk, h_spec), ("z", z_blk, z_spec)]
        else:
            inputs += [("h", h_tot, _full_spec(d, d)), ("z", z_tot, _full_spec(d))]
    if fused:
        inputs += [("alpha", alpha, _full_spec(cfg.nq))]
    outputs = [] if mosaic else [("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), seq)]
    outputs += [("delta", row_struct, rows)]
    if cfg.linear:
        outputs += [("dq_phi", jax.ShapeDtypeStruct(q.shape, q.dtype), seq), ("c", row_struct, rows)]
    if fused:
        outputs += [("dalpha_rows", row_struct, rows)]
    if mosaic:
        kernel, launch = _dq_linear_kernel, {"fused": fused}
    else:
        kernel, launch = _dq_kernel, {"fused": fused, "rows": rows_dq, "lin_in_loop": lin_in_loop}
    res_dq = _call(kernel, (cfg.npad // rows_dq, h, b), inputs, outputs, cfg, "dq", launch)
    res_dq = dict(zip([x[0] for x in outputs], res_dq))
    if mosaic:
        from .sparse_mosaic_dq import sparse_attention_dq_mosaic

        do_sparse, a = (do, alpha) if fused else (do_s, None)
        kw = {"block_k": cfg.block_k, "sm_scale": cfg.sm_scale, "stages": 4}  # H100: 0.88 vs 0.92 ms with 2 (95%)
        res_dq["dq"] = sparse_attention_dq_mosaic(q, k, v, do_sparse, lse, res_dq["delta"], lut, a, **kw)
    return res_dq


def _backward_totals(res, res_dq, cfg: _Cfg, *, fused, do=None, do_l=None):
    """Linear-branch gradient states for the dkv kernel, float32: dH = sum_r phi~_r^T dO_l,r, dZ = -sum_r c_r phi~_r
    (phi~ = phi(Q) / den) over all query rows, (B, H, D, D) and (B, H, D); for the complement scope (option
    "blocks") per key block j over the query blocks that did not select j, (B, H, Nk, D, D) and (B, H, Nk, D)."""
    q, k, v, q_phi, k_phi, lut, alpha, o_s, o_l, lse, den, h_tot, z_tot = res
    if not cfg.linear:
        return None, None
    inv_den = 1.0 / den
    if fused:
        w = (1.0 - jnp.repeat(alpha, cfg.block_q, axis=-1)) * inv_den
        x = do
    else:
        w, x = inv_den, do_l
    u = -res_dq["c"] * inv_den
    if cfg.track_lin and not _lin_in_loop("dkv", cfg):
        sums = _outer_sum(q_phi, x, cfg, w, u, block_rows=cfg.block_q)  # per query block
        return _sum_over_blocks(jnp.logical_not(_selection(lut, cfg.nk)), sums)
    return _outer_sum(q_phi, x, cfg, w, u)


def _dkv_linear_inputs(q_phi, k_phi, den, c, totals, cfg: _Cfg, lin_in_loop: bool):
    """(name, array, BlockSpec) of the dK/dV kernels' linear-branch inputs: phi(K) and dH, dZ (per key block, or
    the totals), plus the loop form's phi(Q), den and c."""
    dh, dz = totals
    d = cfg.d
    if dh.ndim == 5:  # per key block
        dh_spec = pl.BlockSpec((None, None, None, d, d), lambda j, hh, bb: (bb, hh, j, 0, 0))
        dz_spec = pl.BlockSpec((None, None, None, d), lambda j, hh, bb: (bb, hh, j, 0))
    else:
        dh_spec, dz_spec = _full_spec(d, d), _full_spec(d)
    inputs = [("k_phi", k_phi, _seq_spec(cfg)), ("dh", dh, dh_spec), ("dz", dz, dz_spec)]
    if lin_in_loop:
        full_rows = _full_spec(cfg.npad)
        inputs += [("q_phi", q_phi, _seq_spec(cfg)), ("den", den, full_rows), ("c", c, full_rows)]
    return inputs


def _backward_dkv(res, res_dq, totals, cfg: _Cfg, *, fused, do=None, do_s=None, do_l=None):
    """dK, dV, dphi(K) over the transposed LUT (built here): one Triton kernel, or the Mosaic dK/dV kernel
    (sparse_mosaic_dkv.py) followed by a Triton kernel for the linear part."""
    q, k, v, q_phi, k_phi, lut, alpha, o_s, o_l, lse, den, h_tot, z_tot = res
    b, n, h, d = q.shape
    seq = _seq_spec(cfg)
    lin_in_loop = _lin_in_loop("dkv", cfg)
    lut_t, count = _transpose_lut(lut, cfg.nk)
    kv_struct = jax.ShapeDtypeStruct(k.shape, k.dtype)
    if _use_mosaic_bwd(q, cfg):
        from .sparse_mosaic_dkv import sparse_attention_dkv_mosaic

        do_sparse, a = (do, alpha) if fused else (do_s, None)
        kw = {"block_k": cfg.block_k, "sm_scale": cfg.sm_scale}
        dk, dv_s = sparse_attention_dkv_mosaic(q, k, v, do_sparse, lse, res_dq["delta"], lut_t, count, a, **kw)
        if not cfg.linear:
            return {"dk": dk, "dv": dv_s}
        inputs = [("v", v, seq), ("dv_s", dv_s, seq)] + _dkv_linear_inputs(
            q_phi, k_phi, den, res_dq.get("c"), totals, cfg, False
        )
        outputs = [("dv", kv_struct, seq), ("dk_phi", kv_struct, seq)]
        res_lin = _call(_dkv_linear_kernel, (cfg.nk, h, b), inputs, outputs, cfg, "dkv", {})
        return {"dk": dk, **dict(zip([x[0] for x in outputs], res_lin))}
    inputs = [
        ("lut_t", lut_t, _full_spec(cfg.nk, cfg.nq)),
        ("count", count, _full_spec(cfg.nk)),
        ("q", q, seq),
        ("k", k, seq),
        ("v", v, seq),
    ]
    if fused:
        inputs += [("do", do, seq)]
    else:
        inputs += [("do_s", do_s, seq)] + ([("do_l", do_l, seq)] if lin_in_loop else [])
    full_rows = _full_spec(cfg.npad)
    inputs += [("lse", lse, full_rows), ("delta", res_dq["delta"], full_rows)]
    if cfg.linear:
        inputs += _dkv_linear_inputs(q_phi, k_phi, den, res_dq.get("c"), totals, cfg, lin_in_loop)
    if fused:
        inputs += [("alpha", alpha, _full_spec(cfg.nq))]
    outputs = [("dk", kv_struct, seq), ("dv", kv_struct, seq)]
    if cfg.linear:
        outputs += [("dk_phi", kv_struct, seq)]
    launch = {"fused": fused, "rows": _rows("dkv", cfg), "lin_in_loop": lin_in_loop}
    res_dkv = _call(_dkv_kernel, (cfg.nk, h, b), inputs, outputs, cfg, "dkv", launch)
    return dict(zip([x[0] for x in outputs], res_dkv))


# ----------------------------------------------------------------------------------------------------------
# custom_vjp wiring
# ----------------------------------------------------------------------------------------------------------
def _residuals(q, k, v, q_phi, k_phi, lut, alpha, out):
    return (
        q,
        k,
        v,
        q_phi,
        k_phi,
        lut,
        alpha,
        out["o_s"],
        out.get("o_l"),
        out["lse"],
        out.get("den"),
        out["h_tot"],
        out["z_tot"],
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _branches(q, k, v, q_phi, k_phi, lut, cfg):
    out = _forward(q, k, v, q_phi, k_phi, lut, None, cfg, fused=False, residuals=False)
    return out["o_s"], out.get("o_l", jnp.zeros_like(q))


def _branches_fwd(q, k, v, q_phi, k_phi, lut, cfg):
    out = _forward(q, k, v, q_phi, k_phi, lut, None, cfg, fused=False, residuals=True)
    res = _residuals(q, k, v, q_phi, k_phi, lut, None, out)
    return (out["o_s"], out.get("o_l", jnp.zeros_like(q))), res


def _branches_bwd(cfg, res, cts):
    do_s, do_l = cts
    dq, dk, dv, dq_phi, dk_phi, _ = _backward(
        res, cfg, fused=False, do_s=do_s.astype(res[0].dtype), do_l=do_l.astype(res[0].dtype)
    )
    return dq, dk, dv, dq_phi, dk_phi, None


_branches.defvjp(_branches_fwd, _branches_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused(q, k, v, q_phi, k_phi, lut, alpha, cfg):
    return _forward(q, k, v, q_phi, k_phi, lut, alpha, cfg, fused=True, residuals=False)["o"]


def _fused_fwd(q, k, v, q_phi, k_phi, lut, alpha, cfg):
    out = _forward(q, k, v, q_phi, k_phi, lut, alpha, cfg, fused=True, residuals=True)
    return out["o"], _residuals(q, k, v, q_phi, k_phi, lut, alpha, out)


def _fused_bwd(cfg, res, do):
    dq, dk, dv, dq_phi, dk_phi, dalpha = _backward(res, cfg, fused=True, do=do.astype(res[0].dtype))
    return dq, dk, dv, dq_phi, dk_phi, None, dalpha


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _is_pow2(x):
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


def _validate(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret):
    for name, x in (("q", q), ("k", k), ("v", v), ("q_phi", q_phi), ("k_phi", k_phi)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"{name} must be a 4-D array (B, N, H, D), got shape {getattr(x, 'shape', None)}")
        if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    for name, x in (("k", k), ("v", v), ("q_phi", q_phi), ("k_phi", k_phi)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal q shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} must equal q dtype {q.dtype}")
    b, n, h, d = q.shape
    if d not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim (q.shape[-1]) must be one of {_SUPPORTED_HEAD_DIMS}, got {d}")
    if n < 1:
        raise ValueError(f"sequence length (q.shape[1]) must be >= 1, got {n}")
    for name, bs in (("block_q", block_q), ("block_k", block_k)):
        if not _is_pow2(bs) or not 16 <= bs <= 256:
            raise ValueError(f"{name} must be a power of two in [16, 256], got {bs}")
    if linear_scope not in ("complement", "all"):
        raise ValueError(f"linear_scope must be 'complement' or 'all', got {linear_scope!r}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive float or None, got {sm_scale!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    nq, nk = -(-n // block_q), -(-n // block_k)
    if not hasattr(lut, "shape") or len(lut.shape) != 4:
        raise ValueError(f"lut must be a 4-D int32 array (B, H, Nq, topk), got shape {getattr(lut, 'shape', None)}")
    if lut.dtype != jnp.int32:
        raise ValueError(f"lut must be int32, got {lut.dtype}")
    if tuple(lut.shape[:3]) != (b, h, nq):
        raise ValueError(
            f"lut shape {tuple(lut.shape)} must be (B, H, Nq, topk) = ({b}, {h}, {nq}, topk) "
            f"for N={n}, block_q={block_q}"
        )
    topk = lut.shape[3]
    if not 1 <= topk <= nk:
        raise ValueError(f"lut topk (lut.shape[3]) must be in [1, Nk={nk}], got {topk}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return _Cfg(
        n=n,
        nq=nq,
        nk=nk,
        topk=topk,
        d=d,
        block_q=block_q,
        block_k=block_k,
        sm_scale=float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d),
        eps=float(eps),
        linear=not (linear_scope == "complement" and topk == nk),
        complement=linear_scope == "complement",
        interpret=bool(interpret),
    )


def sparse_linear_attention(
    q,
    k,
    v,
    q_phi,
    k_phi,
    lut,
    *,
    block_q=128,
    block_k=64,
    linear_scope="complement",
    sm_scale=None,
    eps=1e-6,
    interpret=None,
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
    Returns:
      (o_s, o_l), each (B, N, H, D) in q.dtype. Differentiable w.r.t. q, k, v, q_phi, k_phi.
    """
    cfg = _validate(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret)
    return _branches(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, cfg)


def _checked_alpha(alpha, q, cfg: _Cfg):
    """alpha broadcast to (B, H, Nq) float32; ValueError for a shape that does not broadcast or a non-float dtype."""
    b, _, h, _ = q.shape
    try:
        alpha = jnp.broadcast_to(jnp.asarray(alpha), (b, h, cfg.nq))
    except (ValueError, TypeError) as e:
        raise ValueError(f"alpha shape {jnp.shape(alpha)} must broadcast to (B, H, Nq) = ({b}, {h}, {cfg.nq})") from e
    if not jnp.issubdtype(alpha.dtype, jnp.floating):
        raise ValueError(f"alpha must be floating point, got {alpha.dtype}")
    return alpha.astype(_F32)


def sla2_fused_attention(
    q,
    k,
    v,
    q_phi,
    k_phi,
    lut,
    alpha,
    *,
    block_q=128,
    block_k=64,
    linear_scope="complement",
    sm_scale=None,
    eps=1e-6,
    interpret=None,
):
    """SLA2 output o = alpha * o_s + (1 - alpha) * o_l in one forward kernel (see sparse_linear_attention).

    alpha: float (B, H, Nq) (anything broadcastable to it), one value per query block; differentiable
    (d alpha = sum over the block's rows and channels of dO * (O_s - O_l)).
    """
    cfg = _validate(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret)
    alpha = _checked_alpha(alpha, q, cfg)
    return _fused(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, alpha, cfg)
