"""The linear branch's states, outside the attention loops, and the transposed LUT of the backward.

Per key block j: h_j = phi(K_j)^T V_j (D x D), z_j = colsum phi(K_j), by one Triton kernel of split-K row sums
(``outer_sum``); for 16-bit inputs h_j is stored in 16 bits (KernelConfig.block_sum_dtype: bfloat16 as it is,
float16 with one power-of-two scale per block). The complement scope's state of query block i, H_i = sum over the
unselected j of h_j (and Z_i likewise), is then one masked matmul over the blocks (cuBLAS, ``complement_states``),
dense in the mask and independent of topk: 2 * Nq * Nk * D^2 flop per head. The backward builds dH_j, dZ_j per key
block the same way from per-query-block sums (``gradient_states``). Keeping the selected part out of the loops this
way measured 9.05 -> 5.70 ms for wan-1.3b forward+backward at 95% on H100 (docs/dev/linear_branch.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._triton import pl
from .common import F32, KernelCall, dot, finite_rows, finite_sum, load_rows, pallas_triton_call, phi_rows, seq_spec

def _pow2_scale(amax):
    """s = 2^(e - 13) for amax in [2^e, 2^(e+1)) (e clipped to [-11, 28]): a power of two (exact in float16 and in
    every product with it) such that x / s is in (-2^14, 2^14) for |x| <= amax (float16 holds up to 65504)."""
    e = lax.shift_right_logical(lax.bitcast_convert_type(amax, jnp.int32), 23)  # biased exponent (amax >= 0)
    e_s = jnp.clip(e - 13, 127 - 24, 127 + 15)
    s = lax.bitcast_convert_type(lax.shift_left(e_s, 23), F32)
    inv_s = lax.bitcast_convert_type(lax.shift_left(254 - e_s, 23), F32)
    return s, inv_s


def _outer_sum_kernel(
    *, x_ref, y_ref, w_ref=None, u_ref=None, h_ref, z_ref, s_ref=None, m_ref=None, cfg: KernelCall, chunk: int,
    block: int, weighted: bool, scaled: bool, phi=None, block_means: bool = False,
):  # fmt: skip
    """Program (c, h, b): rows [c*chunk, (c+1)*chunk) of X, Y -> sum_r w_r X_r^T Y_r (D x D), sum_r u_r X_r.
    Refs of one (b, h): inputs x, y (N, D), w, u (chunk,) float32 (weighted); outputs h (D, D) float32, z (D,)
    float32 and, when scaled, s (D,) float32: then h holds the D x D sum / s in 16 bits (h_ref's dtype), s a power
    of two (_pow2_scale). phi: None, or a feature map applied to the X rows first (in float32, rounded to X's dtype
    as a phi(X) array would be; rows >= N stay 0). m_ref, if given: the mean of the raw X rows (before phi; finite rows
    only, as the front end's block means) of the chunk, (D,) float32, or with block_means of each step's `block`
    rows, (chunk // block, D) float32."""
    start0 = pl.program_id(0) * chunk

    def body(t, carry):
        h, z, total, count = carry
        start = start0 + t * block
        x = load_rows(x_ref, start, block, cfg.n)
        y = load_rows(y_ref, start, block, cfg.n)
        valid = (start + jnp.arange(block)) < cfg.n
        if m_ref is not None:
            raw = x.astype(F32)
            block_total, block_count = finite_sum(raw, finite_rows(raw, valid))
            if block_means:  # row t of the chunk's means: this step's rows are one block
                mean = block_total / jnp.maximum(block_count, 1.0)
                total = jnp.where((jnp.arange(chunk // block) == t)[:, None], mean[None, :], total)
            else:
                total, count = total + block_total, count + block_count
        if phi is not None:
            x = jnp.where(valid[:, None], phi_rows(phi, x), 0)
        x32 = x.astype(F32)
        if weighted:
            w = w_ref[pl.ds(t * block, block)]
            u = u_ref[pl.ds(t * block, block)]
            h = h + dot((x32 * w[:, None]).astype(x.dtype), y, trans_a=True)
            z = z + jnp.sum(x32 * u[:, None], axis=0)
        else:
            h = h + dot(x, y, trans_a=True)
            z = z + jnp.sum(x32, axis=0)
        return h, z, total, count

    means0 = jnp.zeros((chunk // block, cfg.d) if block_means else (cfg.d,), F32)
    zeros = (jnp.zeros((cfg.d, cfg.d), F32), jnp.zeros((cfg.d,), F32), means0, jnp.float32(0.0))
    h, z, total, count = lax.fori_loop(0, chunk // block, body, zeros)
    if m_ref is not None:
        m_ref[...] = total if block_means else total / jnp.maximum(count, 1.0)
    if scaled:
        s, inv_s = _pow2_scale(jnp.max(jnp.max(jnp.abs(h), axis=1), axis=0))
        h_ref[...] = (h * inv_s).astype(h_ref.dtype)
        s_ref[...] = jnp.full((cfg.d,), s, F32)
    else:
        h_ref[...] = h.astype(h_ref.dtype)
    z_ref[...] = z


_SUM_BLOCK = 128


def stored_blocks(count: int) -> int:
    """The number of per-block sums outer_sum stores for `count` blocks, the extra sums zero: rounded up to a
    multiple of 64 from 512 blocks on (<= 12% more), else of 8. The masked matmul over the blocks
    (_sum_over_blocks) then contracts over an aligned length, with its 0/1 mask made at that width (aligned rows):
    at wan-14b-720p (1182 key blocks) the product ran at ~255 TFLOP/s ragged and ~480 with the mask and the sums
    made for 1216 blocks (and 640 query blocks; H100, experiments.dev.probe_masked_gemm)."""
    multiple = 64 if count >= 512 else 8
    return -(-count // multiple) * multiple


def outer_sum(x, y, cfg: KernelCall, w=None, u=None, block_rows=None, phi=None, means=False):
    """sum over rows of (w_r x_r)^T y_r -> (B, H, D, D) and of u_r x_r -> (B, H, D), float32.

    Grid (C, H, B), C = ceil(N / KernelConfig.totals_chunk) chunks of rows (split-K: B*H alone is too few programs
    to fill the GPU; 1024 rows by default);
    the C partial sums are added by XLA (heads first, grid (H, C, B), measured no faster: docs/dev/linear_branch.md).
    Flop 2*N*D^2 per head; bytes: one read of x and y.
    w, u: optional (B, H, >= N) per-row float32 weights (both or neither).
    block_rows: if given, one sum per block of that many rows instead (no reduction over the blocks): the input of
    _sum_over_blocks, a _BlockSums of C = stored_blocks(ceil(N / block_rows)) blocks (zero past the last block).
    phi: None, or a feature map applied to the rows of x inside the kernel (x is then K, not phi(K)).
    means: also return the mean of the raw x rows of each block of block_rows rows, or of cfg.block_k rows for the
    totals ((B, H, C, D) float32, finite rows only, as the front end's block means): (sums, means). For the totals
    the kernel then steps by cfg.block_k rows.
    """
    b, n, h, d = x.shape
    launch = "sum" if phi is None else "sum_phi"  # phi's float32 tile needs smaller steps / more warps
    step = _SUM_BLOCK if phi is None else cfg.config.launch_params(launch).rows
    block_means = means and block_rows is None
    if block_means:
        step = cfg.block_k  # one step per key block: its mean is one row of the chunk's means
    if block_rows is None:
        chunk = min(max(cfg.config.totals_chunk, step), max(step, pl.next_power_of_2(n)))
    else:
        chunk = block_rows
    nc = -(-n // chunk)
    blocks = nc
    if block_rows is not None:
        nc = stored_blocks(nc)  # programs past the last block read no rows and store zero sums
    seq = seq_spec(cfg)
    inputs = [("x", x, seq), ("y", y, seq)]
    weighted = w is not None
    if weighted:
        pad = lambda a: jnp.pad(a[:, :, :n].astype(F32), ((0, 0), (0, 0), (0, nc * chunk - n)))
        rows = pl.BlockSpec((None, None, chunk), lambda c, hh, bb: (bb, hh, c))
        inputs += [("w", pad(w), rows), ("u", pad(u), rows)]
    sixteen = block_rows is not None and jnp.dtype(x.dtype) != jnp.dtype(F32)  # 16-bit sums for 16-bit inputs
    scaled = sixteen and cfg.config.block_sum_dtype == "float16"  # bf16 has float32's range: no scale needed
    vec = (
        jax.ShapeDtypeStruct((b, h, nc, d), F32),
        pl.BlockSpec((None, None, None, d), lambda c, hh, bb: (bb, hh, c, 0)),
    )
    outputs = [
        (
            "h",
            jax.ShapeDtypeStruct((b, h, nc, d, d), jnp.dtype(cfg.config.block_sum_dtype) if sixteen else F32),
            pl.BlockSpec((None, None, None, d, d), lambda c, hh, bb: (bb, hh, c, 0, 0)),
        ),
        ("z", *vec),
    ]
    if scaled:
        outputs.append(("s", *vec))
    if block_means:
        per = chunk // step
        outputs.append(("m", jax.ShapeDtypeStruct((b, h, nc * per, d), F32),
                        pl.BlockSpec((None, None, per, d), lambda c, hh, bb: (bb, hh, c, 0))))
    elif means:
        outputs.append(("m", *vec))
    kw = dict(chunk=chunk, block=min(chunk, step), weighted=weighted, scaled=scaled, phi=phi, block_means=block_means)
    sums = pallas_triton_call(_outer_sum_kernel, (nc, h, b), inputs, outputs, cfg, launch, kw)
    if block_rows is not None:
        block_sums = _BlockSums(sums[0], sums[1], sums[2][..., 0] if scaled else None, blocks)
        return (block_sums, sums[-1][:, :, :blocks]) if means else block_sums
    totals = jnp.sum(sums[0], axis=2), jnp.sum(sums[1], axis=2)
    return (totals, sums[-1][:, :, : -(-n // step)]) if means else totals


@functools.partial(jax.tree_util.register_dataclass, data_fields=["h", "z", "scale"], meta_fields=["blocks"])
@dataclasses.dataclass(frozen=True)
class _BlockSums:
    """Per-block outer sums (from outer_sum with block_rows) of `blocks` blocks, stored for C =
    stored_blocks(blocks) (zero sums past the last block): h (B, H, C, D, D), z (B, H, C, D) float32. For 16-bit
    inputs h is 16-bit (KernelConfig.block_sum_dtype): bfloat16 (the default, ~2^-8 relative) holds h itself and
    scale is None (bfloat16 has float32's range); float16 (~2^-11; the input's own precision is 2^-8 / 2^-11) holds
    h / scale with scale (B, H, C) a power of two per block. For float32 inputs h is float32 and scale is None.
    key_block_sums of scope "all" holds the totals here: h (B, H, D, D), z (B, H, D) float32, scale and blocks
    None. Iterates as (h, z, scale)."""

    h: jax.Array
    z: jax.Array
    scale: jax.Array | None
    blocks: int | None = None

    def __iter__(self):
        return iter((self.h, self.z, self.scale))


def _sum_over_blocks(mask, sums: _BlockSums, cfg: KernelCall):
    """out[m] = sum_c mask[m, c] h[c] (and the same for z), per (b, h).

    mask (B, H, M, C) bool (columns past the blocks that exist may be anything: their stored sums are zero) ->
    (B, H, M, D, D) float32 (bf16 for 16-bit sums if KernelConfig.state_dtype says so),
    (B, H, M, D) float32. One dense batched matmul in XLA (cuBLAS) contracting over the blocks with float32
    accumulation; for float16 sums the mask carries the per-block scale (a power of two: exact); z in float32 (for
    16-bit sums as a bf16 hi + lo pair in one bf16 product: ~2^-18 relative, a fraction of the float32 product's
    time).
    """
    b, nh, c, d, _ = sums.h.shape
    h_flat = sums.h.reshape(b, nh, c, d * d)
    sixteen = jnp.dtype(sums.h.dtype) != jnp.dtype(F32)
    if not sixteen:
        weights, precision = mask.astype(F32), lax.Precision.HIGHEST
    elif sums.scale is None:  # bf16 sums hold h itself
        weights, precision = mask.astype(sums.h.dtype), None
    else:
        weights, precision = jnp.where(mask, sums.scale[:, :, None, :], 0.0).astype(sums.h.dtype), None
    bf16_states = sixteen and cfg.config.state_dtype == "bfloat16"
    # bf16 sums into bf16 states: the product asks for bf16 directly (cuBLAS accumulates in float32 and writes
    # bf16; asked for float32 and then converted, XLA ran a separate 0.75 ms convert at wan-14b-720p)
    direct = bf16_states and jnp.dtype(sums.h.dtype) == jnp.dtype(jnp.bfloat16)
    h_out = jnp.einsum("bhmc,bhcf->bhmf", weights, h_flat, precision=precision,
                       preferred_element_type=jnp.bfloat16 if direct else F32)
    if bf16_states:
        h_out = h_out.astype(jnp.bfloat16)
    if not sixteen:
        z_out = jnp.einsum("bhmc,bhcd->bhmd", mask.astype(F32), sums.z, precision=lax.Precision.HIGHEST)
    else:  # z = hi + lo in bf16 (<= 2^-18 relative), one bf16 product with float32 accumulation (0/1 mask exact)
        z_hi = sums.z.astype(jnp.bfloat16)
        z_lo = (sums.z - z_hi.astype(F32)).astype(jnp.bfloat16)
        both = jnp.einsum("bhmc,bhcd->bhmd", mask.astype(jnp.bfloat16), jnp.concatenate([z_hi, z_lo], axis=-1),
                          preferred_element_type=F32)
        z_out = both[..., :d] + both[..., d:]
    return h_out.reshape(b, nh, -1, d, d), z_out


def selection(lut, nk, *, queries_first=False, width=None):
    """sel (B, H, Nk, Nq) bool, or (B, H, Nq, Nk) with queries_first: key block j selected by query block i; ids
    outside [0, Nk) select nothing. width: the last axis' length if longer (columns past Nq, or Nk with
    queries_first, are False). One scatter of the LUT's B H Nq topk entries into zeros: its cost grows with
    H Nq Nk (the zeros) where a comparison of every (i, j) against the LUT grows with H Nq Nk topk (1.19 ms per
    forward at wan-14b-720p, 95%, H200; about equal at wan-1.3b)."""
    b, h, nq, _ = lut.shape
    key_axis = (width or nk) if queries_first else nk
    ids = jnp.where((lut >= 0) & (lut < nk), lut, key_axis)  # out of range: past the key axis, dropped
    bi, hi = jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None]
    qi = jnp.arange(nq)[None, None, :, None]
    if queries_first:
        return jnp.zeros((b, h, nq, width or nk), jnp.bool_).at[bi, hi, qi, ids].set(True, mode="drop")
    return jnp.zeros((b, h, nk, width or nq), jnp.bool_).at[bi, hi, ids, qi].set(True, mode="drop")


def key_block_sums(k, v, cfg: KernelCall, phi):
    """The linear states' sums of K and V (a _BlockSums) and, from the same read of K, the block means of K
    (B, H, Nk, D) float32 the router scores (finite rows, as the front end's): one pass over K and V serves both
    the routing and the linear states. The sums: per key block h_j = phi(K_j)^T V_j (B, H, Nk, D, D), z_j for the
    complement scope (stored for stored_blocks(Nk) blocks, zero past Nk); the totals H = phi(K)^T V (B, H, D, D),
    Z (B, H, D) float32 for scope "all". k, v (B, N, H, D); phi: the feature map."""
    if cfg.complement:
        return outer_sum(k, v, cfg, block_rows=cfg.block_k, phi=phi, means=True)
    (h, z), means = outer_sum(k, v, cfg, phi=phi, means=True)
    return _BlockSums(h, z, None), means


def complement_states(k_phi, v, lut, cfg: KernelCall, phi=None, sums=None):
    """H_i = sum_{j not in lut[i]} phi(K_j)^T V_j (B, H, Nq, D, D) and Z_i likewise of colsum phi(K_j)
    (B, H, Nq, D): the linear branch's state of each query block (float32, or bf16 H_i for 16-bit inputs with
    KernelConfig.state_dtype "bfloat16"), from per-key-block outer sums and one masked matmul over the unselected
    blocks (_sum_over_blocks). phi: None (k_phi is phi(K)), or the feature map (k_phi is K; phi applied in the
    outer-sum kernel). sums: the per-key-block sums if already made (key_block_sums), else made here."""
    if sums is None:
        sums = outer_sum(k_phi, v, cfg, block_rows=cfg.block_k, phi=phi)
    sel = selection(lut, cfg.nk, queries_first=True, width=sums.h.shape[2])  # (B, H, Nq, C): aligned rows
    return _sum_over_blocks(jnp.logical_not(sel), sums, cfg)  # blocks past Nk: "unselected", their sums are zero


def transpose_lut(lut, nk, sel=None):
    """For each key block, the query blocks that selected it (ascending, padded with Nq) and their count.

    Built on device without a sort: sel (B, H, Nk, Nq) (selection), the slot of each selected query block is
    the running count along Nq, and one scatter (unselected entries dropped) writes the ids. sel: the selection
    if already made (selection(lut, nk), at least Nq wide: its first Nq columns are used).
    """
    b, h, nq, topk = lut.shape
    sel = selection(lut, nk) if sel is None else sel[..., :nq]
    count = jnp.sum(sel, axis=-1, dtype=jnp.int32)
    slot = jnp.where(sel, _running_count(sel) - 1, nq)
    ids = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32), sel.shape)
    bi = jnp.arange(b)[:, None, None, None]
    hi = jnp.arange(h)[None, :, None, None]
    ji = jnp.arange(nk)[None, None, :, None]
    lut_t = jnp.full((b, h, nk, nq), nq, jnp.int32).at[bi, hi, ji, slot].set(ids, mode="drop")
    return lut_t, count


def _running_count(sel):
    """Inclusive running count of True along the last axis, int32 of sel's shape: a matmul with the (Nq, Nq)
    upper-triangular ones matrix on the tensor cores (0/1 operands in bf16, float32 sums: exact up to 2^24)."""
    n = sel.shape[-1]
    upper = (jnp.arange(n)[:, None] <= jnp.arange(n)[None, :]).astype(jnp.bfloat16)
    counts = jnp.matmul(sel.astype(jnp.bfloat16), upper, preferred_element_type=F32)
    return counts.astype(jnp.int32)


def forward_states(k_phi, v, lut, cfg: KernelCall, phi=None, sums=None):
    """The linear states the forward reads: per query block H_i, Z_i ((B, H, Nq, D, D) in the KernelConfig's
    state dtype for 16-bit inputs, else float32; (B, H, Nq, D) float32) for the complement scope, the totals
    H = phi(K)^T V (B, H, D, D) and Z = colsum phi(K) (B, H, D) float32 for scope "all"; (None, None) without a
    linear branch. phi: None (k_phi is phi(K)), or the feature map, applied to k_phi = K inside the kernel. sums:
    the sums of K and V if already made (key_block_sums: per key block, or the totals for scope "all")."""
    if not cfg.linear:
        return None, None
    if cfg.track_lin:
        return complement_states(k_phi, v, lut, cfg, phi, sums)
    if sums is not None:
        return sums.h, sums.z
    return outer_sum(k_phi, v, cfg, phi=phi)


def gradient_selection(lut, cfg: KernelCall):
    """selection(lut, Nk) made stored_blocks(Nq) wide, (B, H, Nk, C) bool: the mask of the gradient states'
    masked matmul (aligned rows) and, its first Nq columns, the transposed LUT's selection: the backward makes
    it once for both (two scatters of zeros at wan-14b-720p, where C = 640 != Nq = 591)."""
    return selection(lut, cfg.nk, width=stored_blocks(cfg.nq))


def gradient_states(q_phi, x, w, u, lut, cfg: KernelCall, phi=None, sel=None):
    """Linear-branch gradient states for the dK/dV side: dH = sum_r w_r q_phi_r^T x_r, dZ = sum_r u_r q_phi_r over
    all query rows, (B, H, D, D) and (B, H, D) float32; for the complement scope per key block j over the query
    blocks that did not select j, (B, H, Nk, D, D) and (B, H, Nk, D). w, u: (B, H, Npad) float32 row weights.
    phi: None (q_phi is phi(Q)), or the feature map, applied to q_phi = Q inside the sums kernel. sel: the
    complement scope's gradient_selection(lut, cfg) if already made."""
    if cfg.track_lin:
        sums = outer_sum(q_phi, x, cfg, w, u, block_rows=cfg.block_q, phi=phi)  # per query block
        sel = gradient_selection(lut, cfg) if sel is None else sel  # (B, H, Nk, C): aligned rows
        return _sum_over_blocks(jnp.logical_not(sel), sums, cfg)  # query blocks past Nq: zero sums
    return outer_sum(q_phi, x, cfg, w, u, phi=phi)
