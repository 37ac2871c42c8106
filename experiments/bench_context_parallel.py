"""Context-parallel SLA2 on all local GPUs vs one GPU: time and memory per GPU (issue: scale-out).

    python -m experiments.bench_context_parallel                       # wan-14b-720p shape, every local device
    python -m experiments.bench_context_parallel --seq-len 4096 --heads 8 --head-dim 64 --iters 2   # CPU smoke

Times forward and forward+backward (grad of sum(o * do) w.r.t. q, k, v) of `context_parallel_attention` with the
sequence split over a 1-D mesh of all local devices, then the same SLA2 function on one device, in one process.
Memory per device = the compiled program's per-device arguments + outputs + temporaries.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sla2_jax as sla
from experiments.inputs import random_qkv
from experiments.timing import compiled_memory_bytes, time_fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=75600)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--backend", default="auto")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-single", action="store_true", help="skip the one-device comparison")
    p.add_argument("--out", default="runs/context_parallel.json")
    args = p.parse_args(argv)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("context",))
    cfg = sla.SLA2Config(topk_ratio=round(1 - args.sparsity, 6), backend=args.backend, alpha="mass")
    q, k, v = random_qkv(0, 1, args.seq_len, args.heads, args.head_dim)
    do = random_qkv(1, 1, args.seq_len, args.heads, args.head_dim)[0]
    print(f"{len(devices)} x {devices[0].device_kind} | jax {jax.__version__} | (B, N, H, D) = {q.shape} | "
          f"sparsity {args.sparsity:.0%} | backend {sla.resolve_backend(cfg.backend)}")

    def loss_grad(attn):
        return jax.jit(jax.grad(lambda q, k, v, do: jnp.sum(attn(q, k, v).astype(jnp.float32) * do),
                                argnums=(0, 1, 2)))

    results = {"devices": len(devices), "device_kind": devices[0].device_kind, "jax": jax.__version__,
               "shape": list(q.shape), "sparsity": args.sparsity}
    sharding = NamedSharding(mesh, P(None, "context"))
    cp_args = [jax.device_put(x, sharding) for x in (q, k, v, do)]
    cp = lambda q, k, v: sla.context_parallel_attention(q, k, v, mesh=mesh, seq_axis="context", config=cfg)  # noqa
    runs = [("context-parallel", jax.jit(cp), loss_grad(cp), cp_args, len(devices))]
    if not args.skip_single:
        one = lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg)  # noqa: E731
        single_args = [jax.device_put(x, devices[0]) for x in (q, k, v, do)]
        runs.append(("one device", jax.jit(one), loss_grad(one), single_args, 1))
    outputs = {}
    for name, fwd, grad, xs, n_dev in runs:
        outputs[name] = np.asarray(fwd(*xs[:3]), np.float32)
        row = {"fwd_ms": 1e3 * time_fn(fwd, *xs[:3], iters=args.iters),
               "fwd_bwd_ms": 1e3 * time_fn(grad, *xs, iters=args.iters)}
        for key, fn, a in (("fwd", fwd, xs[:3]), ("fwd_bwd", grad, xs)):
            mem = compiled_memory_bytes(fn, *a)  # the per-device program's footprint
            row[f"{key}_mem_gib_per_device"] = None if mem is None else mem / 2**30
        results[name] = row
        print(f"{name:>17}: fwd {row['fwd_ms']:8.2f} ms | fwd+bwd {row['fwd_bwd_ms']:8.2f} ms | memory per "
              f"device fwd {row['fwd_mem_gib_per_device'] or float('nan'):.2f} GiB, fwd+bwd "
              f"{row['fwd_bwd_mem_gib_per_device'] or float('nan'):.2f} GiB")
    if len(outputs) == 2:
        a, b = outputs.values()
        results["rel_err_cp_vs_single"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        print(f"context-parallel vs one device: relative error {results['rel_err_cp_vs_single']:.2e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
