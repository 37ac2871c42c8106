"""Autotune the Triton launch parameters (num_warps, num_stages, rows) of the Pallas SLA kernels on this GPU.

  python -m experiments.dev.autotune_kernels [--d 128] [--sparsity 0.95] [--kernels fwd sum dq dkv lowbit] [--out DIR]

For each kernel ("fwd", "dq", "dkv", "dq_linear", "sum", "lowbit") it times the candidates on the wan-1.3b shape (B=1, H=12,
N=32760, bf16, b_q=128, b_k=64, random LUT at the given sparsity), each candidate a KernelConfig whose ``launch``
differs from the base in that kernel only (the base: heuristic_config for the shape on this GPU, with forward and
backward "triton" unless --family mosaic; on the Mosaic path the "dq_linear" / "dkv" / "sum" entries set the small
Triton kernels beside the Mosaic ones). "fwd" is timed through the fused forward, "sum" through the linear states the
forward reads, "dq" / "dkv" / "dq_linear" through the whole backward (dq + states + dkv), "lowbit" through the INT8
forward.
Median of --runs synchronised calls after warm-up.

Prints the best entries as lines of pallas_kernels.config.LAUNCH_TABLES[generation] (paste them there by hand) and
writes DIR/autotune.json (every candidate's time) and DIR/launch_table.py (the entries).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import jax
import jax.numpy as jnp

from experiments.dev.common import bench_samples, config_dict, kernel_call, random_lut
from pallas_kernels import attention, gpu_generation, heuristic_config, linear_states, sla2_fused_attention_lowbit
from pallas_kernels.config import KERNEL_FAMILIES, LAUNCH_TABLES, Launch

CANDIDATES = {
    "fwd": [(w, s, kv) for w, s, kv in itertools.product((4, 8), (2, 3), (64, 128))],
    "sum": [(w, s, 128) for w, s in itertools.product((4, 8), (1, 2, 3))],
    "dq": [(w, s, r) for w, s, r in itertools.product((4, 8), (1, 2), (32, 64, 128))],
    "dkv": [(w, s, r) for w, s, r in itertools.product((4, 8), (1, 2), (32, 64, 128))],
    "dq_linear": [(w, 2, r) for w, r in itertools.product((4, 8, 16), (32, 64, 128))],
    "lowbit": [(w, s, 64) for w, s in itertools.product((4, 8), (2, 3, 4))],
}


def with_launch(config, kernel, launch):
    """config with launch[kernel] = launch (the other kernels' entries kept)."""
    table = dict(config.launch)
    table[kernel] = Launch(*launch)
    return config.replace(launch=tuple(table.items()))


def table_lines(best, d, bq, bk):
    """Lines of a LAUNCH_TABLES entry: ("kernel", head_dim, block_q, block_k): Launch(warps, stages, rows),"""
    return [f'        ("{kern}", {d}, {bq}, {bk}): Launch{tuple(cand)},' for kern, cand in best.items()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=None, help="default: 12 at D=128, 24 at D=64")
    ap.add_argument("--n", type=int, default=32760)
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--kernels", nargs="*", default=["fwd", "sum", "dq", "dkv"], choices=list(CANDIDATES))
    ap.add_argument("--family", default="triton", choices=KERNEL_FAMILIES,
                    help="forward/backward kernels of the base config (launch entries apply to the Triton ones)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--only", nargs="*", default=None, help="candidates to try, e.g. 8,2,128 (default: all)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    b, n, d, bq, bk = 1, args.n, args.d, 128, 64
    h = args.heads or (12 if d == 128 else 24)
    nq, nk = -(-n // bq), -(-n // bk)
    topk = max(1, int(nk * (1 - args.sparsity) + 1e-6))
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k, v, do = (jax.random.normal(ks[i], (b, n, h, d), jnp.float32).astype(jnp.bfloat16) for i in range(4))
    qp = jax.nn.softmax(q.astype(jnp.float32), -1).astype(q.dtype)
    kp = jax.nn.softmax(k.astype(jnp.float32), -1).astype(q.dtype)
    lut = random_lut(ks[4], b, h, nq, nk, topk)
    alpha = jax.random.uniform(ks[5], (b, h, nq), jnp.float32)
    gen = gpu_generation()
    base = heuristic_config(n, d, q.dtype, bq, bk).replace(forward=args.family, backward=args.family)
    cfg0 = kernel_call(q, lut, block_q=bq, block_k=bk, config=base)
    out = jax.jit(lambda *a: attention.forward(*a, cfg0, fused=True, residuals=True))(q, k, v, qp, kp, lut, alpha)
    res = attention.residuals(q, k, v, qp, kp, lut, alpha, out)
    del out

    def median_ms(fn, *a):
        samples = sorted(bench_samples(fn, *a, runs=args.runs, warmup=2))
        return samples[len(samples) // 2]

    def runner(kern, config):
        cfg = cfg0._replace(config=config)
        if kern == "fwd":
            return median_ms(lambda *a: attention.forward(*a, cfg, fused=True, residuals=False)["o"],
                             q, k, v, qp, kp, lut, alpha)
        if kern == "sum":
            return median_ms(lambda kp, v, lut: linear_states.forward_states(kp, v, lut, cfg), kp, v, lut)
        if kern == "lowbit":
            fn = lambda *a: sla2_fused_attention_lowbit(*a, quant="int8", block_q=bq, block_k=bk, config=config)
            return median_ms(fn, q, k, v, qp, kp, lut, alpha)
        return median_ms(lambda res, do: attention.backward(res, cfg, fused=True, do=do), res, do)

    results, best = {}, {}
    for kern in args.kernels:
        results[kern] = []
        cands = CANDIDATES[kern]
        if args.only:
            cands = [tuple(int(x) for x in c.split(",")) for c in args.only]
        for cand in cands:
            try:
                t = runner(kern, with_launch(base, kern, cand))
            except Exception as e:  # e.g. shared memory exceeded: not a candidate
                t = None
                print(f"{kern} {cand}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            results[kern].append((cand, t))
            print(f"{kern} {cand}: {t}", flush=True)
        ok = [(t, c) for c, t in results[kern] if t is not None]
        if ok:
            best[kern] = min(ok)[1]
            print(f"best {kern}: {best[kern]} {min(ok)[0]:.3f} ms", flush=True)
    lines = table_lines(best, d, bq, bk)
    meta = dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, generation=gen, n=n, h=h, d=d,
        sparsity=args.sparsity, base_config=config_dict(base),
        current={kern: list(LAUNCH_TABLES.get(gen, {}).get((kern, d, bq, bk), [])) for kern in best},
    )
    with open(os.path.join(args.out, "autotune.json"), "w") as f:
        results_json = {kk: [[list(c), t] for c, t in v_] for kk, v_ in results.items()}
        json.dump(dict(meta=meta, results=results_json, best=best), f, indent=1)
    snippet = f"    # LAUNCH_TABLES[{gen!r}] entries ({meta['device']}, N={n}, H={h}, sparsity {args.sparsity})\n"
    snippet += "\n".join(lines)
    with open(os.path.join(args.out, "launch_table.py"), "w") as f:
        f.write(snippet + "\n")
    print(snippet)


if __name__ == "__main__":
    main()
