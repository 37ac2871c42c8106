"""Flax NNX modules: `SLA2Attention` (learned router + learnable alpha), `SLAAttention` (v1 baseline) and a
`SelfAttention` block with qkv/out projections that a DiT can use directly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sla2_jax.blocks import num_blocks
from sla2_jax.checks import check_qkv
from sla2_jax.combine import alpha_from_mass, sla_v1_combine
from sla2_jax.config import SLA2Config
from sla2_jax.context_parallel import attend_in_context, ulysses
from sla2_jax.dense import dense_attention
from sla2_jax.functional import sla2_output, sparse_linear_outputs

ROUTINGS = ("hard", "soft", "soft_dense", "soft_dense_st")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Where a module's attention runs context-parallel: sequence split over mesh axis `seq_axis` (Ulysses),
    batch optionally over `batch_axis`."""

    mesh: jax.sharding.Mesh
    seq_axis: str
    batch_axis: str | tuple | None = None


def _check_module_args(num_heads, head_dim, config):
    if not isinstance(config, SLA2Config):
        raise ValueError(f"config must be an SLA2Config; got {type(config).__name__}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r} must be a positive int")
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim={head_dim!r} must be a positive int")


def _check_call(module, q, k, v):
    _, _, heads, dim = check_qkv(q, k, v)
    if (heads, dim) != (module.num_heads, module.head_dim):
        raise ValueError(f"q has (H, D) = {(heads, dim)}; the module was built for {(module.num_heads, module.head_dim)}")


class SLA2Attention(nnx.Module):
    """SLA2 attention with a learnable router (W_q, W_k) and a learnable mixing ratio alpha.

    Parameters: `w_q`, `w_k` (D, D) initialised to the identity (the untrained router equals SLA's); alpha params
    by `config.alpha` (the only place config.alpha is read): "block": `alpha_logit` (H, Nq) (needs `seq_len`, so
    the module runs at that N only); "head": `alpha_logit` (H,);
    "mass": `alpha_w`, `alpha_b` (H,) with alpha = sigmoid(w * logit(mass) + b), w=1, b=0 at init.
    `alpha_logit` starts at 0 (alpha = 0.5) and is learned in stage 1.
    Attribute `routing`: "hard" (top-k, inference and fine-tuning), or soft top-k for router training: "soft" (the
    sparse branch attends the hard top-k blocks with log M added to their logits), "soft_dense" (it attends every
    key block weighted by M, so the gradient reaches unselected blocks; dense cost, see `soft_routing`) or
    "soft_dense_st" (forward with the hard mask, gradient of "soft_dense": straight-through).
    Attribute `context`: None, or a `ContextParallel` to run on sequence-sharded inputs.

    __call__(q, k, v): (B, N, H, D) -> (B, N, H, D) in q.dtype.
    """

    def __init__(self, num_heads: int, head_dim: int, *, config: SLA2Config, seq_len: int | None = None,
                 routing: str = "hard", context=None, rngs: nnx.Rngs | None = None):
        _check_module_args(num_heads, head_dim, config)
        self.num_heads, self.head_dim, self.config, self.seq_len = num_heads, head_dim, config, seq_len
        self.routing = routing
        self.context = context
        self.w_q = nnx.Param(jnp.eye(head_dim, dtype=jnp.float32))
        self.w_k = nnx.Param(jnp.eye(head_dim, dtype=jnp.float32))
        if config.alpha == "block":
            if seq_len is None or not seq_len >= 1:
                raise ValueError(
                    f"config.alpha='block' learns one alpha per head and query block, so the module is built for one "
                    f"sequence length: pass seq_len=N (the N of the inputs; got seq_len={seq_len!r}), or use "
                    "SLA2Config(alpha='mass') or alpha='head', which work for any N")
            self.alpha_logit = nnx.Param(jnp.zeros((num_heads, num_blocks(seq_len, config.block_q)), jnp.float32))
        elif config.alpha == "head":
            self.alpha_logit = nnx.Param(jnp.zeros((num_heads,), jnp.float32))
        else:
            self.alpha_w = nnx.Param(jnp.ones((num_heads,), jnp.float32))
            self.alpha_b = nnx.Param(jnp.zeros((num_heads,), jnp.float32))

    def alpha_params(self) -> tuple:
        """The alpha parameters as arrays with the heads first: (alpha_logit,) or (alpha_w, alpha_b)."""
        if self.config.alpha == "mass":
            return self.alpha_w[...], self.alpha_b[...]
        return (self.alpha_logit[...],)

    def _attend(self, q, k, v, *alpha_params, w_q, w_k):
        """The attention itself on explicit arrays (so it can run per device under context parallelism)."""
        if self.config.alpha == "block":
            alpha_fn = lambda mass: jax.nn.sigmoid(alpha_params[0])[None]  # noqa: E731
        elif self.config.alpha == "head":
            alpha_fn = lambda mass: jax.nn.sigmoid(alpha_params[0])[None, :, None]  # noqa: E731
        else:
            alpha_fn = lambda mass: alpha_from_mass(mass, *alpha_params)  # noqa: E731
        if self.routing in ("soft_dense", "soft_dense_st"):
            from sla2_jax.soft_routing import soft_dense_attention

            return soft_dense_attention(q, k, v, self.config, alpha_fn, w_q=w_q, w_k=w_k,
                                        straight_through=self.routing == "soft_dense_st")
        return sla2_output(q, k, v, self.config, alpha_fn, w_q=w_q, w_k=w_k, soft=self.routing == "soft")

    def __call__(self, q, k, v):
        """q, k, v: (B, N, H, D) -> (B, N, H, D). With `context = ContextParallel(mesh, seq_axis, batch_axis)` the
        inputs are sequence-sharded over `seq_axis` and the attention runs Ulysses-style (see context_parallel)."""
        _check_call(self, q, k, v)
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is not one of {ROUTINGS}")
        if self.config.alpha == "block" and q.shape[1] != self.seq_len:
            raise ValueError(f"config.alpha='block': the module was built for seq_len={self.seq_len}, q has "
                             f"N={q.shape[1]}; build it with seq_len={q.shape[1]}, or use SLA2Config(alpha='mass') "
                             "or alpha='head', which work for any N")
        w_q, w_k = self.w_q[...], self.w_k[...]
        if self.context is None:
            return self._attend(q, k, v, *self.alpha_params(), w_q=w_q, w_k=w_k)
        ctx = self.context
        return ulysses(lambda q, k, v, *a: self._attend(q, k, v, *a[:-2], w_q=a[-2], w_k=a[-1]), q, k, v,
                       mesh=ctx.mesh, seq_axis=ctx.seq_axis, batch_axis=ctx.batch_axis,
                       per_head=self.alpha_params(), shared=(w_q, w_k))


