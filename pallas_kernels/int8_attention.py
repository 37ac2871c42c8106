"""Low-bit (INT8 / INT8+FP8) sparse branch of SLA2: Pallas GPU forward kernel (Triton backend), bf16 backward.

SPEC section 5 (after SageAttention2): the sparse branch's forward runs in low bit, the linear branch and the
SLA2 combine stay as in ``sparse_linear.py``, and the backward pass is the full-precision one (straight-through):
the bf16 backward kernels of ``sparse_linear.py`` run on the original q, k, v with the LSE and O_s saved by the
low-bit forward.

Quantisation (identical arithmetic to ``sla2_jax.quant.quantize_int8_blocks``: scale = max(amax, 1e-12) / 127,
round half to even, clip to [-127, 127]):
  * Q: one scale per (batch, head, query block of ``block_q`` rows).
  * K~ = K - mean_N(K) (rounded to K's dtype, as ``sla2_jax.routing.smooth_keys``), one scale per (batch, head,
    key block of ``block_k`` rows).
  * Library path (``sla2_jax.sla2_attention``, pallas backend): no pre-pass. The K front end
    (``prep.block_means_phi_int8``) quantises K~ in the read of K that gives phi(K) and the router's block means
    and passes it as ``keys=QuantisedKeys(...)``; the Q front end (``prep.block_means_phi_int8_queries``) does the
    same for Q (int8 Q, scales, LSE shift) and passes ``queries=`` (run 10). Without queries Q is quantised inside
    the Triton forward kernel, or by ``quantize_queries`` before the Mosaic one.
  * Called without ``keys``, default pre-pass ("fused"): ONE Pallas kernel, program (i, h, b) quantises query
    block i and the block_q / block_k key blocks it covers (one read of Q and K, one int8 write; the mean of K is
    one XLA reduction). int8 Q, K~ are stored (B, N, H, D) and the score is the transposed-B dot Q8 K8^T: both operands
    K-major, the layout the Hopper 8-bit MMA wants. Options (``OPTIONS``): separate Pallas calls for Q and K,
    an XLA pre-pass, or Q quantised inside the forward kernel (all measured: docs/perf_notes_int8.md).
  * quant="int8_fp8" additionally: V in float8_e4m3fn with one scale per (batch, head, channel) = amax_N / 448,
    stored transposed (B, H, D, Nk*block_k) so that P8 V8 is again a transposed-B (K-major) dot; P in
    float8_e4m3fn with the fixed scale 448 (P in [0, 1] -> [0, 448]). ``quantize_values_fp8``: the amax by XLA,
    then one Pallas pass (OPTIONS["v_pass"]; 0.09 vs 0.41 ms for the XLA transpose at wan-1.3b, run 9).

Forward kernel, grid (Nq, H, B) (block index fastest, like sparse_linear). Program (i, h, b):
  for each LUT entry j: S = (q8 K8_j^T)[int32 -> float32] * (s_q * s_k[j] * sm_scale * log2 e), keys >= N
  masked, exp2 online softmax (m_i, l_i, acc in f32), acc += P V_j (bf16, or P8 V8_j in fp8). The
  "complement" linear branch is handled as in the bf16 kernel (same ``sparse_linear.OPTIONS["fwd_linear"]`` and
  the shared ``_linear_inputs`` / ``_store_forward_outputs``): per-query-block states H_i, Z_i built before the
  kernel ("blocks", default; the dq kernel reuses them), or G += phi(K_j)^T V_j, z += z_j inside the loop
  ("loop"). Epilogue shared with the bf16 kernel: O_s = acc / l_i, LSE (base 2), O_l = phi(Q_i) H_i / (phi(Q_i)
  Z_i + eps), SLA2 combine in-kernel when fused.
  Flop per program: topk * (2 bq bk D [int8] + 2 bq bk D [bf16 or fp8] (+ 2 bk D^2 bf16 "loop"))
  + 4 bq D^2; bytes per LUT entry: bk D (int8 K) + bk D * 2 (bf16 V, or 1 for fp8) (+ bk D * 2 phi(K) "loop").

Hopper GPUs (OPTIONS["fwd_kernel"] "auto"): for quant "int8" and the shapes the Mosaic GPU kernels support the sparse
branch runs in the warp-specialised Mosaic kernel of ``sparse_mosaic.py`` instead (int8 wgmma for Q K~^T, Q
from ``queries`` or quantised by ``quantize_queries`` before it), with the linear branch and the combine in its
epilogue (bf16 per-block states; run 11), else followed by sparse_linear's Triton epilogue (docs/perf_notes_int8.md,
run 7: 1.3-1.4x faster than this file's kernel, 1.06-1.08x of the bf16 one).
quant "int8_fp8" too (OPTIONS["mosaic_fp8"]): P V by the e4m3 wgmma on the interleaved FP8 V^T (run 9: kernel
alone 1.07-1.09x of bf16, 1.00-1.03x of INT8; faster than this file's int8_fp8 kernel in the module).

LSE: the scores use K~, so the kernel adds q_i . mean_N(K) * sm_scale back to each row's LSE (softmax is
shift-invariant, the LSE is not) before the backward recomputes P from the unsmoothed K.

Gradients: straight-through. dQ, dK, dV, d phi(Q), d phi(K), d alpha come from ``sparse_linear._backward`` with
P = exp2(S_bf16 - LSE_lowbit): they equal the bf16 kernel's gradients up to the low-bit forward's error in
LSE and O_s (the fake-quant reference of sla2_jax uses the bf16 forward's statistics; the difference is of the
order of the quantisation error of the forward).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import sparse_linear as sl
from ._triton import CompilerParams, pl, plgpu
from .launch_config import gpu_generation

QUANT_MODES = ("int8", "int8_fp8")
INT8_MAX = 127.0
FP8_MAX = 448.0
_F32 = jnp.float32
_FP8 = jnp.float8_e4m3fn
_LOG2E = math.log2(math.e)

# Hopper: (head_dim, block_q, block_k, quant) -> (num_warps, num_stages); else the bf16 forward's entry.
LAUNCH_TABLE: dict[tuple[int, int, int, str], tuple[int, int]] = {
    (128, 128, 64, "int8"): (8, 4),  # H100, wan-1.3b at 95%: 2.44 vs 2.59 ms with (8, 3) (run 1); ~equal (run 4)
}
_OVERRIDE: dict[str, tuple[int, int]] = {}


# Implementation choices (read at trace time; the GPU check script times the alternatives):
#   q_prepass:  quantise Q in the pre-pass (int8 Q read by the forward kernel from memory) instead of inside the
#               forward kernel (Triton kernel);
#   prepass:    "fused" (one Pallas kernel for Q and K), "pallas" (one Pallas kernel each) or "xla";
#   fwd_kernel: "auto" (the INT8 Mosaic GPU kernel of sparse_mosaic.py on Hopper GPUs for the calls it supports:
#               quant "int8", N % 8 == 0, D % 64 == 0, block_q 128, 16-bit inputs, per-block linear states; the
#               Triton kernel of this file otherwise), "mosaic" (the same on any GPU) or "triton";
#   mosaic_q:   the Mosaic path's Q quantisation (with the LSE shift q . mean_N(K)): "pallas" (one Pallas-Triton
#               pass over Q) or "xla".
#   mosaic_fp8: quant "int8_fp8" also takes the Mosaic path (FP8 P V by the e4m3 wgmma) where "fwd_kernel" picks it;
#               False: the Triton kernel of this file.
#   v_pass:     quantize_values_fp8 by "xla" or "pallas" (one Pallas pass after the XLA amax).
# Defaults: measured on an H100 (docs/perf_notes_int8.md); the alternatives are within noise or slower.
OPTIONS = {
    "q_prepass": True,
    "prepass": "fused",
    "fwd_kernel": "auto",
    "mosaic_q": "pallas",
    "mosaic_fp8": True,
    "v_pass": "pallas",
}


class _Opts(NamedTuple):
    """OPTIONS frozen at trace time (hashable, passed to the kernels)."""

    q_prepass: bool
    prepass: str
    fwd_kernel: str
    mosaic_q: str
    mosaic_fp8: bool
    v_pass: str


def _opts() -> _Opts:
    o = _Opts(**OPTIONS)
    if (
        o.prepass not in ("fused", "pallas", "xla")
        or o.fwd_kernel not in ("auto", "mosaic", "triton")
        or o.mosaic_q not in ("pallas", "xla")
        or o.v_pass not in ("pallas", "xla")
    ):
        raise ValueError(f"bad OPTIONS {OPTIONS}")
    return o


@contextlib.contextmanager
def options(**kw):
    """Temporarily change OPTIONS (use a fresh jax.jit inside the block)."""
    old = dict(OPTIONS)
    OPTIONS.update(kw)
    try:
        yield
    finally:
        OPTIONS.clear()
        OPTIONS.update(old)


@contextlib.contextmanager
def override_launch(num_warps: int, num_stages: int):
    """Force (num_warps, num_stages) of the low-bit forward kernel (read at trace time: use a fresh jax.jit)."""
    old = dict(_OVERRIDE)
    _OVERRIDE["fwd"] = (num_warps, num_stages)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def _launch(cfg: sl._Cfg, quant: str):
    if "fwd" in _OVERRIDE:
        return _OVERRIDE["fwd"]
    key = (cfg.d, cfg.block_q, cfg.block_k, quant)
    if key in LAUNCH_TABLE and gpu_generation() == "hopper":
        return LAUNCH_TABLE[key]
    return sl.launch_config("fwd", cfg.d, cfg.block_q, cfg.block_k)[:2]


# ----------------------------------------------------------------------------------------------------------
# Quantisation pre-pass: smoothed K and Q to int8 (or fp8) per block, V to fp8 per channel (transposed).
# ----------------------------------------------------------------------------------------------------------
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
        result_shape_dtypes=[jax.ShapeDtypeStruct(y.shape, _F32)],
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
    k32 = k.astype(_F32)
    mean = jnp.mean(k32, axis=1, keepdims=True)
    ks = (k32 - mean).astype(k.dtype).astype(_F32)
    ks = jnp.pad(ks, ((0, 0), (0, nk * block_k - n), (0, 0), (0, 0))).reshape(b, nk, block_k, h, d)
    amax = jnp.max(jnp.abs(ks), axis=(2, 4))  # (B, Nk, H)
    scale = jnp.maximum(amax, 1e-12) / INT8_MAX
    k8 = jnp.clip(jnp.round(ks / scale[:, :, None, :, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return k8.reshape(b, nk * block_k, h, d)[:, :n], jnp.transpose(scale, (0, 2, 1)), mean[:, 0]


def quantize_values_fp8(v, block_k: int, *, interleave: bool = False, method: str | None = None):
    """V in float8_e4m3fn with one scale per (batch, head, channel) = amax over N / 448.

    Returns (v8t float8_e4m3fn (B, H, D, Nk*block_k) transposed, zero-padded past N; scales float32 (B, H, D)).
    interleave: the keys of each group of 16 in ``sparse_mosaic.P8_KEY_ORDER`` (position i holds key
    P8_KEY_ORDER[i]), the order in which the Mosaic kernel's FP8 P reaches its wgmma (block_k % 16 == 0).
    method: "xla" or "pallas" (the amax by XLA, then one Pallas pass: program (j, h, b) reads block_k rows of V
    (interleaved: in that order, a gather load), divides by the scales, converts and stores the transposed tile);
    None: OPTIONS["v_pass"]. Both give the same bits.
    """
    if interleave and block_k % 16:
        raise ValueError(f"interleaved FP8 values need block_k a multiple of 16, got {block_k}")
    if (method or _opts().v_pass) == "pallas":
        return _quantize_values_pallas(v, block_k, interleave)
    b, n, h, d = v.shape
    nk = -(-n // block_k)
    v32 = v.astype(_F32)
    scale = jnp.maximum(jnp.max(jnp.abs(v32), axis=1), 1e-12) / FP8_MAX  # (B, H, D)
    v8 = jnp.clip(v32 / scale[:, None], -FP8_MAX, FP8_MAX).astype(_FP8)
    v8 = jnp.pad(v8, ((0, 0), (0, nk * block_k - n), (0, 0), (0, 0)))  # (B, N', H, D)
    if not interleave:
        return jnp.transpose(v8, (0, 2, 3, 1)), scale
    # key 16 g + 8 e + 2 t + c goes to position 16 g + 4 t + 2 e + c (sparse_mosaic.P8_KEY_ORDER): part of the
    # transpose (one XLA transpose fusion; a gather by the order costs 0.4 ms at wan-1.3b, H100 run 9)
    v8 = v8.reshape(b, nk * block_k // 16, 2, 4, 2, h, d)  # (B, g, e, t, c, H, D)
    return jnp.transpose(v8, (0, 5, 6, 1, 3, 2, 4)).reshape(b, h, d, nk * block_k), scale


def _fp8_values_kernel(v_ref, scale_ref, v8t_ref, *, n, block, interleave):
    """Program (j, h, b): keys [j * block, (j + 1) * block) of V (N, D) -> (D, block) e4m3 tile of V^T / scale."""
    p = jnp.arange(block)
    key = p
    if interleave:  # position 16 g + 4 t + 2 e + c holds key 16 g + 8 e + 2 t + c (sparse_mosaic.P8_KEY_ORDER)
        i = p % 16
        key = p - i + 8 * ((i // 2) % 2) + 2 * (i // 4) + i % 2
    rows = pl.program_id(0) * block + key
    d = v_ref.shape[-1]
    mask = jnp.broadcast_to((rows < n)[:, None], (block, d))
    x = plgpu.load(v_ref.at[rows[:, None], jnp.arange(d)[None, :]], mask=mask, other=0.0).astype(_F32)  # gather
    v8 = jnp.clip(x / scale_ref[...][None, :], -FP8_MAX, FP8_MAX).astype(_FP8)
    v8t_ref[...] = v8.T


def _quantize_values_pallas(v, block_k: int, interleave: bool):
    """quantize_values_fp8 by one Pallas pass after an XLA amax (see there)."""
    b, n, h, d = v.shape
    nk = -(-n // block_k)
    scale = jnp.maximum(jnp.max(jnp.abs(v), axis=1).astype(_F32), 1e-12) / FP8_MAX  # (B, H, D)
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
    x32 = x.astype(_F32)
    if mean is not None:
        x32 = jnp.where(valid[:, None], (x32 - mean[None, :]).astype(x.dtype).astype(_F32), 0.0)
    return _quantize_tile(x32, interpret)


def store_quantised_rows(x8_ref, scale_ref, x8, scale, start, valid):
    """Store an int8 tile at rows [start, start + rows) of an (N, D) ref (valid rows only) and its scale
    (written ``SCALE_LANES`` times: a power-of-two tile; the caller keeps every SCALE_LANES-th value)."""
    mask = jnp.broadcast_to(valid[:, None], x8.shape)
    plgpu.store(x8_ref.at[pl.ds(start, x8.shape[0]), :], x8, mask=mask)
    scale_ref[...] = jnp.full((SCALE_LANES,), scale, _F32)


def _quantize_rows_into(x_ref, x8_ref, scale_ref, mean, start, block, n, interpret):
    """Rows [start, start + block) of x (minus `mean` (D,) rounded to x's dtype, if given) -> x8_ref, scale_ref."""
    valid = (start + jnp.arange(block)) < n
    x8, scale = quantize_rows(sl._load_rows(x_ref, start, block, n), mean, valid, interpret)
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
        mean = jnp.zeros((b, h, d), _F32)
    x8, scales = pl.pallas_call(
        functools.partial(_quant_kernel, n=n, block=block, smooth=smooth, interpret=interpret),
        grid=(nb, h, b),
        in_specs=[_seq_spec3(n, d), pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, 0))],
        out_specs=[_seq_spec3(n, d), _lane_spec(SCALE_LANES)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.int8), jax.ShapeDtypeStruct((b, h, nb * SCALE_LANES), _F32)],
        compiler_params=CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sla_int8_quant",
    )(x, mean)
    return x8, scales[:, :, ::SCALE_LANES]


