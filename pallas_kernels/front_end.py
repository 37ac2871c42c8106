"""The router front end: Pallas Triton kernels for the block means, the feature maps and the top-k selection.

The feature map is an argument: a function phi of a float32 (rows, D) tile -> float32 (rows, D) (e.g. the
library's ``sla2_jax.feature_maps.softmax_phi``), applied inside the kernels and differentiated by JAX there; pass
the same function object each time (it is part of the jit cache key). None: the block means alone.

* ``block_means_and_phi(x, block, feature_map)``: one read of X (B, N, H, D) gives phi(X) (B, N, H, D, x.dtype)
  and the mean of every ``block``-row block over its finite rows, (B, H, Nb, D) float32 (a ragged last block
  averages its valid rows; rows >= N are masked, never padded; a row with a NaN or Inf entry is left out, so that
  it reaches only its own phi row, not the routing of its block: ``sla2_jax.pool_blocks``'s rule). Grid
  (Nb, H, B), one block per program, ``rows`` rows per loop step. Bytes: one read of X, one write of phi(X), 64
  bytes per block of finite-row count (the backward's residual). The backward is one kernel on the same grid:
  dX = vjp of phi (the feature map differentiated by JAX inside the kernel) applied to d phi, plus each block
  mean's cotangent spread over its finite rows; bytes: read X and d phi, write dX. (XLA's fusion of the same vjp
  ran at ~1 TB/s on H100: 0.38-0.40 ms per tensor at wan-1.3b; docs/dev/front_end.md.)
* ``block_means_phi_int8(k, block, feature_map)``: the same from one read of K, one ``block``-row tile per program,
  plus the int8 smoothed keys of the low-bit forward (``quantize.QuantisedKeys``: K~ = K - mean_N(K) per
  block, the mean by one XLA reduction before the kernel; a non-finite row is quantised as 0 and left out of its
  block's amax, as ``sla2_jax.quant.int8_block_scales`` does). Bytes: one read of K (twice with the mean), one write
  of phi(K), one int8 write.
* ``block_means_phi_int8_queries(q, block, feature_map, k_mean, shift_scale)``: Q's counterpart (same kernel):
  phi(Q), the block means, int8 Q with one scale per query block and each row's LSE shift
  (q . mean_N(K)) * shift_scale (``QuantisedQueries``), so the INT8 forward needs no Q pass of its own.
  Bytes: one read of Q, one write of phi(Q), one int8 write, 4 bytes per row of shift.
* ``feature_map_rows(x, feature_map)`` / ``feature_map_vjp(x, d_phi, d_x, feature_map)``: phi(X) alone (the same
  kernel, means dropped) and dX = vjp of phi at X applied to d_phi, plus d_x (the backward kernel, no means): the
  backward of the fused kernels that take q, k without phi arrays (``attention.sla2_fused_attention(...,
  feature_map=phi)``) makes phi(Q), phi(K) and applies phi's vjp with these.
* ``select_blocks(scores, topk, seq_len, block_k)``: per row of router logits S (B, H, Nq, Nk) float32, the
  ascending LUT of the top-k key blocks (the set of ``lax.top_k``, ties to the lower index) and the captured mass
  sum_{j selected} softmax_j(S + log n_j). Grid (ceil(Nq / rows), H, B); each program holds ``rows`` full rows:
  the k-th largest value by a 32-step radix search on the order-preserving integer image of the float32 bits,
  ties resolved by a running count, the LUT by one scatter of the selected columns to slot (running count - 1)
  (O(Nk) per row); interpret mode and GPU run the same code. Replaces
  top_k + sort + softmax + gather (four latency-bound XLA kernels) with one launch over 4 bytes per score.
  The mass is differentiable w.r.t. the scores (d mass / d S_j = p_j (sel_j - mass), XLA); the LUT is not.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._triton import CompilerParams, pl, plgpu
from .common import finite_rows, finite_sum, phi_vjp
from .quantize import SCALE_LANES, QuantisedKeys, QuantisedQueries, quantize_rows, store_quantised_rows

_F32 = jnp.float32
_INT_MIN = -(2**31)
_PREP_WARPS = 4
# warps of the int8 Q front end (one 128 x D tile per program), by whether it also writes phi(Q). H100: with phi
# 0.132 ms vs 0.160 with 4 warps at wan-1.3b; without (the library's low-bit forward) 4 warps: 0.104 vs 0.130 ms at
# wan-1.3b, 0.697 vs 0.975 ms at wan-14b-720p (16 warps: 0.141 / 1.032)
_PREP_Q_INT8_WARPS = {True: 8, False: 4}
_PREP_ROWS = 32  # rows per loop step; on H100 16..128 rows, 2..8 warps all ran at the byte floor (docs/dev/front_end.md)
_SELECT_WARPS = 4
_SELECT_ROW_ELEMENTS = 1024  # rows per select program: this / padded row length (a power of two in [1, 16])


def _interpret(interpret) -> bool:
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


# ----------------------------------------------------------------------------------------------------------
# Block means and phi
# ----------------------------------------------------------------------------------------------------------
def _store_count(count_ref, count):
    count_ref[...] = jnp.full((SCALE_LANES,), count, _F32)  # SCALE_LANES copies: a power-of-two tile


def _prep_kernel(x_ref, *out_refs, n: int, block: int, rows: int, phi):
    """Program (i, h, b): rows [i*block, (i+1)*block) of X (N, D), `rows` at a time -> phi of those rows, the
    mean (D,) of the finite ones and their count (out_refs: [phi], means, counts)."""
    start0 = pl.program_id(0) * block
    d = x_ref.shape[-1]

    def body(t, carry):
        total, count = carry
        start = start0 + t * rows
        valid = (start + jnp.arange(rows)) < n
        mask = jnp.broadcast_to(valid[:, None], (rows, d))
        x = plgpu.load(x_ref.at[pl.ds(start, rows), :], mask=mask, other=0.0).astype(_F32)
        if phi is not None:
            phi_ref = out_refs[0]
            plgpu.store(phi_ref.at[pl.ds(start, rows), :], phi(x).astype(phi_ref.dtype), mask=mask)
        block_total, block_count = finite_sum(x, finite_rows(x, valid))
        return total + block_total, count + block_count

    total, count = lax.fori_loop(0, block // rows, body, (jnp.zeros((d,), _F32), jnp.float32(0.0)))
    out_refs[-2][...] = total / jnp.maximum(count, 1.0)
    _store_count(out_refs[-1], count)


def _per_block_spec(width: int):
    return pl.BlockSpec((None, None, None, width), lambda i, hh, bb: (bb, hh, i, 0))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _prep_call(x, block: int, phi, interpret: bool, num_warps: int, rows: int):
    """[phi(X)], means (B, H, Nb, D) float32, finite-row counts (B, H, Nb, SCALE_LANES) float32."""
    b, n, h, d = x.shape
    nb = -(-n // block)
    seq = pl.BlockSpec((None, n, None, d), lambda i, hh, bb: (bb, 0, hh, 0))
    out_specs = [_per_block_spec(d), _per_block_spec(SCALE_LANES)]
    out_shape = [jax.ShapeDtypeStruct((b, h, nb, d), _F32), jax.ShapeDtypeStruct((b, h, nb, SCALE_LANES), _F32)]
    if phi is not None:
        out_specs, out_shape = [seq, *out_specs], [jax.ShapeDtypeStruct(x.shape, x.dtype), *out_shape]
    return pl.pallas_call(
        functools.partial(_prep_kernel, n=n, block=block, rows=min(rows, block), phi=phi),
        grid=(nb, h, b),
        in_specs=[seq],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="sla_prep",
    )(x)


def _prep_bwd_kernel(x_ref, *refs, n: int, block: int, rows: int, phi, pass_through: bool, means: bool = True):
    """Program (i, h, b): dX of rows [i*block, (i+1)*block), `rows` at a time: the vjp of phi at X applied to
    d phi (float32, the forward's feature map differentiated by JAX) plus, on the finite rows, d mean / (finite
    rows) (when means), plus the cotangent of X's pass-through output when there is one (refs: [d phi], [d means,
    counts], [d X in], d X out)."""
    refs = list(refs)
    dx_ref = refs.pop()
    dx_in_ref = refs.pop() if pass_through else None
    count_ref = refs.pop() if means else None
    d_mean_ref = refs.pop() if means else None
    d_phi_ref = refs.pop() if phi is not None else None
    start0 = pl.program_id(0) * block
    d = x_ref.shape[-1]
    if means:
        d_mean = d_mean_ref[...].astype(_F32) / jnp.maximum(jnp.max(count_ref[...]), 1.0)

    def body(t, carry):
        start = start0 + t * rows
        valid = (start + jnp.arange(rows)) < n
        mask = jnp.broadcast_to(valid[:, None], (rows, d))
        x = plgpu.load(x_ref.at[pl.ds(start, rows), :], mask=mask, other=0.0).astype(_F32)
        dx = jnp.where(finite_rows(x, valid)[:, None], d_mean[None, :], 0.0) if means else jnp.zeros_like(x)
        if phi is not None:
            d_phi = plgpu.load(d_phi_ref.at[pl.ds(start, rows), :], mask=mask, other=0.0).astype(_F32)
            dx = dx + phi_vjp(phi, x, d_phi)
        if dx_in_ref is not None:
            dx = dx + plgpu.load(dx_in_ref.at[pl.ds(start, rows), :], mask=mask, other=0.0).astype(_F32)
        plgpu.store(dx_ref.at[pl.ds(start, rows), :], dx.astype(dx_ref.dtype), mask=mask)
        return carry

    lax.fori_loop(0, block // rows, body, 0)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _prep_bwd_call(x, d_phi, d_means, counts, d_x, block: int, phi, interpret: bool, num_warps: int, rows: int):
    """dX (B, N, H, D) in x.dtype from d phi (B, N, H, D) (None when phi is None), d means (B, H, Nb, D) and the
    forward's finite-row counts (B, H, Nb, SCALE_LANES) (both None: no means), and the cotangent d_x (B, N, H, D)
    of X's pass-through output (None if there is none)."""
    b, n, h, d = x.shape
    seq = pl.BlockSpec((None, n, None, d), lambda i, hh, bb: (bb, 0, hh, 0))
    inputs = [(x, seq), (d_phi, seq), (d_means, _per_block_spec(d)), (counts, _per_block_spec(SCALE_LANES)),
              (d_x, seq)]
    inputs = [(a, spec) for a, spec in inputs if a is not None]
    return pl.pallas_call(
        functools.partial(
            _prep_bwd_kernel, n=n, block=block, rows=min(rows, block), phi=phi, pass_through=d_x is not None,
            means=d_means is not None,
        ),
        grid=(-(-n // block), h, b),
        in_specs=[spec for _, spec in inputs],
        out_specs=seq,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="sla_prep_bwd",
    )(*[a for a, _ in inputs])


def _with_input(outs, x, pass_through: bool):
    """The kernel's outputs, plus X itself as the last one when pass_through (see block_means_and_phi)."""
    return [*outs, x] if pass_through else list(outs)


def _prep_outputs(x, block, phi, interpret, num_warps, rows, pass_through):
    return _with_input(_prep_call(x, block, phi, interpret, num_warps, rows)[:-1], x, pass_through)


_prep = functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5, 6))(_prep_outputs)


