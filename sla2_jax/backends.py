"""The one backend decision, and the only module that imports ``pallas_kernels``.

Backends compute the same function: "pallas" (the GPU kernels; on CPU they run in Pallas interpret mode), "xla"
(pure JAX on any device, memory linear in N), "reference" (dense N x N masks, small N, tests). "auto" picks
"pallas" on a GPU where the kernels support the call and "xla" elsewhere; on a GPU, a call the kernels cannot run
(head dim not in {32, 64, 128}, block sizes outside [16, 256], soft routing) falls back to "xla" with
a warning that names why. An explicit "pallas" on such a call raises ValueError with the same reason. What every
backend accepts (dtypes, shapes, alpha) is decided once, in ``checks``.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from sla2_jax.config import BACKENDS, SLA2Config

KERNEL_HEAD_DIMS = (32, 64, 128)
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@functools.cache
def pallas_available() -> bool:
    """True when the Pallas kernels package imports (it needs a jax with Pallas' Triton backend)."""
    try:
        import pallas_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_unsupported_reason(q, k=None, v=None, *, block_q: int = 128, block_k: int = 64, soft: bool = False):
    """None when the Pallas kernels can run attention on these inputs, else a sentence saying why not.
    q, k, v: (B, N, H, D) arrays (k, v optional)."""
    if soft:
        return "soft routing (router training) runs on the xla backend"
    dim = q.shape[-1]
    if dim not in KERNEL_HEAD_DIMS:
        return f"the kernels support head_dim in {KERNEL_HEAD_DIMS}, got {dim}"
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v) if x is not None}
    if len(dtypes) > 1:
        return f"the kernels need q, k, v of one dtype, got {sorted(d.name for d in dtypes)}"
    if jnp.dtype(q.dtype) not in KERNEL_DTYPES:
        return f"the kernels support bfloat16, float16 and float32, got {jnp.dtype(q.dtype).name}"
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not 16 <= size <= 256:
            return f"the kernels support {name} in [16, 256], got {size}"
    return None