def _quantize_qk_pallas(q, k, mean, cfg: sl._Cfg):
    """One Pallas pre-pass for Q (per query block) and K - mean (per key block); needs block_k | block_q.

    Returns (q8, q_scale (B, H, Nq), k8, k_scale (B, H, Nk)); q8, k8 int8 (B, N, H, D).
    """
    b, n, h, d = q.shape
    r = cfg.block_q // cfg.block_k
    lanes = jax.ShapeDtypeStruct((b, h, cfg.nq * SCALE_LANES), _F32)
    low = jax.ShapeDtypeStruct(q.shape, jnp.int8)
    seq = _seq_spec3(n, d)
    q8, k8, qs, *ks = pl.pallas_call(
        functools.partial(_quant_qk_kernel, n=n, block_q=cfg.block_q, block_k=cfg.block_k, interpret=cfg.interpret),
        grid=(cfg.nq, h, b),
        in_specs=[seq, seq, pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, 0))],
        out_specs=[seq, seq] + [_lane_spec(SCALE_LANES)] * (1 + r),
        out_shape=[low, low] + [lanes] * (1 + r),
        compiler_params=CompilerParams(num_warps=4, num_stages=1),
        interpret=cfg.interpret,
        name="sla_int8_quant_qk",
    )(q, k, mean)
    k_scale = jnp.stack([x[:, :, ::SCALE_LANES] for x in ks], axis=-1).reshape(b, h, cfg.nq * r)
    return q8, qs[:, :, ::SCALE_LANES], k8, k_scale[:, :, : cfg.nk]