def _prep_fwd(x, block, phi, interpret, num_warps, rows, pass_through):
    *outs, counts = _prep_call(x, block, phi, interpret, num_warps, rows)
    return _with_input(outs, x, pass_through), (x, counts)


def _prep_bwd(block, phi, interpret, num_warps, rows, pass_through, res, cts):
    x, counts = res
    cts = list(cts)
    d_x = cts.pop() if pass_through else None  # cts: [phi], means, [X]
    d_phi = cts[0] if phi is not None else None
    return (_prep_bwd_call(x, d_phi, cts[-1], counts, d_x, block, phi, interpret, num_warps, rows),)


_prep.defvjp(_prep_fwd, _prep_bwd)


def _check_prep_args(x, block, feature_map, rows):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must be (B, N, H, D); got shape {getattr(x, 'shape', None)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block={block!r} must be a power of two >= 16")
    if feature_map is not None and not callable(feature_map):
        raise ValueError(f"feature_map must be a function of a float32 (rows, D) tile or None, got {feature_map!r}")
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows={rows!r} must be a power of two")


def block_means_and_phi(
    x,
    block: int,
    feature_map=None,
    *,
    interpret=None,
    num_warps=_PREP_WARPS,
    rows=_PREP_ROWS,
    pass_through: bool = False,
):
    """phi(X) and the per-block means of X from one read of X.

    Args:
      x: (B, N, H, D) bf16/f16/f32, any N (ragged last block fine), D a power of two.
      block: rows per block (power of two >= 16), e.g. block_q for Q, block_k for K.
      feature_map: phi, a function float32 (rows, D) -> float32 (rows, D) applied row-wise (e.g.
        ``sla2_jax.feature_maps.softmax_phi``; the same function object each call), or None for the means alone.
      interpret: None -> Pallas interpret mode unless the default backend is a GPU.
      num_warps, rows: launch (warps per program, rows per loop step: a power of two, at most `block`).
      pass_through: also return X itself (same array). Use it in place of X in the rest of the computation: its
        cotangent is then added to dX inside the backward kernel, instead of by a separate XLA add afterwards.
    Returns:
      (phi(x) (B, N, H, D) in x.dtype or None, means (B, H, ceil(N / block), D) float32[, x]). Differentiable in x.
    """
    _check_prep_args(x, block, feature_map, rows)
    outs = _prep(x, block, feature_map, _interpret(interpret), num_warps, rows, pass_through)
    return (None, *outs) if feature_map is None else tuple(outs)


_PHI_BLOCK = 128  # rows per program of feature_map_rows / feature_map_vjp


def feature_map_rows(x, feature_map, *, interpret=None, num_warps=_PREP_WARPS, rows=_PREP_ROWS):
    """phi(X) (B, N, H, D) in x.dtype for x (B, N, H, D) bf16/f16/f32, by the front end's kernel (one read of X,
    one write; its block means are dropped). Not differentiable: the attention kernels that take q, k without
    phi arrays call it inside their custom_vjp and apply ``feature_map_vjp`` themselves."""
    _check_prep_args(x, _PHI_BLOCK, feature_map, rows)
    return _prep_call(x, _PHI_BLOCK, feature_map, _interpret(interpret), num_warps, rows)[0]


def feature_map_vjp(x, d_phi, d_x, feature_map, *, interpret=None, num_warps=_PREP_WARPS, rows=_PREP_ROWS):
    """dX = vjp of phi at X applied to d_phi, plus d_x (None: nothing added): (B, N, H, D) in x.dtype, one kernel
    (reads X, d_phi, d_x; writes dX), the feature map differentiated by JAX inside it."""
    _check_prep_args(x, _PHI_BLOCK, feature_map, rows)
    return _prep_bwd_call(x, d_phi, None, None, d_x, _PHI_BLOCK, feature_map, _interpret(interpret), num_warps, rows)


# ----------------------------------------------------------------------------------------------------------
# Block means and phi plus int8 blocks: K~ (smoothed keys) or Q (with the LSE shift) of the low-bit forward
# ----------------------------------------------------------------------------------------------------------
def _prep_int8_kernel(
    x_ref, mean_ref, *out_refs, n: int, block: int, phi, smooth: bool, shift_scale, interpret: bool
):
    """Program (j, h, b): rows [j*block, (j+1)*block) of X (N, D) in one tile -> phi of those rows, their mean,
    and the tile in int8 with the block's scale (the amax needs the whole block: no row loop): X - mean (the input
    mean, mean_N(K)) when smooth, X itself otherwise, plus each row's shift (x . mean) * shift_scale when
    shift_scale is not None. (Two loops of row steps, phi / means / amax then the int8 rows re-read from L2, ran
    no faster on H100: docs/dev/low_bit.md.)"""
    start = pl.program_id(0) * block
    d = x_ref.shape[-1]
    valid = (start + jnp.arange(block)) < n
    mask = jnp.broadcast_to(valid[:, None], (block, d))
    x = plgpu.load(x_ref.at[pl.ds(start, block), :], mask=mask, other=0.0)
    x32 = x.astype(_F32)
    refs = list(out_refs)
    if phi is not None:
        phi_ref = refs.pop(0)
        plgpu.store(phi_ref.at[pl.ds(start, block), :], phi(x32).astype(phi_ref.dtype), mask=mask)
    means_ref, count_ref, x8_ref, scale_ref = refs[:4]
    finite = finite_rows(x32, valid)
    total, count = finite_sum(x32, finite)
    means_ref[...] = total / jnp.maximum(count, 1.0)
    _store_count(count_ref, count)
    mean = mean_ref[...]
    # a non-finite row is quantised as 0 and left out of the block's amax (its own output stays NaN through phi)
    x8, scale = quantize_rows(jnp.where(finite[:, None], x, 0.0).astype(x.dtype), mean if smooth else None, valid,
                              interpret)
    store_quantised_rows(x8_ref, scale_ref, x8, scale, start, valid)
    if shift_scale is not None:  # rows past N were loaded as 0: their shift is 0
        refs[4][...] = jnp.sum(x32 * mean[None, :], axis=1) * shift_scale


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _prep_int8_call(x, mean, block: int, phi, interpret: bool, num_warps: int, smooth: bool, shift_scale):
    b, n, h, d = x.shape
    nb = -(-n // block)
    seq = pl.BlockSpec((None, n, None, d), lambda i, hh, bb: (bb, 0, hh, 0))
    per_block = lambda width: pl.BlockSpec((None, None, None, width), lambda i, hh, bb: (bb, hh, i, 0))  # noqa: E731
    out_specs = [per_block(d), per_block(SCALE_LANES), seq, per_block(SCALE_LANES)]
    out_shape = [
        jax.ShapeDtypeStruct((b, h, nb, d), _F32),
        jax.ShapeDtypeStruct((b, h, nb, SCALE_LANES), _F32),
        jax.ShapeDtypeStruct(x.shape, jnp.int8),
        jax.ShapeDtypeStruct((b, h, nb, SCALE_LANES), _F32),
    ]
    if phi is not None:
        out_specs, out_shape = [seq, *out_specs], [jax.ShapeDtypeStruct(x.shape, x.dtype), *out_shape]
    if shift_scale is not None:
        out_specs, out_shape = (
            [*out_specs, per_block(block)],
            [*out_shape, jax.ShapeDtypeStruct((b, h, nb, block), _F32)],
        )
    kernel = functools.partial(
        _prep_int8_kernel,
        n=n,
        block=block,
        phi=phi,
        smooth=smooth,
        shift_scale=shift_scale,
        interpret=interpret,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(nb, h, b),
        in_specs=[seq, pl.BlockSpec((None, None, d), lambda i, hh, bb: (bb, hh, 0))],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="sla_prep_int8" if smooth else "sla_prep_int8_q",
    )(x, mean)
    outs = list(outs)  # [phi], means, counts, int8 x, scales, [shift]
    shift = [outs.pop().reshape(b, h, nb * block)] if shift_scale is not None else []
    scales, x8, counts = outs.pop()[..., 0], outs.pop(), outs.pop()
    return [*outs, x8, scales, *shift, counts]  # the counts last: the backward's residual, not an output


def _prep_int8_outputs(x, mean, block, phi, interpret, num_warps, pass_through, smooth, shift_scale):
    outs = _prep_int8_call(x, mean, block, phi, interpret, num_warps, smooth, shift_scale)
    return _with_input(outs[:-1], x, pass_through)


_prep_int8 = functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))(_prep_int8_outputs)


