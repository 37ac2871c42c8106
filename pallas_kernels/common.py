"""Leaf helpers shared by the kernels: the static description of a call, in-kernel loads, stores and products,
BlockSpecs of the (blocks, H, B) grids, the Triton launch wrapper, input validation, and the residuals NamedTuple.

Imports nothing else from this package but config.py.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._triton import CompilerParams, pl, plgpu
from .config import KernelConfig, heuristic_config, mosaic_supports

MASK_VALUE = -1e30
LOG2E = math.log2(math.e)
F32 = jnp.float32
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
SUPPORTED_HEAD_DIMS = (32, 64, 128)


class KernelCall(NamedTuple):
    """The static description of one call (hashable: a nondiff argument of the custom_vjps): its shapes, block
    sizes, scale, linear scope, interpret mode, and the KernelConfig it runs with."""

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
    config: KernelConfig

    @property
    def npad(self) -> int:
        return self.nq * self.block_q

    @property
    def track_lin(self) -> bool:
        return self.linear and self.complement

    @property
    def mosaic_forward(self) -> bool:
        return self.config.forward == "mosaic"

    @property
    def mosaic_backward(self) -> bool:
        return self.config.backward == "mosaic"


class Residuals(NamedTuple):
    """What the forward keeps for the backward. q, k, v, q_phi, k_phi (B, N, H, D) input dtype; lut (B, H, Nq, topk);
    alpha (B, H, Nq) f32 or None; o_s, o_l (B, N, H, D) (o_l None without a linear branch); lse, den (B, H, Npad)
    f32 (lse base 2; den None without a linear branch); h_lin, z_lin: the linear branch's states, per query block
    (B, H, Nq, D, D) / (B, H, Nq, D) for the complement scope, else the totals (B, H, D, D) / (B, H, D); None without
    a linear branch."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_phi: jax.Array
    k_phi: jax.Array
    lut: jax.Array
    alpha: jax.Array | None
    o_s: jax.Array
    o_l: jax.Array | None
    lse: jax.Array
    den: jax.Array | None
    h_lin: jax.Array | None
    z_lin: jax.Array | None


def dot(a, b, trans_a=False, trans_b=False):
    """a @ b (optionally transposed operands) with float32 accumulation (pl.dot is gone in jax 0.12)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def dot_mat(x, m, like, trans_b=False):
    """x (rows, D) @ m (D, D) float32 matrix (m^T if trans_b). For 16-bit inputs (``like``) on the bf16 tensor
    cores: x rounded to bf16 (like the data itself), m split into bf16 hi + lo parts (~2^-16 relative)."""
    if jnp.dtype(like) == jnp.dtype(jnp.float32):
        return dot(x.astype(F32), m, trans_b=trans_b)
    xb = x.astype(jnp.bfloat16)
    if m.dtype == jnp.bfloat16:  # per-block states stored in bf16 (KernelConfig.state_dtype)
        return dot(xb, m, trans_b=trans_b)
    m_hi = m.astype(jnp.bfloat16)
    m_lo = (m - m_hi.astype(F32)).astype(jnp.bfloat16)
    return dot(xb, m_hi, trans_b=trans_b) + dot(xb, m_lo, trans_b=trans_b)


def load_rows(ref, start, size, n):
    """Loads rows [start, start + size) of an (N, D) ref; rows >= N read as 0."""
    d = ref.shape[-1]
    rows = start + jnp.arange(size)
    mask = jnp.broadcast_to((rows < n)[:, None], (size, d))
    return plgpu.load(ref.at[pl.ds(start, size), :], mask=mask, other=0.0)


def store_rows(ref, start, val, n):
    size, d = val.shape
    rows = start + jnp.arange(size)
    mask = jnp.broadcast_to((rows < n)[:, None], (size, d))
    plgpu.store(ref.at[pl.ds(start, size), :], val.astype(ref.dtype), mask=mask)


def phi_rows(phi, x):
    """The feature map phi of a loaded (rows, D) tile, in float32 and rounded to the tile's dtype (as a phi array
    would be)."""
    return phi(x.astype(F32)).astype(x.dtype)


def phi_vjp(phi, x, d_phi32):
    """The vjp of the feature map phi at the loaded (rows, D) tile x applied to d_phi32: float32 (rows, D)."""
    return jax.vjp(phi, x.astype(F32))[1](d_phi32)[0]


def written_phi_vjp(phi):
    """phi's vjp written out, ``phi.vjp(x32, d_phi32) -> dx32`` (e.g. ``sla2_jax.feature_maps.softmax_phi.vjp``), or
    None: the Mosaic kernels cannot lower autodiff's vjp of a feature map (add_any), so they apply phi's vjp only
    for maps that carry one."""
    vjp = getattr(phi, "vjp", None)
    return vjp if callable(vjp) else None


def finite_rows(x, valid):
    """(rows,) bool: valid rows of the float32 tile x (rows, D) with no NaN / Inf entry (the rows a block mean
    averages)."""
    return valid & (jnp.sum(jnp.where(jnp.isfinite(x), 0.0, 1.0), axis=1) == 0.0)


def finite_sum(x, finite):
    """(sum (D,), count) float32 of the rows of the float32 tile x (rows, D) where finite (rows,) is True: a block
    mean is the sum of its tiles' sums over the sum of their counts (at least 1)."""
    return jnp.sum(jnp.where(finite[:, None], x, 0.0), axis=0), jnp.sum(finite.astype(F32))


