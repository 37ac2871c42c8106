"""The forward kernel on Hopper: block-sparse softmax attention (+ linear branch, SLA2 combine) in Mosaic GPU.

Why: the Triton forward (triton_forward.py) runs its 64-key LUT loop at ~300 TFLOP/s; Triton cannot
specialise warps, so the tensor cores wait while the same warps do the softmax. Mosaic GPU can: this kernel
follows the warp-specialised "ping-pong" scheme of FlashAttention-3 (as jax's dense Mosaic GPU attention does),
with the key/value tiles fetched by TMA from the LUT's key blocks instead of in sequence.

Grid (H, Nq, B), three warpgroups per program (query block i of 128 rows):
  * warpgroups 0 and 1 (compute): 64 query rows each; per LUT entry t: S = Q K_j^T (wgmma), online softmax in
    base 2, acc += P V_j (wgmma); by default (KernelConfig.pair_steps) two LUT entries per step, i.e.
    64 x 128 score tiles over two gathered key blocks. Two schemes (KernelConfig.loop): "pingpong" (default) has a
    shared barrier make the two take turns on the tensor cores, so one's softmax overlaps the other's matmuls;
    "pipelined" issues S_t and P_{t-1} V_{t-1} together and runs the softmax of step t under P_{t-1} V_{t-1}
    (FlashAttention-3's intra-warpgroup overlap).
  * warpgroup 2 (memory): TMA copies of K_j, V_j for j = lut[b, h, i, t] into a ring of ``stages`` slots (one or
    two key blocks each), the K (V) part refilled as soon as both compute warpgroups released it.
Outputs o_s (B, N, H, D) in v's dtype and lse (B, H, Nq * 128) float32, base 2 of the logits scaled by
sm_scale * log2(e): the layout and convention of the Triton forward, so the backward kernels can consume them.
Keys >= N (the ragged last key block, only ever the LUT's last entry: it is ascending) are masked; rows >= N are
neither read (TMA fills zeros) nor written.
Flop per program 4 * 128 * block_k * D * topk; bytes per LUT entry 2 * block_k * D * itemsize (from L2 mostly).

Two score operand types share the kernel (``_sparse_forward``):
  * 16-bit (``sparse_attention_mosaic``): S = Q K^T in float32 (bf16/f16 wgmma), times sm_scale * log2 e.
  * INT8 (``sparse_attention_mosaic_int8``): Q quantised per 128-row query block, K~ = K - mean_N(K) per
    key block (``quantize.QuantisedKeys``); S = (Q8 K8_j^T)[int32 wgmma -> float32] * s_q * s_k[j] *
    sm_scale * log2 e, one scale per LUT entry read from a (B, H, Nq, topk) table made before the kernel. P V stays
    16-bit. The LSE gets q . mean_N(K) * sm_scale * log2 e added back (softmax is shift-invariant, its LSE is
    not), so that the 16-bit backward, which recomputes P from the unsmoothed K, can use it.
  * INT8 + FP8 values (``sparse_attention_mosaic_int8(..., values=...)``, "int8_fp8"): as INT8, and P V
    by the e4m3 wgmma (f32 accumulator). V in float8_e4m3fn with one scale per (batch, head, channel), stored
    transposed (B, H, D, Nk * block_k) (``quantize.quantize_values_fp8(v, block_k, interleave=True)``): a
    (D, block_k) V^T tile has the keys, P V's contraction dim, contiguous: K-major, as the 8-bit wgmma wants (a
    transposed view gives the (keys, D) operand). P = exp2(S - m + log2 448), i.e. P * 448 in [0, 448] (the
    fixed FP8 scale of SageAttention2), goes to e4m3 in registers (cvt.rn.satfinite.e4m3x2.f32, two scores per
    instruction) and is the wgmma's A operand straight from registers: the e4m3 pairs of the f32 accumulator layout
    (thread t of a quad holds columns 2t, 2t+1 and 8+2t, 9+2t of each 16-column group) are concatenated as they are
    into the 8-bit A fragment (which takes columns 4t..4t+3), so P's columns reach the tensor core permuted within
    each group of 16 keys; V^T's keys are stored with the same permutation (``P8_KEY_ORDER``), so P V is exact.
    l_i sums the float32 P * 448, not the quantised P (as do the Triton int8_fp8 kernel and the fake-quant
    reference); the epilogue multiplies acc by v_scale[channel] and divides by l_i (the 448 cancels); the LSE
    subtracts log2 448. ``KernelConfig.p8_operand = "smem"`` stages P through shared memory instead.
8-bit tiles in shared memory are 128 bytes wide when the row is a multiple of 128 bytes (64 otherwise): tiling
(8, 128) or (8, 64) with the matching swizzle, K-major for both operands (the only layout the 8-bit wgmma takes;
K^T is a transposed view of the (keys, D) tile, V of the (D, keys) tile).

With the linear branch (``sparse_linear_attention_mosaic``): the TMA warpgroup also loads phi(Q_i) (or the epilogue
applies phi to the Q tile: ``LinearInputs.feature_map``), H_i (bf16, D x D) and Z_i; after the loop each compute
warpgroup forms den = phi(Q) . Z_i + eps (row sums in registers),
o_l = phi(Q) H_i / den (one more wgmma) and o = alpha o_s + (1 - alpha) o_l, and stores the outputs asked for (o,
o_s, o_l, lse, den) through its Q and phi(Q) tiles, then a finished V slot of the ring (``ring_holds_outputs``),
then tiles of its own. The INT8 kernel has the same epilogue (``sparse_linear_attention_mosaic_int8``; its int8
Q tile holds no 16-bit output).

Called by attention.py where KernelConfig.forward is "mosaic" (bf16 and low bit). Mosaic GPU kernels have no CPU
interpret mode: experiments/dev/probe_mosaic_sparse.py checks them on the GPU against the dense float32 reference; the
CPU tests lower them for CUDA and check the wiring around them with stand-ins. Measurements: docs/dev/forward_kernel.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .common import LOG2E
from .config import KernelConfig
from .quantize import FP8_MAX, quantize_queries

_FP8 = jnp.float8_e4m3fn
_ROWS = 64  # query rows per compute warpgroup (one wgmma M tile); a query block is 2 x 64 rows
_BLOCK_Q = 2 * _ROWS
_LOG2_FP8_MAX = math.log2(FP8_MAX)


def sparse_attention_mosaic(
    q, k, v, lut, *, block_k: int = 64, sm_scale: float | None = None, stages: int = 2,
    config: KernelConfig = KernelConfig(),
):
    """Sparse branch of SLA over the LUT's key blocks: q, k, v (B, N, H, D) bf16/f16, N % 8 == 0, D % 64 == 0;
    lut (B, H, Nq, topk) int32 with Nq = ceil(N / 128) -> (o_s (B, N, H, D) q.dtype, lse (B, H, Nq * 128) f32).
    config: the loop variant and launch choices (KernelConfig)."""
    _check(q, lut)
    scale = (1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale) * LOG2E
    return _sparse_forward(q, k, v, lut, scale, block_k=block_k, stages=stages, config=config)


class LinearInputs(NamedTuple):
    """The linear branch's inputs of the in-kernel epilogue (16-bit forward).

    q_phi (B, N, H, D) in q's dtype, or None: then phi(Q) is computed in the epilogue by ``feature_map``, from
    the kernel's own Q tile (16-bit scores) or, for int8 scores, from the 16-bit Q rows loaded into the phi(Q)
    tile (``sparse_linear_attention_mosaic_int8`` hands q over); h (B, H, Nq, D, D) bf16 (or f16): H_i of each
    query block (complement scope), or (B, H, 1, D, D): one state shared by all query blocks (scope "all");
    z (B, H, Nq or 1, D) f32: Z_i likewise; alpha (B, H, Nq) f32, or None when the combined output "o" is not asked
    for; eps: added to the denominator phi(Q_i) . Z_i; feature_map: phi, a function of a float32 (rows, D) tile ->
    float32 (rows, D) (e.g. ``sla2_jax.feature_maps.softmax_phi``), used when q_phi is None; its result is rounded to
    q's dtype, as a q_phi array would be."""

    q_phi: jax.Array | None
    h: jax.Array
    z: jax.Array
    alpha: jax.Array | None
    eps: float
    feature_map: object = None