def _prep_int8_fwd(x, mean, block, phi, interpret, num_warps, pass_through, smooth, shift_scale):
    *outs, counts = _prep_int8_call(x, mean, block, phi, interpret, num_warps, smooth, shift_scale)
    return _with_input(outs, x, pass_through), (x, mean, counts)


def _prep_int8_bwd(block, phi, interpret, num_warps, pass_through, smooth, shift_scale, res, cts):
    x, mean, counts = res
    cts = list(cts)
    d_x = cts.pop() if pass_through else None  # cts: [phi], means, int8 x, scales, [shift], [X]
    d_phi = cts[0] if phi is not None else None
    d_means = cts[1 if phi is not None else 0]  # the int8 blocks, their scales and the shift have no gradient
    dx = _prep_bwd_call(x, d_phi, d_means, counts, d_x, block, phi, interpret, _PREP_WARPS, _PREP_ROWS)  # as _prep's
    return dx, jnp.zeros_like(mean)


_prep_int8.defvjp(_prep_int8_fwd, _prep_int8_bwd)


def block_means_phi_int8(
    k, block: int, feature_map=None, *, interpret=None, num_warps=_PREP_WARPS, pass_through=False, mean=None
):
    """phi(K), the per-block means of K and the int8 smoothed keys of the low-bit forward, from one read of K.

    The mean over N is one XLA reduction before the kernel (float32, ``sla2_jax.smooth_keys``'s formula); the
    kernel then quantises K~ = K - mean (rounded to K's dtype) per block of ``block`` rows while it computes phi
    and the block means, so the low-bit forward needs no pre-pass of its own.
    Args:
      k: (B, N, H, D) bf16/f16/f32, any N, D a power of two; block: key block size (power of two >= 16);
      feature_map, interpret, num_warps, pass_through: as ``block_means_and_phi`` (one ``block``-row tile per
      program); mean: None, or the smoothing mean (B, H, D) float32 to use instead of mean_N(K) (any vector is
      exact: the forward adds q . mean back to the LSE; e.g. the mean of ``key_block_sums``' block means, which
      saves the reduction's read of K).
    Returns:
      (phi(k) (B, N, H, D) in k.dtype or None, means (B, H, Nb, D) float32, ``QuantisedKeys`` (k8 int8
      (B, N, H, D), scale float32 (B, H, Nb), mean float32 (B, H, D)) equal to
      ``quantize_int8_blocks(smooth_keys(k), block)``[, k]). phi and the means are differentiable in k; the keys
      are not.
    """
    _check_prep_args(k, block, feature_map, 1)
    b, _, h, d = k.shape
    if mean is None:
        mean = jnp.mean(k.astype(_F32), axis=1)
    elif getattr(mean, "shape", None) != (b, h, d):
        raise ValueError(f"mean must be (B, H, D) = {(b, h, d)}; got {getattr(mean, 'shape', None)}")
    mean = lax.stop_gradient(jnp.asarray(mean, _F32))
    outs = _prep_int8(k, mean, block, feature_map, _interpret(interpret), num_warps, pass_through, True, None)
    k_out = (outs.pop(),) if pass_through else ()
    phi = outs[0] if feature_map is not None else None
    means, k8, scale = outs[-3:]
    return (phi, means, QuantisedKeys(k8, scale, mean), *k_out)