class SLAAttention(nnx.Module):
    """SLA (v1) baseline: SLA's heuristic router, o = O_sparse + Proj(O_linear), Proj (D, D) + bias, zero-initialised
    and shared by the heads (so at init the module is block-sparse attention).

    __call__(q, k, v): (B, N, H, D) -> (B, N, H, D) in q.dtype.
    """

    def __init__(self, num_heads: int, head_dim: int, *, config: SLA2Config, rngs: nnx.Rngs | None = None):
        _check_module_args(num_heads, head_dim, config)
        self.num_heads, self.head_dim, self.config = num_heads, head_dim, config
        self.proj_kernel = nnx.Param(jnp.zeros((head_dim, head_dim), jnp.float32))
        self.proj_bias = nnx.Param(jnp.zeros((head_dim,), jnp.float32))

    def __call__(self, q, k, v):
        _check_call(self, q, k, v)
        o_s, o_l, _ = sparse_linear_outputs(q, k, v, self.config)
        return sla_v1_combine(o_s, o_l, self.proj_kernel[...], self.proj_bias[...]).astype(q.dtype)


ATTENTIONS = ("dense", "sla", "sla2")


class SelfAttention(nnx.Module):
    """Multi-head self-attention block with qkv and output projections and a selectable attention core.

    Args:
      dim: model width; num_heads must divide it (head_dim = dim // num_heads).
      attention: "dense" (exact softmax), "sla" (SLA v1) or "sla2".
      config: SLA2Config for "sla"/"sla2" (default SLA2Config()).
      seq_len: sequence length, needed by config.alpha="block" ("mass" and "head" work for any N).
      context: optional `ContextParallel` (dense and sla2): attention on sequence-sharded activations.
    __call__(x): (B, N, dim) -> (B, N, dim) in x.dtype (the projections keep float32 parameters; attention runs
    on q, k, v in x.dtype).
    """

    def __init__(self, dim: int, num_heads: int, *, attention: str = "sla2", config: SLA2Config | None = None,
                 seq_len: int | None = None, context: ContextParallel | None = None, rngs: nnx.Rngs):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention={attention!r} is not one of {ATTENTIONS}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        if context is not None and attention == "sla":
            raise ValueError("context parallelism supports attention='dense' and 'sla2', not 'sla'")
        self.num_heads, self.head_dim, self.attention, self.context = num_heads, dim // num_heads, attention, context
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        config = SLA2Config() if config is None else config
        if attention == "sla2":
            self.core = SLA2Attention(num_heads, self.head_dim, config=config, seq_len=seq_len, context=context,
                                      rngs=rngs)
        elif attention == "sla":
            self.core = SLAAttention(num_heads, self.head_dim, config=config, rngs=rngs)
        else:
            self.core = None

    def __call__(self, x):
        batch, seq_len, _ = x.shape
        qkv = self.qkv(x).reshape(batch, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k, v = (t.astype(x.dtype) for t in (q, k, v))  # the projections compute in their float32 params' dtype
        o = self.core(q, k, v) if self.core is not None else attend_in_context(dense_attention, q, k, v, self.context)
        return self.out(o.reshape(batch, seq_len, -1)).astype(x.dtype)
