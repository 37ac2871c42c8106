"""What the developer tools in experiments/dev share: timing (synchronised and kernel-only), relative error,
error recording, random and router LUTs, the wan-1.3b inputs, and the kernels' static call description
(``kernel_call``) with a chosen ``pallas_kernels.KernelConfig``.

Kernel variants are chosen by passing a KernelConfig (``config=`` of the entry points, or the ``config`` field of
the KernelCall the stage functions of ``pallas_kernels.attention`` take); nothing here changes module state.
"""

from __future__ import annotations

import json
import os
import statistics
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import time_fn, time_samples


def bench(fn, *args, runs=20):
    """Median milliseconds of synchronised calls of jit(fn)(*args) after 3 warm-up calls."""
    return 1e3 * time_fn(jax.jit(fn), *args, warmup=3, iters=runs)


def bench_samples(fn, *args, runs=20, warmup=3):
    """Milliseconds of each of `runs` synchronised calls of jit(fn)(*args) after `warmup` calls."""
    return [1e3 * s for s in time_samples(jax.jit(fn), *args, warmup=warmup, iters=runs)]


def kernel_ms(fn, args, iterations=20):
    """Kernel-only milliseconds of jit(fn)(*args) on the GPU (CUPTI, jax.experimental.mosaic.gpu.profiler.measure),
    after one warm-up call: (median over `iterations` calls of the call's summed kernel times, the calls' lists of
    (kernel name, ms)). The wall clock of one synchronised call adds ~0.2 ms of dispatch and synchronisation."""
    from jax.experimental.mosaic.gpu import profiler

    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(*args))
    _, per_iter = profiler.measure(jitted, aggregate=False, iterations=iterations)(*args)
    return statistics.median(sum(ms for _, ms in it) for it in per_iter), per_iter


def write_rows(out, filename, rows):
    """Writes out/filename as JSON: {"device": the GPU's kind, "jax": version, "rows": rows}."""
    with open(os.path.join(out, filename), "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


def rel(a, b):
    """Norm-wise relative error |a - b| / |b| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def error_text(e):
    """'Type: message' of an exception, cut to 3000 characters (for the tools' JSON)."""
    return f"{type(e).__name__}: {e}"[:3000]


def record_error(row, key, e):
    """row[key] = error_text(e), and the traceback to stderr: a failing part is recorded and the tool goes on."""
    row[key] = error_text(e)
    traceback.print_exc()


def uniform_lut(rng, b, h, nq, nk, topk):
    """(B, H, Nq, topk) int32: per query block `topk` distinct key blocks drawn uniformly (numpy rng), ascending."""
    lut = np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(b * h * nq)]), axis=-1)
    return jnp.asarray(lut.reshape(b, h, nq, topk), jnp.int32)


def random_lut(key, b, h, nq, nk, topk):
    """(B, H, Nq, topk) int32 as uniform_lut, from a jax PRNG key."""
    keys = jax.random.split(key, b * h * nq)
    idx = jax.vmap(lambda kk: jax.random.permutation(kk, nk)[:topk])(keys)
    return jnp.sort(idx.reshape(b, h, nq, topk), axis=-1).astype(jnp.int32)


def phi(x):
    """The softmax feature map over the head dim, in x's dtype."""
    return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def normal_qkv(key, b, n, h, d, dtype):
    """Independent standard-normal q, k, v (B, N, H, D) in dtype."""
    ks = jax.random.split(key, 3)
    return tuple(jax.random.normal(ks[i], (b, n, h, d), jnp.float32).astype(dtype) for i in range(3))


def router_lut(q, k, topk, block_q, block_k):
    """SLA router: mean-pooled Q and smoothed K per block, top-k, ascending (partial last blocks averaged)."""
    b, n, h, d = q.shape
    nq, nk = -(-n // block_q), -(-n // block_k)

    def pool(x, bs, nb):
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * bs - n), (0, 0), (0, 0)))
        cnt = jnp.minimum(bs, n - jnp.arange(nb) * bs).astype(jnp.float32)
        return x.reshape(b, nb, bs, h, d).sum(2) / cnt[None, :, None, None]

    ks = k.astype(jnp.float32) - jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True)
    s = jnp.einsum("bihd,bjhd->bhij", pool(q, block_q, nq), pool(ks, block_k, nk))
    _, idx = jax.lax.top_k(s, topk)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def kernel_call(q, lut, *, block_q=128, block_k=64, linear_scope="complement", config=None, interpret=None,
                sm_scale=None, eps=1e-6):
    """The kernels' static description of a call on q (B, N, H, D) and lut (pallas_kernels.common.KernelCall, the
    ``cfg`` argument of the stage functions in pallas_kernels.attention and linear_states). config: a KernelConfig
    (None: heuristic_config for the call)."""
    from pallas_kernels.common import validate_call

    return validate_call(q, q, q, q, q, lut, block_q, block_k, linear_scope, sm_scale, eps, interpret, config)