def block_means_phi_int8_queries(
    q,
    block: int,
    feature_map,
    k_mean,
    shift_scale: float,
    *,
    interpret=None,
    num_warps=None,
    pass_through=False,
):
    """phi(Q), the per-block means of Q and the int8 queries of the low-bit forward, from one read of Q.

    Q's counterpart of ``block_means_phi_int8``: the kernel also quantises each ``block``-row tile of Q to int8
    with one scale (the query block of the INT8 forward: pass block_q) and writes each row's LSE shift
    (q . k_mean) * shift_scale, which the INT8 forward adds to the LSE of the smoothed scores. k_mean is
    mean_N(K) (``QuantisedKeys.mean`` of the K front end: one XLA reduction of K, so this kernel does not wait for
    the K kernel); shift_scale is the forward's sm_scale * log2(e).
    Args:
      q: (B, N, H, D) bf16/f16/f32, any N, D a power of two; block: query block size (power of two >= 16);
      feature_map, interpret, pass_through: as ``block_means_and_phi`` (one ``block``-row tile per program);
      num_warps: None (the measured choice: 8 with a feature map, 4 without) or a number; k_mean: (B, H, D)
      float32; shift_scale: a Python float.
    Returns:
      (phi(q) (B, N, H, D) in q.dtype or None, means (B, H, Nb, D) float32, ``QuantisedQueries`` (q8 int8
      (B, N, H, D), scale float32 (B, H, Nb), shift float32 (B, H, Nb * block)) equal to
      ``quantize.quantize_queries(q, block, k_mean, shift_scale)``[, q]). phi and the means are
      differentiable in q; the int8 queries and the shift are not (straight-through: the backward uses q).
    """
    _check_prep_args(q, block, feature_map, 1)
    b, _, h, d = q.shape
    if getattr(k_mean, "shape", None) != (b, h, d):
        raise ValueError(f"k_mean must be (B, H, D) = {(b, h, d)}; got {getattr(k_mean, 'shape', None)}")
    mean = lax.stop_gradient(jnp.asarray(k_mean, _F32))
    shift_scale = float(shift_scale)
    if num_warps is None:
        num_warps = _PREP_Q_INT8_WARPS[feature_map is not None]
    outs = _prep_int8(q, mean, block, feature_map, _interpret(interpret), num_warps, pass_through, False, shift_scale)
    q_out = (outs.pop(),) if pass_through else ()
    phi = outs[0] if feature_map is not None else None
    means, q8, scale, shift = outs[-4:]
    return (phi, means, QuantisedQueries(q8, scale, shift), *q_out)


