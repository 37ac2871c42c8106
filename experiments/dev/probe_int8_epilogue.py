"""GPU probe: the INT8 Mosaic forward with the linear branch and the SLA2 combine in its epilogue
(mosaic_forward.sparse_linear_attention_mosaic_int8) vs the INT8 kernel + the Triton linear epilogue.

    python -m experiments.dev.probe_int8_epilogue --out DIR [--sparsity 0.95 0.97] [--runs 20] [--rounds 2]

The library (sla2_jax.sla2_attention, quant="int8", backend "pallas", Hopper) takes the fused path when
KernelConfig.epilogue is "mosaic" (default) and the per-block states are bf16; "triton" runs the Triton epilogue
kernel after the INT8 kernel. Each path is a SLA2Config(kernel=heuristic_config(...).replace(epilogue=...)).
Correctness first: small shapes (fresh seed, partial last blocks, D 64 / 128, bf16 / f16): module output and
gradients (q, k, v) fused vs Triton epilogue, both vs dense float32 attention; wan-1.3b (B=1, H=12,
N=32760, D=128, bf16) per sparsity: the same comparisons, then module forward times (bf16, INT8 fused, INT8 Triton
epilogue, cuDNN; synchronised medians and pipelined ms per call, interleaved rounds) and CUPTI kernel sums.
Writes DIR/probe_int8_epilogue.json after every part.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import sla2_jax as sla
from experiments.dev.common import default_config, kernel_ms, record_error, rel
from experiments.timing import pipelined_seconds, time_fn

RESULTS: dict = {}


def module(sparsity, quant, epilogue=None):
    """(q, k, v) -> sla2_attention on the pallas backend; epilogue: None (the library's KernelConfig) or the
    KernelConfig.epilogue of the call's heuristic_config."""

    def run(q, k, v):
        kernel = None if epilogue is None else default_config(q.shape[1], q.shape[3], q.dtype, epilogue=epilogue)
        cfg = sla.SLA2Config(
            topk_ratio=round(1 - sparsity, 6), backend="pallas", alpha="mass", quant=quant, kernel=kernel
        )
        return sla.sla2_attention(q, k, v, config=cfg)

    return run


def grads(fn, do):
    return lambda q, k, v: jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * do), argnums=(0, 1, 2))(q, k, v)


def compare(row, sparsity, q, k, v, do):
    """Outputs and gradients of the fused vs the Triton-epilogue INT8 path, and each vs dense attention."""
    fused, triton = (jax.jit(module(sparsity, "int8", e)) for e in ("mosaic", "triton"))
    o_f, o_t = fused(q, k, v), triton(q, k, v)
    dense = sla.dense_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    row.update(rel_o_fused_vs_triton=rel(o_f, o_t), rel_o_fused_vs_dense=rel(o_f, dense))
    row["rel_o_triton_vs_dense"] = rel(o_t, dense)
    row["finite"] = bool(jnp.all(jnp.isfinite(o_f)))
    g_f = jax.jit(grads(module(sparsity, "int8", "mosaic"), do))(q, k, v)
    g_t = jax.jit(grads(module(sparsity, "int8", "triton"), do))(q, k, v)
    row["rel_grads_fused_vs_triton"] = [rel(a, b) for a, b in zip(g_f, g_t)]
    return fused, triton


def small(seed):
    rows = []
    for n, d, dtype, sparsity in [
        (2000, 128, jnp.bfloat16, 0.9),
        (1000, 64, jnp.float16, 0.8),
        (4096, 128, jnp.bfloat16, 0.95),
        (1048, 64, jnp.bfloat16, 0.7),
    ]:
        row = dict(n=n, d=d, dtype=jnp.dtype(dtype).name, sparsity=sparsity)
        try:
            keys = jax.random.split(jax.random.PRNGKey(seed + n + d), 4)
            q, k, v, do = (jax.random.normal(x, (1, n, 2, d), dtype) for x in keys)
            compare(row, sparsity, q, k, v, do)
        except Exception as e:  # noqa: BLE001
            record_error(row, "error", e)
        print("small", json.dumps(row), flush=True)
        rows.append(row)
    RESULTS["small"] = rows


def wan(sparsity, seed, runs, rounds):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, do = (jax.random.normal(x, (1, 32760, 12, 128), jnp.bfloat16) for x in keys)
    row = dict(sparsity=sparsity, seed=seed)
    try:
        fused, triton = compare(row, sparsity, q, k, v, do)
    except Exception as e:  # noqa: BLE001
        record_error(row, "error_compare", e)
        fused = triton = None
    cands = {
        "bf16": jax.jit(module(sparsity, "none")),
        "int8_fused": fused,
        "int8_triton_epilogue": triton,
        "cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")),
    }
    cands = {name: fn for name, fn in cands.items() if fn is not None}
    for r in range(rounds):
        for name, fn in cands.items():
            try:
                row.setdefault(f"{name}_ms", []).append(1e3 * time_fn(fn, q, k, v, iters=runs))
                row.setdefault(f"{name}_pipelined_ms", []).append(1e3 * pipelined_seconds(fn, q, k, v))
            except Exception as e:  # noqa: BLE001
                record_error(row, f"error_{name}_r{r}", e)
    for name, fn in cands.items():
        if name != "cudnn":
            try:
                row[f"{name}_cupti_ms"] = kernel_ms(fn, (q, k, v), iterations=10)[0]
            except Exception as e:  # noqa: BLE001
                record_error(row, f"error_cupti_{name}", e)
    print("wan", json.dumps(row), flush=True)
    RESULTS.setdefault("wan", []).append(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    seed = int.from_bytes(os.urandom(3), "little")
    RESULTS["seed"] = seed
    path = os.path.join(args.out, "probe_int8_epilogue.json")
    for part in [lambda: small(seed)] + [lambda s=s: wan(s, seed, args.runs, args.rounds) for s in args.sparsity]:
        try:
            part()
        except Exception as e:  # noqa: BLE001
            record_error(RESULTS, "error", e)
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