_TILE_OUTPUTS = ("o", "o_s", "o_l")  # (B, N, H, D) in v's dtype
_ROW_OUTPUTS = ("lse", "den")  # (B, H, Nq * 128) float32
_PROFILE_SPACE = 64  # profiler events per warpgroup and program (KernelConfig.profile_dir)


def sparse_linear_attention_mosaic(
    q, k, v, lut, linear: LinearInputs, *, outputs, block_k=64, sm_scale=None, stages=4,
    config: KernelConfig = KernelConfig(),
):
    """Sparse branch, linear branch and SLA2 combine of each 128-row query block in one Mosaic GPU kernel.

    q, k, v (B, N, H, D) bf16/f16 as sparse_attention_mosaic; lut (B, H, Nq, topk) int32; linear: LinearInputs.
    outputs: names among "o" (alpha o_s + (1 - alpha) o_l), "o_s", "o_l" ((B, N, H, D) q.dtype), "lse" (base 2, as
    sparse_attention_mosaic), "den" (phi(Q_i) . Z_i + eps) ((B, H, Nq * 128) f32). With o_l = phi(Q_i) H_i / den:
    the epilogue of the Triton forward. config: the loop variant and launch choices (KernelConfig).
    Returns {name: array}."""
    _check(q, lut)
    scale = (1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale) * LOG2E
    outputs = tuple(outputs)
    res = _sparse_forward(
        q, k, v, lut, scale, block_k=block_k, stages=stages, linear=linear, outputs=outputs, config=config
    )
    return dict(zip(outputs, res))


def sparse_attention_mosaic_int8(
    q, k, v, lut, keys, *, block_k: int = 64, sm_scale: float | None = None, stages: int = 4, queries=None, values=None,
    config: KernelConfig = KernelConfig(),
):
    """INT8 sparse branch: q, k, v (B, N, H, D) bf16/f16 as sparse_attention_mosaic; keys an
    ``quantize.QuantisedKeys`` of k for ``block_k`` (int8 K~ (B, N, H, D), scales (B, H, Nk), mean (B, H, D));
    queries: None (Q quantised here by ``quantize.quantize_queries``) or its (q8 int8 (B, N, H, D),
    q_scale f32 (B, H, Nq), shift f32 (B, H, Nq * 128)); values: None (P V in v's dtype) or FP8 values ("int8_fp8"):
    ``quantize.quantize_values_fp8(v, block_k, interleave=True)`` = (v8t float8_e4m3fn (B, H, D, Nk * block_k),
    keys in ``P8_KEY_ORDER`` within each 16; v_scale f32 (B, H, D)); v is then not read.
    Returns (o_s (B, N, H, D) q.dtype, lse (B, H, Nq * 128) f32, base 2, of the unsmoothed scores)."""
    q8, step_scale, shift = _int8_operands(q, lut, keys, sm_scale, queries)
    o_s, lse = _sparse_forward(
        q8, keys.k8, v, lut, step_scale, block_k=block_k, stages=stages, values=values, config=config
    )
    return o_s, lse + shift