# ----------------------------------------------------------------------------------------------------------
# Top-k selection, ascending LUT and captured mass
# ----------------------------------------------------------------------------------------------------------
def _order_key(s):
    """int32 image of float32 s that orders like the floats (signed comparison)."""
    bits = lax.bitcast_convert_type(s, jnp.int32)
    return bits ^ (jnp.right_shift(bits, 31) & 0x7FFFFFFF)


def _kth_largest_key(key, valid, topk: int):
    """Per row, the k-th largest key among the valid entries: (rows, C) -> (rows,) int32, built bit by bit in
    the unsigned image (key ^ INT_MIN) from the top: keep a bit when >= k entries are at least that large."""

    def step(t, acc):
        cand = acc | jnp.left_shift(jnp.int32(1), 31 - t)
        count = jnp.sum((valid & (key >= (cand ^ _INT_MIN)[:, None])).astype(jnp.int32), axis=1)
        return jnp.where(count >= topk, cand, acc)

    acc = lax.fori_loop(0, 32, step, jnp.zeros(key.shape[:1], jnp.int32))
    return acc ^ _INT_MIN


def _scatter_lut(lut_ref, selected, r0, *, nq: int, topk: int):
    """LUT rows from the selection mask (rows, C) by one unmasked scatter, O(C) per row (a slot x column
    comparison, O(topk x C), took 2.4x as long at wan-14b-720p): selected column c goes to slot (running count of
    the selection at c) - 1; every other column, and every row past Nq (clamped to row Nq - 1), to the spare slot
    `topk` of lut_ref (Nq, topk + 1), which the caller drops. The slots written twice are spare ones only, so the
    result does not depend on the order of the writes (interpret mode and GPU alike)."""
    rows, width = selected.shape
    slot = jnp.where(selected, jnp.cumsum(selected.astype(jnp.int32), axis=1) - 1, topk)
    row_ids = jnp.broadcast_to(jnp.minimum(r0 + jnp.arange(rows), nq - 1)[:, None], (rows, width))
    plgpu.store(lut_ref.at[row_ids, slot], jnp.broadcast_to(jnp.arange(width)[None, :], (rows, width)))


