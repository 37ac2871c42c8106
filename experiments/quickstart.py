"""Quickstart: build SLA2 attention, compare it with dense attention, print error, sparsity and timing.

    python -m experiments.quickstart                       # small CPU-friendly default
    python -m experiments.quickstart --seq-len 32760 --heads 12 --head-dim 128 --sparsity 0.95   # wan-1.3b, GPU
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import sla2_jax as sla
from experiments.inputs import random_qkv, structured_qkv
from experiments.timing import time_fn


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    t_dense = time_fn(dense_fn, q, k, v, iters=args.iters)
    t_sla2 = time_fn(sla2_fn, q, k, v, iters=args.iters)
    print(f"time (median of {args.iters}): dense {t_dense * 1e3:.2f} ms | SLA2 {t_sla2 * 1e3:.2f} ms | "
          f"speedup {t_dense / t_sla2:.2f}x")


if __name__ == "__main__":
    main()