def sparse_linear_attention_mosaic_int8(
    q, k, v, lut, keys, linear: LinearInputs, *, outputs, block_k=64, sm_scale=None, stages=4, queries=None,
    config: KernelConfig = KernelConfig(),
):
    """INT8 sparse branch (as sparse_attention_mosaic_int8: Q8 K8~^T, P V in v's dtype) with the linear branch and
    the SLA2 combine in the kernel's epilogue (as sparse_linear_attention_mosaic): q, k, v, lut, keys, queries as
    sparse_attention_mosaic_int8; linear, outputs as sparse_linear_attention_mosaic ("lse" of the unsmoothed
    scores). linear.q_phi None: phi(Q) in the epilogue from q's rows (loaded where the phi(Q) tile would be).
    Returns {name: array}."""
    q8, step_scale, shift = _int8_operands(q, lut, keys, sm_scale, queries)
    outputs = tuple(outputs)
    res = _sparse_forward(
        q8, keys.k8, v, lut, step_scale, block_k=block_k, stages=stages, linear=linear, outputs=outputs, config=config,
        q16=q if linear.q_phi is None else None,
    )
    out = dict(zip(outputs, res))
    if "lse" in out:
        out["lse"] = out["lse"] + shift
    return out


def _int8_operands(q, lut, keys, sm_scale, queries):
    """(q8 (B, N, H, D) int8, per-LUT-entry score scales (B, H, Nq, topk) f32, LSE shift (B, H, Nq * 128) f32) of
    the INT8 kernels; queries None: Q quantised here (quantize.quantize_queries)."""
    _check(q, lut)
    scale = (1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale) * LOG2E
    if queries is None:
        queries = quantize_queries(q, _BLOCK_Q, keys.mean, scale, interpret=jax.default_backend() != "gpu")
    q8, q_scale, shift = queries
    return q8, lut_scales(lut, q_scale, keys.scale, scale), shift


def lut_scales(lut, q_scale, k_scale, scale: float):
    """Score scale of each LUT entry, (B, H, Nq, topk) f32: q_scale (B, H, Nq) * k_scale[lut] (B, H, Nk) * scale."""
    b, h, nq, topk = lut.shape
    ks = jnp.take_along_axis(k_scale, lut.reshape(b, h, nq * topk), axis=2).reshape(lut.shape)
    return ks * (q_scale[..., None] * scale)


def ring_holds_outputs(block_k: int, stages: int, config: KernelConfig) -> bool:
    """After the loop, each compute warpgroup can store one output tile through a V slot of the ring (slot steps %
    stages for warpgroup 0, (steps - 1) % stages for warpgroup 1, steps = the loop's steps: LUT entries or pairs of
    them): the slots are (block_k, D) (or (2 block_k, D) with pair steps, first 64 rows used) tiles of v's dtype,
    so block_k must be one warpgroup's 64 rows, and the two slots must differ (stages >= 2).

    Why the slots are free: with the "pingpong" loop, warpgroup 0 leaves its loop once warpgroup 1 arrived on
    the turn barrier after the softmax of the last step, i.e. after every read of warpgroup 1 except its last
    P V, which reads slot (steps - 1) % stages; every TMA copy into the ring has landed (warpgroup 0 waited for each).
    Warpgroup 1 leaves after that last P V, and warpgroup 0's reads all completed before its last arrival. The
    "pipelined" loop ends with both warpgroups meeting on the turn barrier after their last P V."""
    return config.outputs_in_ring and block_k == _ROWS and stages >= 2


