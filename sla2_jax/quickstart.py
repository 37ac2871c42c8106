"""Quickstart: build SLA2 attention, compare it with dense attention, print error, sparsity and timing.

    sla2-quickstart                                        # small CPU-friendly default (installed entry point)
    sla2-quickstart --seq-len 32760 --heads 12 --head-dim 128 --sparsity 0.95   # the Wan2.1-1.3B shape, GPU
    python -m experiments.quickstart                       # the same, from the repository

Training-free (untrained router, alpha = the captured mass): on the default video-like inputs the relative error
vs dense is about 0.14; it falls as N grows, rises with sparsity, and is large on i.i.d. random inputs
(README, "What error to expect").
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import sla2_jax as sla


def random_qkv(seed: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype=jnp.bfloat16):
    """Independent standard-normal q, k, v of shape (B, N, H, D) in dtype."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (batch, seq_len, heads, head_dim), jnp.float32).astype(dtype) for kk in keys)


def structured_qkv(seed: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype=jnp.bfloat16,
                   sharpness: float = 1.2):
    """Video-like q, k, v (B, N, H, D) in dtype: q and k share a smooth positional code, so each query attends
    mostly to keys near it in the sequence (a few large attention weights, many small ones), plus noise; v is
    random."""
    kf, kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 4)
    pos = jnp.arange(seq_len, dtype=jnp.float32)[:, None] / seq_len
    freqs = jax.random.normal(kf, (heads, head_dim // 2)) * 40.0
    angles = pos[:, None, :] * freqs[None]  # (N, H, D/2)
    code = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1) * sharpness  # (N, H, D), |code|^2 ~ D
    shape = (batch, seq_len, heads, head_dim)
    q = code + jax.random.normal(kq, shape)
    k = code + jax.random.normal(kk, shape)
    v = jax.random.normal(kv, shape)
    return tuple(x.astype(dtype) for x in (q, k, v))


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float32."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _median_seconds(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn(*args), each call synchronised, after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(prog="sla2-quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4000, help="N (any value, need not divide the block sizes)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of key blocks skipped (1 - topk_ratio)")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=["auto", "pallas", "xla", "reference"])
    p.add_argument("--quant", default="none", choices=["none", "int8", "int8_fp8"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--inputs", default="structured", choices=["structured", "random"],
                   help="structured: video-like locality (realistic); random: i.i.d. normal (hardest case)")
    p.add_argument("--iters", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    try:
        config = sla.SLA2Config(block_q=args.block_q, block_k=args.block_k, topk_ratio=round(1.0 - args.sparsity, 6),
                                quant=args.quant, backend=args.backend, alpha="mass")
    except ValueError as e:
        p.error(str(e))
    make = structured_qkv if args.inputs == "structured" else random_qkv
    q, k, v = make(args.seed, args.batch, args.seq_len, args.heads, args.head_dim, jnp.dtype(args.dtype))
    backend = sla.resolve_backend(config.backend)
    nk = -(-args.seq_len // args.block_k)
    topk = config.num_selected(nk)
    print(f"device: {jax.devices()[0].device_kind} | jax {jax.__version__} | backend: {backend}")
    print(f"shape (B, N, H, D) = {q.shape}, {args.dtype}, inputs: {args.inputs}")
    print(f"blocks: b_q={args.block_q}, b_k={args.block_k}; each query block attends {topk} of {nk} key blocks "
          f"exactly -> block sparsity {1 - topk / nk:.1%}")

    dense_fn = jax.jit(sla.dense_attention)
    sla2_fn = jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=config))
    sparse_only_fn = jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=config, alpha=1.0))
    ref = dense_fn(q, k, v)
    out = sla2_fn(q, k, v)
    lut, _, mass = sla.route(q, k, config)
    print(f"router: mean softmax mass captured by the selected blocks = {float(jnp.mean(mass)):.3f}")
    print(f"relative L2 error vs dense attention: SLA2 (training-free, alpha = mass) {rel_err(out, ref):.4f} | "
          f"sparse branch only {rel_err(sparse_only_fn(q, k, v), ref):.4f}")
    t_dense = _median_seconds(dense_fn, q, k, v, iters=args.iters)
    t_sla2 = _median_seconds(sla2_fn, q, k, v, iters=args.iters)
    print(f"time (median of {args.iters}): dense {t_dense * 1e3:.2f} ms | SLA2 {t_sla2 * 1e3:.2f} ms | "
          f"speedup {t_dense / t_sla2:.2f}x")


if __name__ == "__main__":
    main()
