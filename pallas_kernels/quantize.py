"""INT8 / FP8 quantisation (SageAttention2's arithmetic) shared by the front end, the low-bit Triton forward and the
Mosaic forward: in-kernel tile quantisation, the quantised keys / queries types, the pre-pass for calls that get
no quantised operands from the front end, and the FP8 values.

  * K~ = K - mean_N(K) (rounded to K's dtype), int8 per (batch, head, key block), scale = max(amax, 1e-12) / 127,
    round half to even, clip to [-127, 127]; Q likewise per query block (no smoothing); identical arithmetic to
    ``sla2_jax.quant.quantize_int8_blocks``.
  * V in float8_e4m3fn with one scale per (batch, head, channel) = amax over N / 448, stored transposed
    (B, H, D, Nk * block_k) so that P V's contraction dim (keys) is contiguous: K-major, as the 8-bit MMA wants.

Imports nothing else from this package but common.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._triton import CompilerParams, pl, plgpu
from .common import F32, load_rows

QUANT_MODES = ("int8", "int8_fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0
_FP8 = jnp.float8_e4m3fn
# Key order of the FP8 V^T within each group of 16 keys: position 4t + 2e + b holds key 8e + 2t + b (t < 4, e, b < 2),
# the order in which P's columns reach the 8-bit wgmma from the f32 accumulator's registers (module docstring).
P8_KEY_ORDER = tuple(8 * e + 2 * t + b for t in range(4) for e in range(2) for b in range(2))


def _round_half_even(y, interpret: bool):
    """Round half to even, float32 -> float32. The Triton lowering has no round: on the GPU one
    ``cvt.rni.f32.f32`` per element (inline PTX); in interpret mode XLA's round (same rounding)."""
    if interpret:
        return jnp.round(y)
    (r,) = plgpu.elementwise_inline_asm(
        "cvt.rni.f32.f32 $0, $1;",
        args=[y],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(y.shape, F32)],
    )
    return r


def _quantize_tile(x32, interpret: bool):
    """float32 tile (rows, D) -> (int8 tile, float32 scale) with one scale for the tile."""
    amax = jnp.max(jnp.max(jnp.abs(x32), axis=1), axis=0)
    scale = jnp.maximum(amax, 1e-12) / INT8_MAX
    return _round_half_even(jnp.clip(x32 / scale, -INT8_MAX, INT8_MAX), interpret).astype(jnp.int8), scale


def quantize_keys(k, block_k: int):
    """K~ = K - mean_N(K) (in K's dtype), then int8 per (batch, head, key block) (XLA).

    Returns (k8 int8 (B, N, H, D), scales float32 (B, H, Nk)); same values as
    ``sla2_jax.quant.quantize_int8_blocks(sla2_jax.smooth_keys(k), block_k)``.
    """
    return _quantize_keys(k, block_k)[:2]