def _check(q, lut):
    b, n, h, d = q.shape
    if lut.shape[2] != -(-n // _BLOCK_Q) or lut.shape[:2] != (b, h):
        raise ValueError(f"lut shape {lut.shape} must be (B, H, ceil(N / {_BLOCK_Q}), topk) for q shape {q.shape}")
    if d % 64 or n % 8:
        raise ValueError(f"need N a multiple of 8 and D of 64, got N={n}, D={d}")


def _tiles(plgpu, dtype, d: int):
    """SMEM transforms of a (rows, d) tile: rows of 128 bytes (64 for 8-bit D not a multiple of 128), swizzled."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = 128 if (d * itemsize) % 128 == 0 else 64
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _sparse_forward(
    q_op,
    k_op,
    v,
    lut,
    scale,
    *,
    block_k: int,
    stages: int,
    linear=None,
    outputs=("o_s", "lse"),
    config: KernelConfig,
    values=None,
    q16=None,
):
    """The kernel: score operands q_op, k_op (B, N, H, D) both 16-bit or both int8, values v (B, N, H, D) 16-bit.

    scale: a float (16-bit operands: sm_scale * log2 e) or, for int8 operands, the (B, H, Nq, topk) f32 table of
    per-LUT-entry scales (``lut_scales``). linear: None, or a ``LinearInputs`` (16-bit or int8 scores) for the
    linear branch and the SLA2 combine in the epilogue. outputs: names of _TILE_OUTPUTS ((B, N, H, D) v.dtype) and
    _ROW_OUTPUTS ((B, H, Nq * 128) f32); without ``linear`` only "o_s" and "lse". config: the loop variant and
    launch choices (KernelConfig). values: None, or FP8 values (v8t, v_scale) (``sparse_attention_mosaic_int8``; int8 scores, no linear
    branch): P V by the e4m3 wgmma, v gives only the output's shape and dtype. q16: the 16-bit Q (B, N, H, D) of
    int8 scores whose epilogue applies linear.feature_map (linear.q_phi None): its rows are loaded into the phi(Q)
    tile. Returns the outputs in the order asked, lse of the scores as computed (the caller corrects the LSE of
    smoothed keys)."""
    # GPU-only backend: imported on use
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b, n, h, d = v.shape
    if v.dtype not in (jnp.bfloat16, jnp.float16) or q_op.dtype not in (v.dtype, jnp.int8):
        raise ValueError(f"need 16-bit values and 16-bit or int8 scores, got {v.dtype}, {q_op.dtype}")
    nq, topk = lut.shape[2], lut.shape[3]
    quantised = q_op.dtype == jnp.int8
    _check_outputs(outputs, linear)
    shared_state = linear is not None and linear.h.shape[2:3] == (1,)  # scope "all": one state per (batch, head)
    states = 1 if shared_state else nq
    if linear is not None and (linear.h.shape != (b, h, states, d, d) or linear.z.shape != (b, h, states, d)):
        raise ValueError(
            f"h {linear.h.shape} / z {linear.z.shape} must be (B, H, Nq, D, D) / (B, H, Nq, D) or (B, H, 1, D, D) / "
            "(B, H, 1, D)"
        )
    fp8 = values is not None
    if fp8:
        _check_values(values, v, block_k, quantised, linear)
    loop = config.loop
    if fp8 and config.p8_operand == "smem":  # a staged P tile: one P V in flight at most
        loop = "pingpong"
    paired = config.pair_steps and block_k == _ROWS and not fp8 and topk > 1
    width = 2 * block_k if paired else block_k  # keys per loop step
    steps = -(-topk // 2) if paired else topk
    stages = max(1, min(max(2, stages // 2) if paired else stages, steps))
    if loop == "pipelined" and steps > 1:  # K_t and V_{t-1} are in use together: two slots at least
        stages = max(2, stages)
    ragged = n % block_k != 0
    # the last step with an odd topk in pairs: ping-pong takes its one entry as a 64-key step; the pipelined loop
    # computes a second half repeating the entry, masked
    half_tail = paired and topk % 2 == 1 and loop == "pingpong"
    tail_masked = ragged or (paired and topk % 2 == 1 and not half_tail)  # keys >= N, or the masked second half
    dtype = v.dtype
    f32 = jnp.float32
    acc_dtype = jnp.int32 if quantised else f32
    p8_smem = fp8 and config.p8_operand == "smem"
    tile_outs = [x for x in outputs if x in _TILE_OUTPUTS]
    row_outs = [x for x in outputs if x in _ROW_OUTPUTS]
    phi_in_kernel = linear is not None and linear.q_phi is None
    if phi_in_kernel and (not callable(linear.feature_map) or (quantised and q16 is None)):
        raise ValueError("phi(Q) in the kernel needs LinearInputs.feature_map (a function) and, for int8 scores, q16")
    # where the epilogue's phi(Q) comes from: a phi(Q) array, the 16-bit Q rows (int8 scores), or the Q tile
    phi_source = None if linear is None else "q_phi" if not phi_in_kernel else "q16" if quantised else None
    in_names = ["q", "k", "v", "lut"] + (["scale"] if quantised else []) + (["v_scale"] if fp8 else [])
    lin_names = ([phi_source] if phi_source else []) + ["h", "z"] if linear is not None else []
    in_names += lin_names + (["alpha"] if "o" in outputs else [])
    names = in_names + list(outputs)
    # 16-bit output tiles of a compute warpgroup: its Q tile (free after the loop; 16-bit only), its phi(Q) tile
    # (free once loaded into registers; with phi(Q) from the Q tile only allocated when an output needs it), then
    # one V slot of the ring (ring_holds_outputs), then tiles of their own
    q_tiles = 0 if quantised else 1
    phi_tile = linear is not None and (phi_source is not None or len(tile_outs) > q_tiles)
    reused = q_tiles + phi_tile
    # (FP8 V slots are (D, block_k) 8-bit: too small for a (64, D) 16-bit tile)
    in_ring = ring_holds_outputs(block_k, stages, config) and len(tile_outs) > reused and not fp8
    extra_tiles = max(0, len(tile_outs) - reused - in_ring)

    def body(refs, smem, bars):
        r = dict(zip(names, refs))
        bi, hi, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("qblock")
        wg = lax.axis_index("wg")
        k_smem, v_smem = smem["k"], smem["v"]
        k_ready, v_ready, k_free, v_free, turn = (bars[x] for x in ("k_ready", "v_ready", "k_free", "v_free", "turn"))

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def linear_branch(o_s, alpha):
            """o_l = phi(Q) H_i / den, den = phi(Q) . Z_i + eps (64 rows; one wgmma), and the combined o."""
            lin_ready = bars["lin_ready"]
            if phi_source is None:  # from the Q tile
                q_phi = plgpu.load(smem["q"].at[wg], (), layout=plgpu.Layout.WGMMA)
            else:  # phi(Q) rows, or (int8 scores) the 16-bit Q rows
                plgpu.barrier_wait(lin_ready.at[wg])
                q_phi = plgpu.load(smem["q_phi"].at[wg], (), layout=plgpu.Layout.WGMMA)
            if phi_in_kernel:  # rounded to q's dtype as a q_phi array is
                q_phi = linear.feature_map(q_phi.astype(f32)).astype(dtype)
            plgpu.barrier_wait(lin_ready.at[3])
            z = plgpu.load(smem["z"], (), layout=plgpu.Layout.WGMMA.reduce(0))
            den = (q_phi.astype(f32) * lax.broadcast_in_dim(z, (_ROWS, d), [1])).sum(axis=1) + linear.eps
            plgpu.barrier_wait(lin_ready.at[2])

            def product(acc_ref):
                plgpu.wgmma(acc_ref, q_phi.astype(linear.h.dtype), smem["h"])
                return acc_ref[...]

            num = pl.run_scoped(product, plgpu.ACC((_ROWS, d), f32))
            o_l = num / lax.broadcast_in_dim(den, num.shape, [0])
            vals = {"o_l": o_l, "den": den}
            if alpha is not None:
                vals["o"] = alpha * o_s + (1.0 - alpha) * o_l
            return vals

        def store_outputs(vals, row0):
            tiles = ([] if quantised else [smem["q"].at[wg]]) + ([smem["q_phi"].at[wg]] if phi_tile else [])
            if in_ring:  # see ring_holds_outputs
                tiles.append(smem["v"].at[lax.rem(steps - 1 + (1 - wg), stages), pl.ds(0, _ROWS)])
            tiles += [smem["out"].at[j, wg] for j in range(extra_tiles)]
            for name, tile in zip(tile_outs, tiles):
                tile[...] = vals[name].astype(dtype)
            for j, name in enumerate(row_outs):
                smem["rows"].at[j, wg][...] = vals[name]
            with jax.named_scope("c_store"):
                plgpu.commit_smem()
            for name, tile in zip(tile_outs, tiles):
                plgpu.copy_smem_to_gmem(tile, r[name].at[bi, pl.ds(row0, _ROWS), hi])
            for j, name in enumerate(row_outs):
                plgpu.copy_smem_to_gmem(smem["rows"].at[j, wg], r[name].at[bi, hi, pl.ds(row0, _ROWS)])
            with jax.named_scope("c_drain"):
                plgpu.wait_smem_to_gmem(0, wait_read_only=False)

        def step_entries(t):
            """LUT entries of loop step t: (t,), or (2t, min(2t + 1, topk - 1)) when paired (an odd topk's last step
            repeats the last entry in its second half, which the softmax masks)."""
            return (2 * t, jnp.minimum(2 * t + 1, topk - 1)) if paired else (t,)

        def softmax(s, t, m_i, masked, half=False):
            """Online-softmax step t on its score tile s (64, width) (float32, or int32 for int8 scores): LUT entry
            t, or entries 2t, 2t + 1 when paired (half: only entry 2t, a (64, block_k) tile): (P operand of the P V
            wgmma, new row max, correction exp2(m_i - m_new), row sums of P)."""
            entries = step_entries(t)[:1] if half else step_entries(t)
            two = len(entries) == 2  # a tile of two key blocks
            s_scale = r["scale"][bi, hi, qi, entries[0]] if quantised else scale
            if quantised:
                s = s.astype(f32)
            if (two and quantised) or masked:
                cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
            if two and quantised:  # one scale per key block: the two halves scaled here, s_scale 1 below
                s = s * jnp.where(cols < block_k, s_scale, r["scale"][bi, hi, qi, entries[1]])
                s_scale = None
            if masked:  # the last step: keys >= N (only in the last key block: the LUT is ascending), and with pairs
                # and an odd topk the second half, which repeats the last entry
                first = [r["lut"][bi, hi, qi, e] * block_k for e in entries]  # first key of each block
                keys = cols + first[0]
                if two:
                    keys = jnp.where(cols < block_k, keys, cols + (first[1] - block_k))
                valid = keys < n
                if two and topk % 2:
                    valid = jnp.logical_and(valid, cols < block_k)
                s = jnp.where(valid, s, -jnp.inf)
            row_max = s.max(axis=1)
            m_new = jnp.maximum(m_i, row_max if s_scale is None else row_max * s_scale)
            bias = m_new
            if fp8:  # P * 448 (the e4m3 range) for free: l_i and acc carry the factor, the epilogue drops it
                bias = bias - _LOG2_FP8_MAX
            correction = jnp.exp2(m_i - m_new)
            p = jnp.exp2((s if s_scale is None else s * s_scale) - lax.broadcast_in_dim(bias, s.shape, [0]))
            p_op = _p8_operand(plgpu, p) if fp8 else p.astype(dtype)
            return p_op, m_new, correction, p.sum(axis=1)

        def first_block(ref, slot):  # the first key block of a paired ring slot
            return ref.at[slot, pl.ds(0, block_k)]

        def k_operand(slot, half=False):  # K^T of a ring slot (half: of its first key block): the B operand of Q K^T
            return plgpu.transpose_ref(first_block(k_smem, slot) if half else k_smem.at[slot], (1, 0))

        def v_operand(slot, half=False):
            if fp8:
                return plgpu.transpose_ref(v_smem.at[slot], (1, 0))
            return first_block(v_smem, slot) if half else v_smem.at[slot]

        def run_steps(step, first, carry):
            """step(t, carry) for t in [first, steps), the last one with masked=tail_masked and half=half_tail (in
            a loop of one step: Mosaic wants a traced index)."""
            carry = lax.fori_loop(first, max(first, steps - 1), step, carry)
            if steps > first:
                tail = {"masked": tail_masked, **({"half": True} if half_tail else {})}  # half: ping-pong's step only
                carry = lax.fori_loop(steps - 1, steps, functools.partial(step, **tail), carry)
            return carry

        def rows_times(x, rows):
            return x * lax.broadcast_in_dim(rows, x.shape, [0])

        def pingpong_loop(my_q, acc, m_i, l_i):
            """One LUT entry per step: S = Q K^T, softmax, acc += P V; the two compute warpgroups take turns on the
            tensor cores (one's softmax under the other's matmuls)."""
            with jax.named_scope("c_wait_k0"):
                plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first

            def step(t, carry, masked=False, half=False):
                acc, m_i, l_i = carry
                slot = lax.rem(t, stages)

                def scores(s_ref):
                    plgpu.wgmma(s_ref, my_q, k_operand(slot, half))
                    take_turn()
                    return s_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((_ROWS, block_k if half else width), acc_dtype))
                plgpu.barrier_arrive(k_free.at[slot])
                p_op, m_new, correction, p_sum = softmax(s, t, m_i, masked, half)
                acc = rows_times(acc, correction)
                l_i = l_i * correction + p_sum
                acc, l_i, m_new, p_op = lax.optimization_barrier((acc, l_i, m_new, p_op))
                if p8_smem:  # no wgmma reads the tile now: the previous step's P V was waited for
                    smem["p8"].at[wg][...] = p_op
                    plgpu.commit_smem()
                    p_op = smem["p8"].at[wg]
                plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may use the tensor cores
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p_op, v_operand(slot, half))
                    nxt = t + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, stages)])

                acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = run_steps(step, 0, (acc, m_i, l_i))
            pl.when(wg == 0)(take_turn)
            return acc, m_i, l_i

        def pipelined_loop(my_q, acc, m_i, l_i):
            """FlashAttention-3's intra-warpgroup overlap: step t issues S_t = Q K_t^T and acc += P_{t-1} V_{t-1}
            together, waits for S_t only, and runs the softmax of entry t while P_{t-1} V_{t-1} is on the tensor
            cores; then waits for it and rescales acc. The two compute warpgroups do not take turns."""

            def first_scores(s_ref):
                plgpu.barrier_wait(k_ready.at[0])
                plgpu.wgmma(s_ref, my_q, k_operand(0))
                return s_ref[...]

            s = pl.run_scoped(first_scores, plgpu.ACC((_ROWS, width), acc_dtype))
            plgpu.barrier_arrive(k_free.at[0])
            p_op, m_i, _, l_i = softmax(s, 0, m_i, tail_masked and steps == 1)

            def step(t, carry, masked=False):
                acc, m_i, l_i, p_prev = carry
                slot, prev = lax.rem(t, stages), lax.rem(t - 1, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[prev])

                def both(s_ref, o_ref):
                    o_ref[...] = acc
                    plgpu.wgmma(s_ref, my_q, k_operand(slot))
                    plgpu.wgmma(o_ref, p_prev, v_operand(prev))
                    s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S_t done, P_{t-1} V_{t-1} may run on
                    plgpu.barrier_arrive(k_free.at[slot])
                    p_op, m_new, correction, p_sum = softmax(s, t, m_i, masked)
                    o = o_ref[...]
                    return rows_times(o, correction), m_new, l_i * correction + p_sum, p_op

                acc, m_i, l_i, p_op = pl.run_scoped(
                    both, plgpu.ACC((_ROWS, width), acc_dtype), plgpu.ACC((_ROWS, d), f32)
                )
                plgpu.barrier_arrive(v_free.at[prev])
                return acc, m_i, l_i, p_op

            acc, m_i, l_i, p_op = run_steps(step, 1, (acc, m_i, l_i, p_op))
            last_slot = (steps - 1) % stages
            plgpu.barrier_wait(v_ready.at[last_slot])

            def final_values(acc_ref):
                plgpu.wgmma(acc_ref, p_op, v_operand(last_slot))

            acc = pl.run_state(final_values)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[last_slot])
            take_turn()  # both past their last read of the ring before any output tile goes into it
            return acc, m_i, l_i

        @pl.when(wg < 2)
        def _compute():
            with jax.named_scope("c_setmaxnreg"):
                plgpu.set_max_registers(232, action="increase")
            row0 = qi * _BLOCK_Q + wg * _ROWS
            my_q = smem["q"].at[wg]
            plgpu.copy_gmem_to_smem(r["q"].at[bi, pl.ds(row0, _ROWS), hi], my_q, bars["q_ready"].at[wg])
            alpha = r["alpha"][bi, hi, qi] if "alpha" in r else None
            with jax.named_scope("c_wait_q"):
                plgpu.barrier_wait(bars["q_ready"].at[wg])
            rows = plgpu.Layout.WGMMA.reduce(1)
            m_i = plgpu.layout_cast(jnp.full((_ROWS,), -jnp.inf, f32), rows)
            l_i = plgpu.layout_cast(jnp.full((_ROWS,), 0.0, f32), rows)
            acc = plgpu.layout_cast(jnp.full((_ROWS, d), 0.0, f32), plgpu.Layout.WGMMA)
            with jax.named_scope("c_loop"):
                if loop == "pingpong":
                    acc, m_i, l_i = pingpong_loop(my_q, acc, m_i, l_i)
                else:
                    acc, m_i, l_i = pipelined_loop(my_q, acc, m_i, l_i)
            with jax.named_scope("c_epilogue"):
                lse = m_i + jnp.log2(l_i)
                if fp8:  # acc = sum of (P * 448) V8, l_i = sum of P * 448
                    plgpu.barrier_wait(bars["vs_ready"])
                    v_scale = plgpu.load(smem["v_scale"], (), layout=plgpu.Layout.WGMMA.reduce(0))
                    acc = acc * lax.broadcast_in_dim(v_scale, acc.shape, [1])
                    lse = lse - _LOG2_FP8_MAX
                o_s = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
                vals = {"o_s": o_s, "lse": lse}
                if linear is not None:
                    vals.update(linear_branch(o_s, alpha))
            store_outputs(vals, row0)

        @pl.when(wg == 2)
        def _memory():
            with jax.named_scope("m_setmaxnreg"):
                plgpu.set_max_registers(40, action="decrease")

            def step_blocks(t):
                """Key blocks of loop step t (step_entries)."""
                return [r["lut"][bi, hi, qi, e] for e in step_entries(t)]

            def slot_part(ref, slot, half):
                return ref.at[slot, pl.ds(half * block_k, block_k)] if paired else ref.at[slot]

            def fetch_k(blocks, slot):
                for half, key_block in enumerate(blocks):
                    rows = pl.ds(key_block * block_k, block_k)
                    plgpu.copy_gmem_to_smem(r["k"].at[bi, rows, hi], slot_part(k_smem, slot, half), k_ready.at[slot])

            def fetch_v(blocks, slot):
                for half, key_block in enumerate(blocks):
                    rows = pl.ds(key_block * block_k, block_k)
                    v_tile = r["v"].at[bi, hi, :, rows] if fp8 else r["v"].at[bi, rows, hi]  # FP8: V^T (D, block_k)
                    plgpu.copy_gmem_to_smem(v_tile, slot_part(v_smem, slot, half), v_ready.at[slot])

            with jax.named_scope("m_prime"):
                for t in range(stages):
                    blocks = step_blocks(t)
                    fetch_k(blocks, t)
                    fetch_v(blocks, t)
            if fp8:  # needed only in the epilogue
                plgpu.copy_gmem_to_smem(r["v_scale"].at[bi, hi], smem["v_scale"], bars["vs_ready"])
            if linear is not None:  # after the ring's first fill: needed only in the epilogue
                lin_ready = bars["lin_ready"]
                for half in range(2 if phi_source else 0):
                    rows = pl.ds(qi * _BLOCK_Q + half * _ROWS, _ROWS)
                    plgpu.copy_gmem_to_smem(r[phi_source].at[bi, rows, hi], smem["q_phi"].at[half], lin_ready.at[half])
                state = 0 if shared_state else qi
                plgpu.copy_gmem_to_smem(r["h"].at[bi, hi, state], smem["h"], lin_ready.at[2])
                plgpu.copy_gmem_to_smem(r["z"].at[bi, hi, state], smem["z"], lin_ready.at[3])

            @pl.loop(stages, steps)
            def _refill(t):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_free.at[slot])  # the K half of a slot is refilled as soon as it is released
                blocks = step_blocks(t)
                fetch_k(blocks, slot)
                plgpu.barrier_wait(v_free.at[slot])
                fetch_v(blocks, slot)

    def kernel_body(*refs):
        qk_tiles, v_tiles = _tiles(plgpu, q_op.dtype, d), _tiles(plgpu, dtype, d)
        # the swizzled tiles first, the small float32 vectors last (swizzled buffers are 1024-byte aligned)
        smem = [
            ("q", plgpu.SMEM((2, _ROWS, d), q_op.dtype, transforms=qk_tiles)),
            ("k", plgpu.SMEM((stages, width, d), q_op.dtype, transforms=qk_tiles)),
        ]
        if fp8:  # V^T tiles (D, block_k), keys contiguous; P tiles (64, block_k) for the "smem" operand
            p8_tiles = _tiles(plgpu, _FP8, block_k)
            smem.append(("v", plgpu.SMEM((stages, d, block_k), _FP8, transforms=p8_tiles)))
            if p8_smem:
                smem.append(("p8", plgpu.SMEM((2, _ROWS, block_k), _FP8, transforms=p8_tiles)))
        else:
            smem.append(("v", plgpu.SMEM((stages, width, d), dtype, transforms=v_tiles)))
        if extra_tiles:
            smem.append(("out", plgpu.SMEM((extra_tiles, 2, _ROWS, d), dtype, transforms=v_tiles)))
        bars = {
            "k_ready": plgpu.Barrier(num_arrivals=width // block_k, num_barriers=stages),  # a TMA copy per block
            "v_ready": plgpu.Barrier(num_arrivals=width // block_k, num_barriers=stages),
            "q_ready": plgpu.Barrier(num_barriers=2),
            "k_free": plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            "v_free": plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            "turn": plgpu.Barrier(num_arrivals=2),
        }
        if linear is not None:
            if phi_tile:
                smem.append(("q_phi", plgpu.SMEM((2, _ROWS, d), dtype, transforms=v_tiles)))
            smem.append(("h", plgpu.SMEM((d, d), linear.h.dtype, transforms=_tiles(plgpu, linear.h.dtype, d))))
            smem.append(("z", plgpu.SMEM((d,), f32)))
            bars["lin_ready"] = plgpu.Barrier(num_barriers=4)  # phi(Q) halves 0 and 1, H_i, Z_i
        if row_outs:
            smem.append(("rows", plgpu.SMEM((len(row_outs), 2, _ROWS), f32)))
        if fp8:
            smem.append(("v_scale", plgpu.SMEM((d,), f32)))
            bars["vs_ready"] = plgpu.Barrier()
        smem_names = [x[0] for x in smem]
        pl.run_scoped(
            lambda s, bs: body(refs, dict(zip(smem_names, s)), bs),
            tuple(x[1] for x in smem),
            bars,
            collective_axes="wg",
        )

    # the kernel's name (profilers show it): the function's
    kernel_body.__name__ = kernel_body.__qualname__ = (
        "sla_sparse_linear_fwd" if linear is not None else "sla_sparse_fwd"
    )
    out_struct = {
        **{x: jax.ShapeDtypeStruct(v.shape, dtype) for x in _TILE_OUTPUTS},
        **{x: jax.ShapeDtypeStruct((b, h, nq * _BLOCK_Q), f32) for x in _ROW_OUTPUTS},
    }
    inputs = [q_op, k_op, values[0] if fp8 else v, lut] + ([scale] if quantised else []) + ([values[1]] if fp8 else [])
    if linear is not None:
        inputs += [x for x in (linear.q_phi, q16 if phi_source == "q16" else None, linear.h, linear.z) if x is not None]
        inputs += [linear.alpha] if "o" in outputs else []
    # heads fastest: query blocks fastest measured +46% at wan-14b-720p, head groups of 4 +35% (H100)
    grid, grid_names = (h, nq, b), ("heads", "qblock", "batch")
    profile = {"profile_space": _PROFILE_SPACE, "profile_dir": config.profile_dir} if config.profile_dir else {}
    if linear is not None:  # its row reductions stay within warps: the 2 KB cross-warp scratch would not fit
        profile["reduction_scratch_bytes"] = 0
    return plgpu.kernel(
        kernel_body,
        out_type=tuple(out_struct[x] for x in outputs),
        grid=grid,
        grid_names=grid_names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profile),
    )(*inputs)


def _p8_operand(plgpu, p):
    """P * 448 (float32 (64, block_k), scores' accumulator layout) -> float8_e4m3fn in the 8-bit wgmma A layout, no
    data movement: the e4m3 pairs of columns (2t, 2t+1) and (8 + 2t, 9 + 2t) of each 16-column group that thread t
    of a quad holds become its 4 bytes of columns 4t..4t+3; logical column 4t + 2e + b of the result is column
    8e + 2t + b of P (``P8_KEY_ORDER``), which the V^T tiles' key order matches."""
    import numpy as np
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct(p.shape, _FP8, layout=plgpu.Layout.WGMMA_8BIT),
    )
    def relabel(_ctx, p32):
        p8 = p32.astype(mgpu_utils.dtype_to_ir_type(_FP8))  # cvt.rn.satfinite.e4m3x2.f32: vector<2 x e4m3> registers
        shape = fa.WGMMA_LAYOUT_8BIT.registers_shape(p8.shape)
        regs = np.empty(shape, dtype=object)
        for idx in np.ndindex(*shape):  # axis 1: 16-column groups (8BIT) <- pairs of 8-column groups (WGMMA)
            regs[idx] = mgpu_utils.vector_concat([p8.registers[(idx[0], 2 * idx[1] + j, *idx[2:])] for j in (0, 1)])
        return fa.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT_8BIT, _is_signed=None)

    return relabel(plgpu.layout_cast(p, plgpu.Layout.WGMMA))


