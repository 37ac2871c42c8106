"""Context-parallel SLA2 attention (Ulysses style) for sequence-sharded inputs, on jax.sharding + shard_map.

Each device holds a slice of the sequence for all heads. One all-to-all turns that into the full sequence for
H / P heads (P = devices on `seq_axis`), the device runs ordinary SLA2 attention on its heads (routing, both
branches and combine are per head, so the result equals the single-device one), and a second all-to-all returns
to sequence sharding. Communication per call: all-to-alls of q, k, v and o (the same again in the backward
pass); only JAX's own collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sla2_jax.checks import check_alpha, check_qkv, check_weight
from sla2_jax.config import SLA2Config
from sla2_jax.functional import sla2_attention

_PARAMS = ("w_q", "w_k", "alpha")


def _seq_to_heads(x, axis_name):
    """(B, N/P, H, D) per device -> (B, N, H/P, D)."""
    return jax.lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)


def _heads_to_seq(x, axis_name):
    """(B, N, H/P, D) per device -> (B, N/P, H, D)."""
    return jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)


def check_context_mesh(mesh, seq_axis: str, seq_len: int, heads: int) -> None:
    if seq_axis not in mesh.shape:
        raise ValueError(f"seq_axis={seq_axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    n_dev = mesh.shape[seq_axis]
    if heads % n_dev:
        raise ValueError(f"num heads H={heads} must be divisible by the size {n_dev} of mesh axis {seq_axis!r}")
    if seq_len % n_dev:
        raise ValueError(f"sequence length N={seq_len} must be divisible by the size {n_dev} of mesh axis "
                         f"{seq_axis!r} (pad the sequence)")


def ulysses(fn, q, k, v, *, mesh, seq_axis: str, batch_axis=None, per_head=(), shared=(), per_head_batched=None):
    """Runs fn(q, k, v, *per_head, *shared) with the full sequence and a subset of heads on each device.

    q, k, v: (B, N, H, D) laid out as P(batch_axis, seq_axis). per_head: arrays whose leading axis is H (split
    with the heads); per_head_batched: for each of them, whether its second axis is the batch (then split over
    batch_axis too); shared: arrays replicated on every device. fn returns (B, N, H_local, D). Returns
    (B, N, H, D) laid out like q.
    """
    check_context_mesh(mesh, seq_axis, q.shape[1], q.shape[2])
    qkv_spec = P(batch_axis, seq_axis, None, None)
    batched = per_head_batched or (False,) * len(per_head)
    head_specs = tuple(P(seq_axis, batch_axis, *([None] * (x.ndim - 2))) if b else P(seq_axis, *([None] * (x.ndim - 1)))
                       for x, b in zip(per_head, batched))
    shared_specs = tuple(P(*([None] * x.ndim)) for x in shared)
    n_head = len(per_head)

    def local(q, k, v, *args):
        q, k, v = (_seq_to_heads(x, seq_axis) for x in (q, k, v))
        return _heads_to_seq(fn(q, k, v, *args[:n_head], *args[n_head:]), seq_axis)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + head_specs + shared_specs,
                           out_specs=qkv_spec, check_vma=False)
    return mapped(q, k, v, *per_head, *shared)


def attend_in_context(fn, q, k, v, context):
    """fn(q, k, v) on (B, N, H, D) inputs, Ulysses-style over `context` (a modules.ContextParallel) when given."""
    if context is None:
        return fn(q, k, v)
    return ulysses(fn, q, k, v, mesh=context.mesh, seq_axis=context.seq_axis, batch_axis=context.batch_axis)


def context_parallel_attention(q, k, v, *, mesh, seq_axis: str, config: SLA2Config, batch_axis=None, **params):
    """SLA2 attention of (B, N, H, D) inputs sharded along N over `mesh` axis `seq_axis`.

    Args:
      q, k, v: (B, N, H, D) global arrays, laid out as P(batch_axis, seq_axis).
      mesh: a jax.sharding.Mesh.
      seq_axis: mesh axis the sequence is split over; its size P must divide H and N.
      config: SLA2Config of the local attention.
      batch_axis: optional mesh axis (or tuple of axes) the batch is split over (data parallelism).
      **params: optional `w_q`, `w_k` ((D, D) or (H, D, D)) and `alpha` (broadcastable to (B, H, Nq)), as in
        `sla2_attention`. Per-head values are split over `seq_axis` with the heads.
    Returns:
      o: (B, N, H, D) in q.dtype, laid out like the inputs; equal to `sla2_attention` on one device.
    """
    unknown = set(params) - set(_PARAMS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}; accepted: {_PARAMS}")
    if not isinstance(config, SLA2Config):
        raise ValueError(f"config must be an SLA2Config; got {type(config).__name__}")
    batch, seq_len, heads, dim = check_qkv(q, k, v)
    check_context_mesh(mesh, seq_axis, seq_len, heads)
    w_q, w_k, alpha = params.get("w_q"), params.get("w_k"), params.get("alpha")
    check_weight("w_q", w_q, heads, dim)
    check_weight("w_k", w_k, heads, dim)
    nq = -(-seq_len // config.block_q)
    check_alpha(alpha, batch, heads, nq)

    per_head, shared, slots = [], [], []
    for name, value in (("w_q", w_q), ("w_k", w_k), ("alpha", alpha)):
        if value is None:
            continue
        if name == "alpha":  # (B, H, Nq) -> (H, B, Nq): heads first, batch split like q's
            value = jnp.moveaxis(jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch, heads, nq)), 1, 0)
        target = per_head if (name == "alpha" or value.ndim == 3) else shared
        slots.append((name, target is per_head, len(target)))
        target.append(value)

    def attend(q, k, v, *args):
        heads_args, shared_args = args[:len(per_head)], args[len(per_head):]
        kw = {name: (heads_args if is_head else shared_args)[i] for name, is_head, i in slots}
        if "alpha" in kw:
            kw["alpha"] = jnp.moveaxis(kw["alpha"], 0, 1)
        return sla2_attention(q, k, v, config=config, **kw)

    batched = tuple(name == "alpha" for name, is_head, _ in slots if is_head)
    return ulysses(attend, q, k, v, mesh=mesh, seq_axis=seq_axis, batch_axis=batch_axis, per_head=tuple(per_head),
                   shared=tuple(shared), per_head_batched=batched)