def resolve_backend(backend: str, q=None, k=None, v=None, *, block_q: int = 128, block_k: int = 64,
                    soft: bool = False) -> str:
    """The backend that runs a call: "pallas", "xla" or "reference".

    backend: "auto" | "pallas" | "xla" | "reference". With q (and k, v) given, "auto" on a GPU checks that the
    kernels support the call and otherwise returns "xla" with a warning naming why; "pallas" raises ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend in ("xla", "reference"):
        return backend
    if soft:  # router training: the soft top-k mask enters the branches, which the kernels do not take
        if backend == "pallas":
            warnings.warn("sla2_jax: soft routing (router training) runs on the 'xla' backend", stacklevel=3)
        return "xla"
    if backend == "auto" and (jax.default_backend() != "gpu" or not pallas_available()):
        return "xla"
    if backend == "pallas" and not pallas_available():
        raise ValueError("backend='pallas' needs the pallas_kernels package (a jax with Pallas' Triton backend)")
    why = None if q is None else kernel_unsupported_reason(q, k, v, block_q=block_q, block_k=block_k, soft=soft)
    if why is None:
        return "pallas"
    if backend == "pallas":
        raise ValueError(f"backend='pallas' cannot run this call: {why}; use backend='auto' or 'xla'")
    warnings.warn(f"sla2_jax: backend 'auto' runs this call on 'xla' instead of the Pallas kernels: {why}",
                  stacklevel=3)
    return "xla"


def check_kernel_config(kernel) -> None:
    """ValueError unless kernel is None or a ``pallas_kernels.KernelConfig``."""
    if kernel is None:
        return
    if not pallas_available():
        raise ValueError("SLA2Config.kernel needs the pallas_kernels package")
    from pallas_kernels import KernelConfig

    if not isinstance(kernel, KernelConfig):
        raise ValueError(f"kernel must be a pallas_kernels.KernelConfig or None, got {type(kernel).__name__}")


def front_end(q, k, config: SLA2Config, *, w_q, w_k, feature_map: str | None):
    """Hard routing and phi(Q), phi(K) by the Pallas front end (the branches' path, which reads phi arrays): one
    read of Q and one of K give the feature maps and the block means; one kernel selects the blocks.

    Returns (lut (B, H, Nq, k) int32 ascending, mass (B, H, Nq) f32, phi(q), phi(k) in q.dtype or None when
    feature_map is None, q, k as the front end passes them through: the attention kernels take these, so that their
    dQ, dK are added to the front end's inside its backward kernels)."""
    from pallas_kernels.front_end import block_means_and_phi
    from sla2_jax.feature_maps import phi_function

    phi = None if feature_map is None else phi_function(feature_map)
    k_phi, k_means, k = block_means_and_phi(k, config.block_k, phi, pass_through=True)
    q_phi, q_means, q = block_means_and_phi(q, config.block_q, phi, pass_through=True)
    lut, mass = select(q_means, k_means, q.shape[1], config, w_q=w_q, w_k=w_k)
    return lut, mass, q_phi, k_phi, q, k


def select(q_means, k_means, seq_len: int, config: SLA2Config, *, w_q, w_k):
    """(lut, mass) of the router from the block means of Q (B, H, Nq, D) and of K (B, H, Nk, D), float32: the
    router logits, then the selection kernel."""
    from pallas_kernels.front_end import select_blocks
    from sla2_jax.routing import scores_from_block_means

    scores = scores_from_block_means(q_means, k_means, seq_len, config.block_k, w_q=w_q, w_k=w_k)
    return select_blocks(scores, config.num_selected(scores.shape[-1]), seq_len, config.block_k)


def hard_route(q, k, v, config: SLA2Config, *, w_q, w_k):
    """Hard routing for the fused kernels, which take q, k and compute phi themselves.

    One read of K and V gives the block means of K and the linear states' sums at once
    (``pallas_kernels.key_block_sums``: per key block for the complement scope, the totals for "all"), one read of
    Q its block means, one kernel selects the blocks; the sums go to the fused kernel (``fused(..., key_sums=)``),
    which then reads K and V only for attention. With config.quant != "none" the read of Q also quantises it and
    one more read of K gives the int8 smoothed keys (``low_bit_operands``).

    Returns (lut (B, H, Nq, k) int32 ascending, mass (B, H, Nq) f32, key_sums, keys, queries), keys and queries
    the low-bit operands (``QuantisedKeys``, ``QuantisedQueries``) or None. No gradient flows through them (the LUT
    is an index; the fused path uses the mass under stop_gradient; the fused kernel's backward gives the whole dQ,
    dK, dV; the low-bit operands are straight-through), so they are taken of stopped q, k, v and have no backward
    pass."""
    import pallas_kernels
    from pallas_kernels.front_end import block_means_and_phi
    from sla2_jax.feature_maps import phi_function

    q, k, v, w_q, w_k = (None if x is None else jax.lax.stop_gradient(x) for x in (q, k, v, w_q, w_k))
    key_sums, k_means = pallas_kernels.key_block_sums(k, v, block_q=config.block_q, block_k=config.block_k,
                                                      linear_scope=config.linear_scope,
                                                      feature_map=phi_function(config.feature_map),
                                                      config=config.kernel)
    if config.quant == "none":
        q_means, keys, queries = block_means_and_phi(q, config.block_q)[1], None, None
    else:
        q_means, keys, queries = low_bit_operands(q, k, k_means, config)
    lut, mass = select(q_means, k_means, q.shape[1], config, w_q=w_q, w_k=w_k)
    return lut, mass, key_sums, keys, queries


def low_bit_operands(q, k, k_means, config: SLA2Config):
    """(Q's block means (B, H, Nq, D) f32, ``QuantisedKeys``, ``QuantisedQueries``) of the low-bit forward: K~ = K -
    m quantised per key block by one read of K, m = the mean of K's block means k_means (B, H, Nk, D) weighted by
    their rows (any m is exact: the forward adds q . m back to the LSE); one read of Q gives its block means, int8
    Q per query block and each row's LSE shift."""
    from pallas_kernels.front_end import block_means_phi_int8, block_means_phi_int8_queries
    from sla2_jax.blocks import block_counts

    n, head_dim = k.shape[1], k.shape[3]
    mean = jnp.einsum("bhjd,j->bhd", k_means, block_counts(n, config.block_k) / n)
    keys = block_means_phi_int8(k, config.block_k, None, mean=mean)[2]
    _, q_means, queries = block_means_phi_int8_queries(q, config.block_q, None, keys.mean, lse_shift_scale(head_dim))
    return q_means, keys, queries


def lse_shift_scale(head_dim: int) -> float:
    """The factor of the low-bit forward's LSE shift q . m: the kernels' default sm_scale times log2 e (their LSE
    is in base 2)."""
    return (1.0 / math.sqrt(head_dim)) * math.log2(math.e)


def branches(q, k, v, q_phi, k_phi, lut, *, block_q, block_k, linear_scope, quant, scale, eps, kernel=None):
    """(o_s, o_l) (B, N, H, D) in q.dtype by the kernels: the low-bit forward (straight-through backward) for
    quant "int8" / "int8_fp8". kernel: a KernelConfig or None (heuristics)."""
    import pallas_kernels

    kw = dict(block_q=block_q, block_k=block_k, linear_scope=linear_scope, sm_scale=scale, eps=eps, config=kernel)
    if quant != "none":
        return pallas_kernels.sparse_linear_attention_lowbit(q, k, v, q_phi, k_phi, lut, quant=quant, **kw)
    return pallas_kernels.sparse_linear_attention(q, k, v, q_phi, k_phi, lut, **kw)


def fused(q, k, v, q_phi, k_phi, lut, alpha, config: SLA2Config, *, keys=None, queries=None, key_sums=None):
    """o = alpha o_s + (1 - alpha) o_l (B, N, H, D) in q.dtype by one fused forward kernel (low bit where
    config.quant says so, with the front end's keys / queries). q_phi = k_phi = None: the kernels compute phi(Q),
    phi(K) from q, k with config.feature_map (and take the linear states' sums, per key block or the totals, from
    key_sums where hard_route made them)."""
    import pallas_kernels
    from sla2_jax.feature_maps import phi_function

    kw = dict(block_q=config.block_q, block_k=config.block_k, linear_scope=config.linear_scope, eps=config.eps,
              config=config.kernel)
    if q_phi is None:
        kw["feature_map"] = phi_function(config.feature_map)
        kw["key_sums"] = key_sums
    if config.quant != "none":  # real low-bit forward, full-precision backward (straight-through)
        return pallas_kernels.sla2_fused_attention_lowbit(
            q, k, v, q_phi, k_phi, lut, alpha, quant=config.quant, keys=keys, queries=queries, **kw
        )
    return pallas_kernels.sla2_fused_attention(q, k, v, q_phi, k_phi, lut, alpha, **kw)
