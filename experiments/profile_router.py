"""Where the router's and the feature maps' time goes (per XLA stage), at one shape.

    python -m experiments.profile_router                      # wan-1.3b shape, 95%
    python -m experiments.profile_router --seq-len 2048 --heads 2 --iters 3   # CPU smoke

Times each stage alone (jit, median of --iters synchronised runs): pooling of Q and K, the block scores, top-k,
the ascending sort of the LUT, the block probabilities and captured mass, the whole `sla2_jax.route`, and the
feature maps phi(Q), phi(K) that the Pallas path materialises.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import sla2_jax as sla
from experiments.inputs import random_qkv
from experiments.timing import time_fn
from sla2_jax.routing import block_probabilities


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    cfg = sla.SLA2Config(topk_ratio=round(1 - args.sparsity, 6))
    q, k, _ = random_qkv(0, 1, args.seq_len, args.heads, args.head_dim)
    scores = sla.block_scores(q, k, block_q=cfg.block_q, block_k=cfg.block_k)
    topk = cfg.num_selected(scores.shape[-1])
    _, idx = jax.lax.top_k(scores, topk)
    lut = jnp.sort(idx, axis=-1)
    stages = {
        "pool Q": (lambda q: sla.pool_blocks(q, cfg.block_q), (q,)),
        "pool K": (lambda k: sla.pool_blocks(k, cfg.block_k), (k,)),
        "block_scores (pool both + einsum)": (
            lambda q, k: sla.block_scores(q, k, block_q=cfg.block_q, block_k=cfg.block_k), (q, k)),
        "top_k": (lambda s: jax.lax.top_k(s, topk)[1], (scores,)),
        "sort LUT ascending": (lambda i: jnp.sort(i, axis=-1), (idx,)),
        "probabilities + mass": (lambda s, lut: jnp.sum(jnp.take_along_axis(
            block_probabilities(s, args.seq_len, cfg.block_k), lut, axis=-1), -1), (scores, lut)),
        "route (all of the above)": (lambda q, k: sla.route(q, k, cfg), (q, k)),
        "phi(Q) softmax": (lambda q: sla.feature_map(q, "softmax"), (q,)),
        "phi(Q) + phi(K)": (lambda q, k: (sla.feature_map(q, "softmax"), sla.feature_map(k, "softmax")), (q, k)),
    }
    print(f"{jax.devices()[0].device_kind} | jax {jax.__version__} | (B, N, H, D) = {q.shape} bf16 | "
          f"Nq x Nk = {scores.shape[2]} x {scores.shape[3]}, k = {topk}")
    for name, (fn, fn_args) in stages.items():
        print(f"{name:<36}{1e3 * time_fn(jax.jit(fn), *fn_args, iters=args.iters):9.3f} ms")


if __name__ == "__main__":
    main()