def _check_values(values, v, block_k: int, quantised: bool, linear):
    """ValueError unless values = (v8t float8_e4m3fn (B, H, D, Nk * block_k), v_scale float32 (B, H, D)) for v
    (B, N, H, D), with int8 scores, no in-kernel linear branch and block_k a multiple of 16."""
    b, n, h, d = v.shape
    nk = -(-n // block_k)
    if not quantised or linear is not None or block_k % 16:
        raise ValueError("FP8 values need int8 scores, no in-kernel linear branch and block_k a multiple of 16")
    v8t, v_scale = values
    if v8t.shape != (b, h, d, nk * block_k) or v8t.dtype != _FP8:
        raise ValueError(f"values v8t must be float8_e4m3fn {(b, h, d, nk * block_k)}, got {v8t.dtype} {v8t.shape}")
    if v_scale.shape != (b, h, d) or v_scale.dtype != jnp.float32:
        raise ValueError(f"values v_scale must be float32 {(b, h, d)}, got {v_scale.dtype} {v_scale.shape}")


def _check_outputs(outputs, linear):
    """ValueError for outputs the kernel cannot give: unknown or repeated names, linear-branch outputs without
    LinearInputs, "o" without alpha."""
    known = _TILE_OUTPUTS + _ROW_OUTPUTS
    if not outputs or len(set(outputs)) != len(outputs) or any(x not in known for x in outputs):
        raise ValueError(f"outputs must be distinct names of {known}, got {outputs}")
    if linear is None and any(x not in ("o_s", "lse") for x in outputs):
        raise ValueError(f"outputs {outputs} need the linear branch's inputs")
    if "o" in outputs and linear.alpha is None:
        raise ValueError('output "o" needs alpha')