def with_config(cfg, config, dtype=jnp.bfloat16):
    """The KernelCall cfg with another KernelConfig (refused like an entry point's config= where it asks for the
    Mosaic kernels on a shape or dtype they cannot run)."""
    from pallas_kernels.config import mosaic_supports

    if "mosaic" in (config.forward, config.backward):
        why = mosaic_supports(cfg.n, cfg.d, dtype, cfg.block_q, cfg.block_k)
        if why is not None:
            raise ValueError(f"KernelConfig asks for the Mosaic kernels, but {why}")
    return cfg._replace(config=config)


def default_config(n, d, dtype=jnp.bfloat16, block_q=128, block_k=64, **changes):
    """heuristic_config for the shape on this machine's GPU, with the given fields changed."""
    from pallas_kernels import heuristic_config

    return heuristic_config(n, d, dtype, block_q, block_k).replace(**changes)


def config_dict(config):
    """A KernelConfig as a JSON-ready dict (launch as {kernel: [warps, stages, rows]})."""
    import dataclasses

    if config is None:
        return None
    out = dataclasses.asdict(config)
    out["launch"] = {k: list(v) for k, v in config.launch}
    return out


def wan_setup(sparsity, seed, b, h, n, d, bq, bk, config=None):
    """Inputs of one comparison: bf16 q, k, v, do (B, N, H, D), phi(q), phi(k), the router's LUT at this sparsity,
    alpha (B, H, Nq) in [0.3, 0.9] and the kernels' KernelCall (config: a KernelConfig, None for the heuristic)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(int(sparsity * 1000) + seed), 3)
    q, k, v = normal_qkv(k1, b, n, h, d, jnp.bfloat16)
    do = jax.random.normal(k2, q.shape, jnp.float32).astype(jnp.bfloat16)
    nq, nk = -(-n // bq), -(-n // bk)
    topk = max(1, int(nk * (1 - sparsity) + 1e-6))
    lut = jax.jit(router_lut, static_argnums=(2, 3, 4))(q, k, topk, bq, bk)
    qp, kp = jax.jit(phi)(q), jax.jit(phi)(k)
    alpha = jax.random.uniform(k3, (b, h, nq), jnp.float32, 0.3, 0.9)
    cfg = kernel_call(q, lut, block_q=bq, block_k=bk, config=config)
    return q, k, v, do, qp, kp, lut, alpha, cfg


def phi_array_low_bit_route(q, k, config, feature_map="softmax"):
    """The low-bit front end the library had before its low-bit forward took the bf16 forward's (kept to measure
    against): one pass over K writes phi(K), its block means and int8 K~ (smoothed by an XLA mean of K over N), one
    over Q writes phi(Q), its block means, int8 Q and the LSE shift; then the selection. config: an SLA2Config;
    feature_map: a name or None. Returns (lut, mass, q_phi, k_phi, keys, queries, q, k), q and k passed through the
    front end's custom_vjp (differentiable) as ``sla2_jax.backends.front_end`` gives them."""
    from pallas_kernels.front_end import block_means_phi_int8, block_means_phi_int8_queries
    from sla2_jax import backends
    from sla2_jax.feature_maps import phi_function

    fm = None if feature_map is None else phi_function(feature_map)
    k_phi, k_means, keys, k = block_means_phi_int8(k, config.block_k, fm, pass_through=True)
    q_phi, q_means, queries, q = block_means_phi_int8_queries(q, config.block_q, fm, keys.mean,
                                                              backends.lse_shift_scale(q.shape[3]), pass_through=True)
    lut, mass = backends.select(q_means, k_means, q.shape[1], config, w_q=None, w_k=None)
    return lut, mass, q_phi, k_phi, keys, queries, q, k