def _select_kernel(
    s_ref, lut_ref, mass_ref, *, nq: int, nk: int, width: int, rows: int, topk: int, last: int, block_k: int
):  # fmt: skip
    """Program (r, h, b): `rows` rows of S (Nq, Nk) -> their LUT rows (ascending) and captured masses."""
    r0 = pl.program_id(0) * rows
    row_ok = (r0 + jnp.arange(rows)) < nq
    cols = jnp.broadcast_to(jnp.arange(width)[None, :], (rows, width))
    valid = (cols < nk) & row_ok[:, None]
    s = plgpu.load(s_ref.at[pl.ds(r0, rows), pl.ds(0, width)], mask=valid, other=0.0)

    key = _order_key(s)
    threshold = _kth_largest_key(key, valid, topk)[:, None]
    above = valid & (key > threshold)
    ties = valid & (key == threshold)
    need = topk - jnp.sum(above.astype(jnp.int32), axis=1, keepdims=True)
    selected = above | (ties & (jnp.cumsum(ties.astype(jnp.int32), axis=1) <= need))
    _scatter_lut(lut_ref, selected, r0, nq=nq, topk=topk)  # rows past Nq select nothing (valid is False there)

    counts = jnp.where(cols == nk - 1, float(last), float(block_k))
    logits = jnp.where(valid, s + jnp.log(counts), -jnp.inf)
    peak = jnp.max(jnp.where(row_ok[:, None], logits, 0.0), axis=1, keepdims=True)
    weights = jnp.exp(logits - peak)
    mass = jnp.sum(jnp.where(selected, weights, 0.0), axis=1) / jnp.sum(weights, axis=1)
    plgpu.store(mass_ref.at[pl.ds(r0, rows)], mass, mask=row_ok)