class QuantisedKeys(NamedTuple):
    """Smoothed keys K~ = K - mean_N(K) in int8, as the forward kernel reads them (optional kernel input).

    k8: int8 (B, N, H, D); scale: float32 (B, H, Nk), one per key block; mean: float32 (B, H, D), mean_N(K).
    Values of ``sla2_jax.quantize_int8_blocks(sla2_jax.smooth_keys(k), block_k)``; made by ``quantize_keys_with_mean``
    (XLA) or, with phi(K) and the block means from the same read of K, by ``prep.block_means_phi_int8``.
    """

    k8: jax.Array
    scale: jax.Array
    mean: jax.Array


def quantize_keys_with_mean(k, block_k: int) -> QuantisedKeys:
    """``QuantisedKeys`` of k (B, N, H, D) by XLA (the reference formulas)."""
    return QuantisedKeys(*_quantize_keys(k, block_k))


class _Quantised(NamedTuple):
    """Pre-pass outputs: q8/q_scale None when Q is quantised inside the forward kernel."""

    q8: jax.Array | None
    q_scale: jax.Array | None
    k8: jax.Array
    k_scale: jax.Array
    k_mean: jax.Array


def _prequantize(q, k, cfg: sl._Cfg, opts: _Opts | None = None) -> _Quantised:
    """The quantisation pre-pass selected by ``opts`` (default: OPTIONS)."""
    o = opts or _opts()
    if o.prepass == "xla":
        k8, k_scale, k_mean = _quantize_keys(k, cfg.block_k)
        q8, q_scale = quantize_blocks(q, cfg.block_q) if o.q_prepass else (None, None)
        return _Quantised(q8, q_scale, k8, k_scale, k_mean)
    k_mean = jnp.mean(k.astype(_F32), axis=1)  # (B, H, D)
    if o.prepass == "fused" and o.q_prepass and cfg.block_q % cfg.block_k == 0:
        return _Quantised(*_quantize_qk_pallas(q, k, k_mean, cfg), k_mean)
    k8, k_scale = _quantize_pallas(k, cfg.block_k, k_mean, cfg.interpret)
    q8, q_scale = _quantize_pallas(q, cfg.block_q, None, cfg.interpret) if o.q_prepass else (None, None)
    return _Quantised(q8, q_scale, k8, k_scale, k_mean)