def scores(q, k, k_start, cfg):
    """S = Q K^T * sm_scale * log2(e) (base-2 logits); keys >= N masked."""
    s = dot(q, k, trans_b=True) * (cfg.sm_scale * LOG2E)
    kvalid = (k_start + jnp.arange(cfg.block_k)) < cfg.n
    return jnp.where(kvalid[None, :], s, MASK_VALUE)


def seq_spec(cfg):  # (B, N, H, D) -> the whole (N, D) of one (b, h)
    return pl.BlockSpec((None, cfg.n, None, cfg.d), lambda i, h, b: (b, 0, h, 0))


def row_spec(cfg):  # (B, H, Npad) -> this program's block_q rows
    return pl.BlockSpec((None, None, cfg.block_q), lambda i, h, b: (b, h, i))


def full_spec(*tail):  # (B, H, *tail) -> the whole tail of one (b, h)
    nt = len(tail)
    return pl.BlockSpec((None, None) + tuple(tail), lambda i, h, b: (b, h) + (0,) * nt)


def params(kernel: str, call: KernelCall):
    """Triton compiler params of kernel ("fwd", "dq", "dkv", "sum", "sum_phi", "lowbit") from the call's
    KernelConfig."""
    launch = call.config.launch_params(kernel)
    return CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def rows_per_step(kernel: str, call: KernelCall) -> int:
    """Query rows per step of the backward kernels (a divisor of block_q, from the KernelConfig's launch)."""
    return max(16, min(call.block_q, call.config.launch_params(kernel).rows))


def with_named_refs(kernel, names, **static):
    """The body a pallas_call runs for ``kernel``: pallas_call passes the refs in order (inputs, then outputs);
    ``kernel`` gets each as the keyword ``{name}_ref`` (q -> q_ref, ...) plus the ``static`` keywords, so its
    signature lists the refs it takes and an unknown or missing one fails at trace time (TypeError)."""

    @functools.wraps(kernel)  # source info of the kernel, not of this wrapper, in errors and debug info
    def body(*refs):
        return kernel(**{f"{name}_ref": ref for name, ref in zip(names, refs)}, **static)

    return body


def pallas_triton_call(kernel, grid, inputs, outputs, call: KernelCall, name: str, launch: dict, kernel_name=None):
    """One Triton pallas_call. inputs / outputs: lists of (name, array or ShapeDtypeStruct, BlockSpec); the kernel
    gets the refs as keywords ``{name}_ref`` (with_named_refs), the KernelCall as ``cfg`` and ``launch``. name: the
    launch-table entry; the kernel is called ``sla_{name}`` in profiles unless kernel_name says otherwise."""
    names = tuple(x[0] for x in inputs) + tuple(x[0] for x in outputs)
    return pl.pallas_call(
        with_named_refs(kernel, names, cfg=call, **launch),
        grid=grid,
        in_specs=[x[2] for x in inputs],
        out_specs=[x[2] for x in outputs],
        out_shape=[x[1] for x in outputs],
        compiler_params=params(name, call),
        interpret=call.interpret,
        name=kernel_name or f"sla_{name}",
    )(*[x[1] for x in inputs])


def is_pow2(x):
    return isinstance(x, int) and x > 0 and (x & (x - 1)) == 0


def validate_call(q, k, v, q_phi, k_phi, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret, config):
    """The KernelCall of an entry point's arguments; ValueError naming the first bad one. config: a KernelConfig or
    None (heuristic_config for the call); a config asking for the Mosaic kernels where they cannot run is refused."""
    for name, x in (("q", q), ("k", k), ("v", v), ("q_phi", q_phi), ("k_phi", k_phi)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"{name} must be a 4-D array (B, N, H, D), got shape {getattr(x, 'shape', None)}")
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    for name, x in (("k", k), ("v", v), ("q_phi", q_phi), ("k_phi", k_phi)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} shape {tuple(x.shape)} must equal q shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} must equal q dtype {q.dtype}")
    b, n, h, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim (q.shape[-1]) must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if n < 1:
        raise ValueError(f"sequence length (q.shape[1]) must be >= 1, got {n}")
    for name, bs in (("block_q", block_q), ("block_k", block_k)):
        if not is_pow2(bs) or not 16 <= bs <= 256:
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
    if config is None:
        config = heuristic_config(n, d, q.dtype, block_q, block_k, interpret=bool(interpret))
    elif not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    elif "mosaic" in (config.forward, config.backward):
        # in interpret mode (CPU tests of the Mosaic path's wiring, with stand-in kernels) f32 inputs pass
        why = mosaic_supports(n, d, jnp.bfloat16 if interpret else q.dtype, block_q, block_k)
        if why is not None:
            raise ValueError(f"KernelConfig asks for the Mosaic kernels, but {why}; use forward/backward='triton'")
    return KernelCall(
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
        config=config,
    )


def checked_alpha(alpha, q, cfg: KernelCall):
    """alpha broadcast to (B, H, Nq) float32; ValueError for a shape that does not broadcast or a non-float dtype."""
    b, _, h, _ = q.shape
    try:
        alpha = jnp.broadcast_to(jnp.asarray(alpha), (b, h, cfg.nq))
    except (ValueError, TypeError) as e:
        raise ValueError(f"alpha shape {jnp.shape(alpha)} must broadcast to (B, H, Nq) = ({b}, {h}, {cfg.nq})") from e
    if not jnp.issubdtype(alpha.dtype, jnp.floating):
        raise ValueError(f"alpha must be floating point, got {alpha.dtype}")
    return alpha.astype(F32)