def _quantize_keys(k, block_k: int):
    """(k8, scales, mean (B, H, D) float32) -- see quantize_keys."""
    b, n, h, d = k.shape
    nk = -(-n // block_k)
    k32 = k.astype(F32)
    mean = jnp.mean(k32, axis=1, keepdims=True)
    ks = (k32 - mean).astype(k.dtype).astype(F32)
    ks = jnp.pad(ks, ((0, 0), (0, nk * block_k - n), (0, 0), (0, 0))).reshape(b, nk, block_k, h, d)
    amax = jnp.max(jnp.abs(ks), axis=(2, 4))  # (B, Nk, H)
    scale = jnp.maximum(amax, 1e-12) / INT8_MAX
    k8 = jnp.clip(jnp.round(ks / scale[:, :, None, :, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return k8.reshape(b, nk * block_k, h, d)[:, :n], jnp.transpose(scale, (0, 2, 1)), mean[:, 0]


def quantize_values_fp8(v, block_k: int, *, interleave: bool = False, method: str = "pallas"):
    """V in float8_e4m3fn with one scale per (batch, head, channel) = amax over N / 448.

    Returns (v8t float8_e4m3fn (B, H, D, Nk*block_k) transposed, zero-padded past N; scales float32 (B, H, D)).
    interleave: the keys of each group of 16 in ``P8_KEY_ORDER`` (position i holds key
    P8_KEY_ORDER[i]), the order in which the Mosaic kernel's FP8 P reaches its wgmma (block_k % 16 == 0).
    method: "xla" or "pallas" (the amax by XLA, then one Pallas pass: program (j, h, b) reads block_k rows of V
    (interleaved: in that order, a gather load), divides by the scales, converts and stores the transposed tile;
    0.09 vs 0.41 ms for "xla" at wan-1.3b on H100). Both give the same bits.
    """
    if interleave and block_k % 16:
        raise ValueError(f"interleaved FP8 values need block_k a multiple of 16, got {block_k}")
    if method == "pallas":
        return _quantize_values_pallas(v, block_k, interleave)
    b, n, h, d = v.shape
    nk = -(-n // block_k)
    v32 = v.astype(F32)
    scale = jnp.maximum(jnp.max(jnp.abs(v32), axis=1), 1e-12) / FP8_MAX  # (B, H, D)
    v8 = jnp.clip(v32 / scale[:, None], -FP8_MAX, FP8_MAX).astype(_FP8)
    v8 = jnp.pad(v8, ((0, 0), (0, nk * block_k - n), (0, 0), (0, 0)))  # (B, N', H, D)
    if not interleave:
        return jnp.transpose(v8, (0, 2, 3, 1)), scale
    # key 16 g + 8 e + 2 t + c goes to position 16 g + 4 t + 2 e + c (P8_KEY_ORDER): part of the
    # transpose (one XLA transpose fusion; a gather by the order costs 0.4 ms at wan-1.3b on H100)
    v8 = v8.reshape(b, nk * block_k // 16, 2, 4, 2, h, d)  # (B, g, e, t, c, H, D)
    return jnp.transpose(v8, (0, 5, 6, 1, 3, 2, 4)).reshape(b, h, d, nk * block_k), scale


def _fp8_values_kernel(v_ref, scale_ref, v8t_ref, *, n, block, interleave):
    """Program (j, h, b): keys [j * block, (j + 1) * block) of V (N, D) -> (D, block) e4m3 tile of V^T / scale."""
    p = jnp.arange(block)
    key = p
    if interleave:  # position 16 g + 4 t + 2 e + c holds key 16 g + 8 e + 2 t + c (P8_KEY_ORDER)
        i = p % 16
        key = p - i + 8 * ((i // 2) % 2) + 2 * (i // 4) + i % 2
    rows = pl.program_id(0) * block + key
    d = v_ref.shape[-1]
    mask = jnp.broadcast_to((rows < n)[:, None], (block, d))
    x = plgpu.load(v_ref.at[rows[:, None], jnp.arange(d)[None, :]], mask=mask, other=0.0).astype(F32)  # gather
    v8 = jnp.clip(x / scale_ref[...][None, :], -FP8_MAX, FP8_MAX).astype(_FP8)
    v8t_ref[...] = v8.T


def _quantize_values_pallas(v, block_k: int, interleave: bool):
    """quantize_values_fp8 by one Pallas pass after an XLA amax (see there)."""
    b, n, h, d = v.shape
    nk = -(-n // block_k)
    scale = jnp.maximum(jnp.max(jnp.abs(v), axis=1).astype(F32), 1e-12) / FP8_MAX  # (B, H, D)
    interpret = jax.default_backend() != "gpu"
    v8t = pl.pallas_call(
        functools.partial(_fp8_values_kernel, n=n, block=block_k, interleave=interleave),
        grid=(nk, h, b),
        in_specs=[_seq_spec3(n, d), pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, 0))],
        out_specs=pl.BlockSpec((None, None, d, block_k), lambda j, hh, bb: (bb, hh, 0, j)),
        out_shape=jax.ShapeDtypeStruct((b, h, d, nk * block_k), _FP8),
        compiler_params=CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sla_fp8_values",
    )(v, scale)
    return v8t, scale


SCALE_LANES = 16  # the pre-pass writes each block's scale 16 times (a power-of-two tile), XLA keeps one


def quantize_rows(x, mean, valid, interpret: bool):
    """One block of rows to int8 with one scale, inside a kernel.

    x: (rows, D) tile in the input dtype, rows past N loaded as 0; mean: (D,) float32 or None; valid: (rows,) bool.
    With a mean the tile is smoothed first, (x - mean) rounded to x's dtype (as ``sla2_jax.smooth_keys``), invalid
    rows kept at 0. Returns (int8 (rows, D), float32 scale), the arithmetic of ``sla2_jax.quantize_int8_blocks``.
    """
    x32 = x.astype(F32)
    if mean is not None:
        x32 = jnp.where(valid[:, None], (x32 - mean[None, :]).astype(x.dtype).astype(F32), 0.0)
    return _quantize_tile(x32, interpret)


def store_quantised_rows(x8_ref, scale_ref, x8, scale, start, valid):
    """Store an int8 tile at rows [start, start + rows) of an (N, D) ref (valid rows only) and its scale
    (written ``SCALE_LANES`` times: a power-of-two tile; the caller keeps every SCALE_LANES-th value)."""
    mask = jnp.broadcast_to(valid[:, None], x8.shape)
    plgpu.store(x8_ref.at[pl.ds(start, x8.shape[0]), :], x8, mask=mask)
    scale_ref[...] = jnp.full((SCALE_LANES,), scale, F32)


def _quantize_rows_into(x_ref, x8_ref, scale_ref, mean, start, block, n, interpret):
    """Rows [start, start + block) of x (minus `mean` (D,) rounded to x's dtype, if given) -> x8_ref, scale_ref."""
    valid = (start + jnp.arange(block)) < n
    x8, scale = quantize_rows(load_rows(x_ref, start, block, n), mean, valid, interpret)
    store_quantised_rows(x8_ref, scale_ref, x8, scale, start, valid)


def _quant_kernel(x_ref, mean_ref, x8_ref, scale_ref, *, n, block, smooth, interpret):
    """Program (j, h, b): rows [j*block, (j+1)*block) of x (minus the mean if smooth) -> int8."""
    mean = mean_ref[...] if smooth else None
    _quantize_rows_into(x_ref, x8_ref, scale_ref, mean, pl.program_id(0) * block, block, n, interpret)


def _quant_qk_kernel(q_ref, k_ref, mean_ref, q8_ref, k8_ref, qs_ref, *ks_refs, n, block_q, block_k, interpret):
    """Program (i, h, b): query block i and the len(ks_refs) = block_q / block_k key blocks it covers."""
    i = pl.program_id(0)
    _quantize_rows_into(q_ref, q8_ref, qs_ref, None, i * block_q, block_q, n, interpret)
    mean = mean_ref[...]
    for u, ks_ref in enumerate(ks_refs):
        _quantize_rows_into(k_ref, k8_ref, ks_ref, mean, i * block_q + u * block_k, block_k, n, interpret)


def _lane_spec(d):
    return pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, j))


def _seq_spec3(n, d):
    return pl.BlockSpec((None, n, None, d), lambda j, hh, bb: (bb, 0, hh, 0))


def _quantize_pallas(x, block: int, mean, interpret: bool):
    """Pallas pre-pass: x (B, N, H, D) (minus mean (B, H, D) if given) -> int8 (B, N, H, D), scales (B, H, Nb)."""
    b, n, h, d = x.shape
    nb = -(-n // block)
    smooth = mean is not None
    if mean is None:
        mean = jnp.zeros((b, h, d), F32)
    x8, scales = pl.pallas_call(
        functools.partial(_quant_kernel, n=n, block=block, smooth=smooth, interpret=interpret),
        grid=(nb, h, b),
        in_specs=[_seq_spec3(n, d), pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, 0))],
        out_specs=[_seq_spec3(n, d), _lane_spec(SCALE_LANES)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.int8), jax.ShapeDtypeStruct((b, h, nb * SCALE_LANES), F32)],
        compiler_params=CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sla_int8_quant",
    )(x, mean)
    return x8, scales[:, :, ::SCALE_LANES]


def _quantize_qk_pallas(q, k, mean, block_q: int, block_k: int, interpret: bool):
    """One Pallas pre-pass for Q (per query block) and K - mean (per key block); needs block_k | block_q.

    Returns (q8, q_scale (B, H, Nq), k8, k_scale (B, H, Nk)); q8, k8 int8 (B, N, H, D).
    """
    b, n, h, d = q.shape
    nq, nk = -(-n // block_q), -(-n // block_k)
    r = block_q // block_k
    lanes = jax.ShapeDtypeStruct((b, h, nq * SCALE_LANES), F32)
    low = jax.ShapeDtypeStruct(q.shape, jnp.int8)
    seq = _seq_spec3(n, d)
    q8, k8, qs, *ks = pl.pallas_call(
        functools.partial(_quant_qk_kernel, n=n, block_q=block_q, block_k=block_k, interpret=interpret),
        grid=(nq, h, b),
        in_specs=[seq, seq, pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, 0))],
        out_specs=[seq, seq] + [_lane_spec(SCALE_LANES)] * (1 + r),
        out_shape=[low, low] + [lanes] * (1 + r),
        compiler_params=CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sla_int8_quant_qk",
    )(q, k, mean)
    k_scale = jnp.stack([x[:, :, ::SCALE_LANES] for x in ks], axis=-1).reshape(b, h, nq * r)
    return q8, qs[:, :, ::SCALE_LANES], k8, k_scale[:, :, :nk]


class QuantisedKeys(NamedTuple):
    """Smoothed keys K~ = K - mean_N(K) in int8, as the forward kernel reads them (optional kernel input).

    k8: int8 (B, N, H, D); scale: float32 (B, H, Nk), one per key block; mean: float32 (B, H, D), mean_N(K).
    Values of ``sla2_jax.quantize_int8_blocks(sla2_jax.smooth_keys(k), block_k)``; made by ``quantize_keys_with_mean``
    (XLA) or, with phi(K) and the block means from the same read of K, by ``front_end.block_means_phi_int8``.
    """

    k8: jax.Array
    scale: jax.Array
    mean: jax.Array


def quantize_keys_with_mean(k, block_k: int) -> QuantisedKeys:
    """``QuantisedKeys`` of k (B, N, H, D) by XLA (the reference formulas)."""
    return QuantisedKeys(*_quantize_keys(k, block_k))


class QuantisedQueries(NamedTuple):
    """Q in int8 as the INT8 forward reads it (``mosaic_forward.sparse_attention_mosaic_int8(queries=...)``).

    q8: int8 (B, N, H, D); scale: float32 (B, H, Nq), one per query block; shift: float32 (B, H, Nq * block),
    (q . mean_N(K)) * shift_scale per row, 0 past N (the LSE correction of smoothed keys). Values of
    ``quantize_queries``; made by ``block_means_phi_int8_queries`` from the front end's read of Q."""

    q8: jax.Array
    scale: jax.Array
    shift: jax.Array


class Quantised(NamedTuple):
    """Pre-pass outputs: q8/q_scale None when Q is quantised inside the forward kernel."""

    q8: jax.Array | None
    q_scale: jax.Array | None
    k8: jax.Array
    k_scale: jax.Array
    k_mean: jax.Array


def prequantize(q, k, block_q: int, block_k: int, interpret: bool, *, queries: bool = True) -> Quantised:
    """The quantisation pre-pass of a low-bit call that got no quantised operands from the front end: one Pallas
    kernel for Q (per query block) and K~ (per key block) where block_k divides block_q, else one kernel each;
    queries=False: K~ alone (q8, q_scale None: the forward kernel quantises Q itself). (Measured alternatives, an
    XLA pre-pass and separate kernels, were within noise or slower on H100: docs/dev/low_bit.md.)"""
    k_mean = jnp.mean(k.astype(F32), axis=1)  # (B, H, D)
    if queries and block_q % block_k == 0:
        return Quantised(*_quantize_qk_pallas(q, k, k_mean, block_q, block_k, interpret), k_mean)
    k8, k_scale = _quantize_pallas(k, block_k, k_mean, interpret)
    q8, q_scale = _quantize_pallas(q, block_q, None, interpret) if queries else (None, None)
    return Quantised(q8, q_scale, k8, k_scale, k_mean)


def _quant_query_kernel(q_ref, mean_ref, q8_ref, scale_ref, shift_ref, *, n, block, shift_scale, interpret):
    """Program (i, h, b): query rows [i*block, (i+1)*block) -> int8 with one scale, and each row's q . mean."""
    start = pl.program_id(0) * block
    valid = (start + jnp.arange(block)) < n
    x = load_rows(q_ref, start, block, n)
    x8, scale = quantize_rows(x, None, valid, interpret)
    store_quantised_rows(q8_ref, scale_ref, x8, scale, start, valid)
    shift_ref[...] = jnp.sum(x.astype(F32) * mean_ref[...][None, :], axis=1) * shift_scale


def quantize_queries(q, block_q: int, k_mean, shift_scale: float, *, interpret: bool = False, method="pallas"):
    """Q to int8 per (batch, head, query block) and the LSE shift of smoothed keys, from one read of Q.

    q (B, N, H, D) 16-bit or f32; k_mean (B, H, D) f32 (mean_N(K)). Returns (q8 int8 (B, N, H, D), q_scale f32
    (B, H, Nq), shift f32 (B, H, Nq * block_q) = (q . k_mean) * shift_scale per row, 0 past N). q8 and q_scale are
    those of ``quantize_blocks``. method: "pallas" (one Pallas-Triton pass) or "xla" (the reference formulas).
    """
    b, n, h, d = q.shape
    nq = -(-n // block_q)
    if method == "xla":
        q8, q_scale = quantize_blocks(q, block_q)
        shift = jnp.einsum("bnhd,bhd->bhn", q.astype(F32), k_mean, precision=lax.Precision.HIGHEST) * shift_scale
        return q8, q_scale, jnp.pad(shift, ((0, 0), (0, 0), (0, nq * block_q - n)))
    q8, scales, shift = pl.pallas_call(
        functools.partial(_quant_query_kernel, n=n, block=block_q, shift_scale=shift_scale, interpret=interpret),
        grid=(nq, h, b),
        in_specs=[_seq_spec3(n, d), pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, 0))],
        out_specs=[_seq_spec3(n, d), _lane_spec(SCALE_LANES), _lane_spec(block_q)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, jnp.int8),
            jax.ShapeDtypeStruct((b, h, nq * SCALE_LANES), F32),
            jax.ShapeDtypeStruct((b, h, nq * block_q), F32),
        ],
        compiler_params=CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sla_int8_quant_q",
    )(q, k_mean)
    return q8, scales[:, :, ::SCALE_LANES], shift


def quantize_blocks(x, block: int):
    """x (B, N, H, D) -> (int8 (B, N, H, D), scales (B, H, Nb)), as sla2_jax.quant.quantize_int8_blocks (XLA)."""
    b, n, h, d = x.shape
    nb = -(-n // block)
    x32 = jnp.pad(x.astype(F32), ((0, 0), (0, nb * block - n), (0, 0), (0, 0))).reshape(b, nb, block, h, d)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=(2, 4)), 1e-12) / INT8_MAX
    x8 = jnp.clip(jnp.round(x32 / scale[:, :, None, :, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return x8.reshape(b, nb * block, h, d)[:, :n], jnp.transpose(scale, (0, 2, 1))