def _quant_query_kernel(q_ref, mean_ref, q8_ref, scale_ref, shift_ref, *, n, block, shift_scale, interpret):
    """Program (i, h, b): query rows [i*block, (i+1)*block) -> int8 with one scale, and each row's q . mean."""
    start = pl.program_id(0) * block
    valid = (start + jnp.arange(block)) < n
    x = sl._load_rows(q_ref, start, block, n)
    x8, scale = quantize_rows(x, None, valid, interpret)
    store_quantised_rows(q8_ref, scale_ref, x8, scale, start, valid)
    shift_ref[...] = jnp.sum(x.astype(_F32) * mean_ref[...][None, :], axis=1) * shift_scale


def quantize_queries(q, block_q: int, k_mean, shift_scale: float, *, interpret: bool = False, method=None):
    """Q to int8 per (batch, head, query block) and the LSE shift of smoothed keys, from one read of Q.

    q (B, N, H, D) 16-bit or f32; k_mean (B, H, D) f32 (mean_N(K)). Returns (q8 int8 (B, N, H, D), q_scale f32
    (B, H, Nq), shift f32 (B, H, Nq * block_q) = (q . k_mean) * shift_scale per row, 0 past N). q8 and q_scale are
    those of ``quantize_blocks``. method: "pallas" (one Pallas-Triton pass) or "xla"; None: OPTIONS["mosaic_q"].
    """
    b, n, h, d = q.shape
    nq = -(-n // block_q)
    if (method or _opts().mosaic_q) == "xla":
        q8, q_scale = quantize_blocks(q, block_q)
        shift = jnp.einsum("bnhd,bhd->bhn", q.astype(_F32), k_mean, precision=lax.Precision.HIGHEST) * shift_scale
        return q8, q_scale, jnp.pad(shift, ((0, 0), (0, 0), (0, nq * block_q - n)))
    q8, scales, shift = pl.pallas_call(
        functools.partial(_quant_query_kernel, n=n, block=block_q, shift_scale=shift_scale, interpret=interpret),
        grid=(nq, h, b),
        in_specs=[_seq_spec3(n, d), pl.BlockSpec((None, None, d), lambda j, hh, bb: (bb, hh, 0))],
        out_specs=[_seq_spec3(n, d), _lane_spec(SCALE_LANES), _lane_spec(block_q)],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, jnp.int8),
            jax.ShapeDtypeStruct((b, h, nq * SCALE_LANES), _F32),
            jax.ShapeDtypeStruct((b, h, nq * block_q), _F32),
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
    x32 = jnp.pad(x.astype(_F32), ((0, 0), (0, nb * block - n), (0, 0), (0, 0))).reshape(b, nb, block, h, d)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=(2, 4)), 1e-12) / INT8_MAX
    x8 = jnp.clip(jnp.round(x32 / scale[:, :, None, :, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return x8.reshape(b, nb * block, h, d)[:, :n], jnp.transpose(scale, (0, 2, 1))


# ----------------------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------------------
def _int8_scores(q8, k8, scale, k_start, cfg: sl._Cfg):
    """S = (q8 k8^T)[int32 -> float32] * scale, float32 (block_q, block_k); keys >= N masked."""
    dims = (((1,), (1,)), ((), ()))  # transposed-B: both operands K-major
    s = lax.dot_general(q8, k8, dims, preferred_element_type=jnp.int32).astype(_F32) * scale
    kvalid = (k_start + jnp.arange(cfg.block_k)) < cfg.n
    return jnp.where(kvalid[None, :], s, sl._MASK_VALUE)


def _load_int8_rows(ref, start, size, n):
    """Rows [start, start + size) of an (N, D) int8 ref; rows >= N read as 0."""
    d = ref.shape[-1]
    rows = start + jnp.arange(size)
    mask = jnp.broadcast_to((rows < n)[:, None], (size, d))
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=mask, other=0)


def _query_tile(r, i, q_start, cfg: sl._Cfg):
    """This program's int8 Q tile and its scale (from the pre-pass, or quantised here)."""
    if "q8" in r:
        return _load_int8_rows(r["q8"], q_start, cfg.block_q, cfg.n), r["q_scale"][i]
    q32 = sl._load_rows(r["q"], q_start, cfg.block_q, cfg.n).astype(_F32)  # rows >= N are 0: amax unchanged
    return _quantize_tile(q32, cfg.interpret)


def _lowbit_fwd_kernel(*refs, names, cfg: sl._Cfg, fused: bool, fp8: bool, lin_in_loop: bool):
    r = dict(zip(names, refs))
    i = pl.program_id(0)
    q_start = i * cfg.block_q
    q8, s_q = _query_tile(r, i, q_start, cfg)
    qk_scale = s_q * (cfg.sm_scale * _LOG2E)

    carry = sl._initial_carry(cfg, lin_in_loop)

    def body(t, carry):
        acc, m_i, l_i = carry[:3]
        j = r["lut"][i, t]
        k_start = j * cfg.block_k
        k8 = _load_int8_rows(r["k8"], k_start, cfg.block_k, cfg.n)
        s = _int8_scores(q8, k8, qk_scale * r["k_scale"][j], k_start, cfg)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        correction = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l_i = l_i * correction + jnp.sum(p, axis=1)
        v = sl._load_rows(r["v"], k_start, cfg.block_k, cfg.n) if "v" in r else None
        if fp8:
            v8t = r["v8t"][:, pl.ds(k_start, cfg.block_k)]  # (D, block_k), zero-padded past N
            p8 = (p * FP8_MAX).astype(_FP8)
            pv = lax.dot_general(p8, v8t, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
        else:
            pv = sl._dot(p.astype(v.dtype), v)
        out = (acc * correction[:, None] + pv, m_new, l_i)
        if lin_in_loop:
            g, z_sel = carry[3:]
            k_phi = sl._load_rows(r["k_phi"], k_start, cfg.block_k, cfg.n)
            g = g + sl._dot(k_phi, v, trans_a=True)
            z_sel = z_sel + r["z_blk"][pl.ds(j, 1), :]  # precomputed colsum phi(K_j): no cross-warp reduction
            out += (g, z_sel)
        return out

    carry = lax.fori_loop(0, cfg.topk, body, carry)
    acc, m_i, l_i = carry[:3]
    if fp8:
        acc = acc * (r["v_scale"][...] * (1.0 / FP8_MAX))[None, :]
    o_s = acc / l_i[:, None]
    # The scores used the smoothed K~ = K - mean: softmax is unchanged, but the LSE is shifted by q . mean per
    # row. Add it back so that the bf16 backward (which recomputes S from the unsmoothed K) sees a consistent LSE.
    if "lse" in r:
        q32 = sl._load_rows(r["q"], q_start, cfg.block_q, cfg.n).astype(_F32)
        shift = jnp.sum(q32 * r["k_mean"][...][None, :], axis=1) * (cfg.sm_scale * _LOG2E)
        r["lse"][...] = m_i + jnp.log2(l_i) + shift
    sl._store_forward_outputs(r, i, o_s, carry[3:] if lin_in_loop else None, cfg, fused)


def _forward(
    q, k, v, q_phi, k_phi, lut, alpha, keys, cfg: sl._Cfg, quant: str, *, fused: bool, residuals: bool, queries=None
):
    """Low-bit forward; returns the same dict as ``sparse_linear._forward`` (o / o_s, o_l, lse, den, totals).

    keys: ``QuantisedKeys`` made before (then Q is quantised inside the forward kernel and there is no pre-pass)
    or None (the pre-pass selected by OPTIONS). queries: None or Q quantised before (``prep.QuantisedQueries``,
    with keys): the kernels read its int8 Q and scales instead of quantising Q.
    """
    if _use_mosaic(q, cfg, quant):
        return _forward_mosaic(
            q, k, v, q_phi, k_phi, lut, alpha, keys, cfg, fused=fused, residuals=residuals, queries=queries, quant=quant
        )
    q_given = (None, None) if queries is None else tuple(queries)[:2]
    quantised = _prequantize(q, k, cfg) if keys is None else _Quantised(*q_given, *keys)
    return _forward_quantised(
        q, k, v, q_phi, k_phi, lut, alpha, quantised, cfg, quant, fused=fused, residuals=residuals
    )


def _use_mosaic(q, cfg: sl._Cfg, quant: str) -> bool:
    """OPTIONS["fwd_kernel"] asks for the INT8 Mosaic GPU forward ("mosaic", or "auto" on a Hopper GPU) and it
    supports the call (quant "int8", or "int8_fp8" with OPTIONS["mosaic_fp8"] and block_k % 16 == 0; per-block
    linear states, sparse_linear._mosaic_supports)."""
    fp8_ok = _opts().mosaic_fp8 and cfg.block_k % 16 == 0
    return (
        (quant == "int8" or (quant == "int8_fp8" and fp8_ok))
        and not sl._lin_in_loop("fwd", cfg)
        and sl._mosaic_chosen(_opts().fwd_kernel, q, cfg)
    )


def _forward_mosaic(
    q, k, v, q_phi, k_phi, lut, alpha, keys, cfg: sl._Cfg, *, fused: bool, residuals: bool, queries=None, quant="int8"
):
    """INT8 sparse branch by the Mosaic GPU kernel; the linear branch and the combine in its epilogue (quant "int8",
    where sparse_linear._mosaic_epilogue allows, as for bf16) or in sparse_linear's Triton epilogue after it (o_s,
    LSE through memory); the same dict as ``_forward_quantised``. keys None: a K pre-pass first.
    quant "int8_fp8": P V in FP8 too, V quantised per channel by ``quantize_values_fp8`` (interleaved keys)."""
    from . import sparse_mosaic as sm

    if keys is None:
        qz = _prequantize(q, k, cfg, _opts()._replace(q_prepass=False))
        keys = QuantisedKeys(qz.k8, qz.k_scale, qz.k_mean)
    linear_inputs, h_tot, z_tot = sl._linear_inputs(q_phi, k_phi, v, lut, cfg, False)
    named = {name: x for name, x, _ in linear_inputs}
    kw = {"block_k": cfg.block_k, "sm_scale": cfg.sm_scale, "queries": queries}
    if quant == "int8" and sl._mosaic_epilogue(named, cfg):
        # shared memory at D = 128: int8 Q 16 KB, ring of 4 (8 + 16 KB), phi(Q), H_i, 1 tile of its own (three outputs)
        linear, plan = sl._mosaic_epilogue_args(q, alpha, named, cfg, fused=fused, residuals=residuals)
        out = sm.sparse_linear_attention_mosaic_int8(q, k, v, lut, keys, linear, **plan, **kw)
    else:
        values = quantize_values_fp8(v, cfg.block_k, interleave=True) if quant == "int8_fp8" else None
        o_s, lse = sm.sparse_attention_mosaic_int8(q, k, v, lut, keys, stages=4, values=values, **kw)
        out = sl._linear_epilogue(q, o_s, lse, alpha, linear_inputs, cfg, fused=fused, residuals=residuals)
    out["h_tot"], out["z_tot"] = h_tot, z_tot
    return out


def _forward_quantised(
    q, k, v, q_phi, k_phi, lut, alpha, quantised: _Quantised, cfg: sl._Cfg, quant: str, *, fused: bool, residuals: bool
):
    """The forward kernel given the pre-pass outputs (timed on its own by experiments/check_int8_gpu.py)."""
    b, _, h, d = q.shape
    fp8 = quant == "int8_fp8"
    seq = sl._seq_spec(cfg)
    qz = quantised
    inputs = [("lut", lut, sl._full_spec(cfg.nq, cfg.topk))]
    if qz.q8 is not None:
        inputs += [("q8", qz.q8, seq), ("q_scale", qz.q_scale, sl._full_spec(cfg.nq))]
    if qz.q8 is None or residuals:
        inputs += [("q", q, seq)]
    inputs += [("k8", qz.k8, seq), ("k_scale", qz.k_scale, sl._full_spec(cfg.nk))]
    if residuals:
        inputs += [("k_mean", qz.k_mean, sl._full_spec(d))]
    if fp8:
        v8t, v_scale = quantize_values_fp8(v, cfg.block_k)
        inputs += [("v8t", v8t, sl._full_spec(d, cfg.nk * cfg.block_k)), ("v_scale", v_scale, sl._full_spec(d))]
    lin_in_loop = sl._lin_in_loop("fwd", cfg)
    if not fp8 or lin_in_loop:
        inputs += [("v", v, seq)]
    linear_inputs, h_tot, z_tot = sl._linear_inputs(q_phi, k_phi, v, lut, cfg, lin_in_loop)
    inputs += linear_inputs
    if fused:
        inputs += [("alpha", alpha, sl._full_spec(cfg.nq))]
    outputs = sl._forward_outputs(q, cfg, fused=fused, residuals=residuals)
    names = tuple(x[0] for x in inputs) + tuple(x[0] for x in outputs)
    num_warps, num_stages = _launch(cfg, quant)
    res = pl.pallas_call(
        functools.partial(_lowbit_fwd_kernel, names=names, cfg=cfg, fused=fused, fp8=fp8, lin_in_loop=lin_in_loop),
        grid=(cfg.nq, h, b),
        in_specs=[x[2] for x in inputs],
        out_specs=[x[2] for x in outputs],
        out_shape=[x[1] for x in outputs],
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=cfg.interpret,
        name=f"sla_fwd_{quant}",
    )(*[x[1] for x in inputs])
    out = dict(zip([x[0] for x in outputs], res))
    out["h_tot"], out["z_tot"] = h_tot, z_tot
    return out


# ----------------------------------------------------------------------------------------------------------
# custom_vjp wiring: low-bit forward, bf16 backward of sparse_linear (straight-through)
# ----------------------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _branches(q, k, v, q_phi, k_phi, lut, keys, queries, cfg, quant):
    out = _forward(q, k, v, q_phi, k_phi, lut, None, keys, cfg, quant, fused=False, residuals=False, queries=queries)
    return out["o_s"], out.get("o_l", jnp.zeros_like(q))


def _branches_fwd(q, k, v, q_phi, k_phi, lut, keys, queries, cfg, quant):
    out = _forward(q, k, v, q_phi, k_phi, lut, None, keys, cfg, quant, fused=False, residuals=True, queries=queries)
    res = sl._residuals(q, k, v, q_phi, k_phi, lut, None, out)
    return (out["o_s"], out.get("o_l", jnp.zeros_like(q))), res


def _branches_bwd(cfg, quant, res, cts):
    del quant
    return (*sl._branches_bwd(cfg, res, cts), None, None)  # no gradient to the quantised keys / queries


_branches.defvjp(_branches_fwd, _branches_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _fused(q, k, v, q_phi, k_phi, lut, alpha, keys, queries, cfg, quant):
    out = _forward(q, k, v, q_phi, k_phi, lut, alpha, keys, cfg, quant, fused=True, residuals=False, queries=queries)
    return out["o"]


def _fused_fwd(q, k, v, q_phi, k_phi, lut, alpha, keys, queries, cfg, quant):
    out = _forward(q, k, v, q_phi, k_phi, lut, alpha, keys, cfg, quant, fused=True, residuals=True, queries=queries)
    return out["o"], sl._residuals(q, k, v, q_phi, k_phi, lut, alpha, out)


def _fused_bwd(cfg, quant, res, do):
    del quant
    return (*sl._fused_bwd(cfg, res, do), None, None)  # no gradient to the quantised keys / queries


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _check_quant(quant, dtype):
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")


def _check_keys(keys, k, cfg: sl._Cfg):
    """keys: None or a QuantisedKeys matching k (B, N, H, D) and block_k; returned with stopped gradients."""
    if keys is None:
        return None
    b, n, h, d = k.shape
    expect = {"k8": ((b, n, h, d), jnp.int8), "scale": ((b, h, cfg.nk), _F32), "mean": ((b, h, d), _F32)}
    if not isinstance(keys, QuantisedKeys):
        raise ValueError(f"keys must be a QuantisedKeys or None, got {type(keys).__name__}")
    for name, (shape, dtype) in expect.items():
        x = getattr(keys, name)
        if tuple(x.shape) != shape or x.dtype != dtype:
            raise ValueError(f"keys.{name} must be {jnp.dtype(dtype).name} {shape}, got {x.dtype} {tuple(x.shape)}")
    return QuantisedKeys(*(lax.stop_gradient(x) for x in keys))


def _check_queries(queries, keys, q, cfg: sl._Cfg):
    """queries: None or (q8, scale, shift) (``prep.QuantisedQueries``) matching q and block_q, given with keys
    (the shift holds keys.mean); returned as a tuple with stopped gradients."""
    if queries is None:
        return None
    if keys is None:
        raise ValueError("queries need keys (the shift q . mean_N(K) belongs to the quantised keys)")
    b, n, h, d = q.shape
    expect = (((b, n, h, d), jnp.int8), ((b, h, cfg.nq), _F32), ((b, h, cfg.nq * cfg.block_q), _F32))
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
):
    """Sparse (LUT) and linear branches with a low-bit sparse-branch forward: (o_s, o_l).

    Same arguments and outputs as ``sparse_linear.sparse_linear_attention`` plus
      quant: "int8" (Q and smoothed K in INT8 per block, P V in q.dtype) or "int8_fp8" (also P and V in FP8 e4m3).
      keys: optional ``QuantisedKeys`` of k (made where k is read anyway, e.g. ``prep.block_means_phi_int8``):
        the kernel then runs without a pre-pass and quantises Q itself. None: a pre-pass quantises K~ (and Q).
      queries: optional int8 Q with scales and LSE shift, given with keys (``prep.QuantisedQueries``, from the read
        of Q that gives phi(Q): ``prep.block_means_phi_int8_queries`` with block_q and sm_scale * log2 e): then
        nothing quantises Q here.
    q, k, v are the original (unquantised) tensors; K is smoothed inside. The forward of the sparse branch is
    low bit; gradients (w.r.t. q, k, v, q_phi, k_phi) are the full-precision ones (straight-through).
    """
    _check_quant(quant, q.dtype)
    cfg = sl._validate(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret)
    keys = _check_keys(keys, k, cfg)
    queries = _check_queries(queries, keys, q, cfg)
    return _branches(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, keys, queries, cfg, quant)


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
):
    """SLA2 output o = alpha * o_s + (1 - alpha) * o_l in one kernel, o_s from the low-bit sparse branch.

    Same arguments as ``sparse_linear.sla2_fused_attention`` plus ``quant``, ``keys`` and ``queries`` (see
    ``sparse_linear_attention_lowbit``). Differentiable w.r.t. q, k, v, q_phi, k_phi and alpha (straight-through:
    the bf16 backward kernels with the low-bit forward's LSE and O_s).
    """
    _check_quant(quant, q.dtype)
    cfg = sl._validate(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret)
    alpha = sl._checked_alpha(alpha, q, cfg)
    keys = _check_keys(keys, k, cfg)
    queries = _check_queries(queries, keys, q, cfg)
    return _fused(q, k, v, q_phi.astype(q.dtype), k_phi.astype(q.dtype), lut, alpha, keys, queries, cfg, quant)


__all__ = [
    "OPTIONS",
    "QUANT_MODES",
    "QuantisedKeys",
    "options",
    "override_launch",
    "quantize_blocks",
    "quantize_keys",
    "quantize_keys_with_mean",
    "quantize_queries",
    "quantize_values_fp8",
    "sla2_fused_attention_lowbit",
    "sparse_linear_attention_lowbit",
]