class SelectLaunch(NamedTuple):
    """How select_blocks runs. row_elements: rows per program = this / the padded row length (a power of two in
    [1, 16]); warps per program. H100 (experiments/dev/probe_select.py): 1024 elements and 4 warps were the
    fastest at wan-1.3b and wan-14b-720p; 8 warps took 1.7x as long at wan-14b-720p."""

    row_elements: int = _SELECT_ROW_ELEMENTS
    warps: int = _SELECT_WARPS


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _select_call(scores, topk: int, seq_len: int, block_k: int, interpret: bool, launch: SelectLaunch):
    b, h, nq, nk = scores.shape
    width = max(16, pl.next_power_of_2(nk))  # the padded row length
    rows = max(1, min(16, launch.row_elements // width))
    kernel = functools.partial(
        _select_kernel,
        nq=nq,
        nk=nk,
        width=width,
        rows=rows,
        topk=topk,
        last=seq_len - (nk - 1) * block_k,
        block_k=block_k,
    )
    slots = topk + 1  # the scatter's spare slot, sliced off
    lut, mass = pl.pallas_call(
        kernel,
        grid=(-(-nq // rows), h, b),
        in_specs=[pl.BlockSpec((None, None, nq, nk), lambda r, hh, bb: (bb, hh, 0, 0))],
        out_specs=[
            pl.BlockSpec((None, None, nq, slots), lambda r, hh, bb: (bb, hh, 0, 0)),
            pl.BlockSpec((None, None, nq), lambda r, hh, bb: (bb, hh, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, h, nq, slots), jnp.int32), jax.ShapeDtypeStruct((b, h, nq), _F32)],
        compiler_params=CompilerParams(num_warps=launch.warps, num_stages=1),
        interpret=interpret,
        name="sla_select",
    )(scores)
    return lut[..., :topk], mass


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _select(scores, topk, seq_len, block_k, interpret, launch):
    return tuple(_select_call(scores, topk, seq_len, block_k, interpret, launch))


def _select_fwd(scores, topk, seq_len, block_k, interpret, launch):
    lut, mass = _select_call(scores, topk, seq_len, block_k, interpret, launch)
    return (lut, mass), (scores, lut, mass)


def _select_bwd(topk, seq_len, block_k, interpret, launch, res, cts):
    scores, lut, mass = res
    n_k = scores.shape[-1]
    counts = jnp.full((n_k,), float(block_k), _F32).at[-1].set(float(seq_len - (n_k - 1) * block_k))
    probs = jax.nn.softmax(scores + jnp.log(counts), axis=-1)
    sel = jax.nn.one_hot(lut, n_k, dtype=_F32).sum(axis=-2)
    return (probs * (sel - mass[..., None]) * cts[1][..., None],)


_select.defvjp(_select_fwd, _select_bwd)


def select_blocks(scores, topk: int, seq_len: int, block_k: int, *, interpret=None, launch=None):
    """Hard top-k routing from router logits in one kernel.

    Args:
      scores: (B, H, Nq, Nk) float32 router logits.
      topk: blocks kept per row, 1 <= topk <= Nk.
      seq_len, block_k: N and the key block size (n_j = valid keys of block j weights the mass).
      interpret: None -> Pallas interpret mode unless the default backend is a GPU.
      launch: a SelectLaunch (rows per program, warps), None for the default.
    Returns:
      lut (B, H, Nq, topk) int32, ascending (the ids of ``lax.top_k``, ties to the lower id), and the captured
      mass (B, H, Nq) float32 = sum over the selected j of softmax_j(S + log n_j); the mass is differentiable.
    """
    if getattr(scores, "ndim", None) != 4 or scores.dtype != _F32:
        raise ValueError(f"scores must be (B, H, Nq, Nk) float32; got {getattr(scores, 'shape', None)}")
    n_k = scores.shape[-1]
    if not isinstance(topk, int) or not 1 <= topk <= n_k:
        raise ValueError(f"topk={topk!r} must be an int in [1, Nk={n_k}]")
    if -(-seq_len // block_k) != n_k:
        raise ValueError(f"Nk={n_k} must equal ceil(seq_len / block_k) = ceil({seq_len} / {block_k})")
    return _select(scores, topk, seq_len, block_k, _interpret(interpret), launch or SelectLaunch())
