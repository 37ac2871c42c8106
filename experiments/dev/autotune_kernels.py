"""Autotune the launch configurations (num_warps, num_stages, rows) of the Pallas SLA kernels on this GPU.

  python experiments/autotune_kernels.py [--d 128] [--sparsity 0.95] [--out DIR] [--write]

For each kernel family ("fwd", "dq", "dkv", "sum") it times the candidates on the wan-1.3b shape
(B=1, H=12, N=32760, bf16, b_q=128, b_k=64, random LUT at the given sparsity), the other kernels staying at
their current table entry: "fwd" through the fused forward, "sum" through the pre-pass, "dq"/"dkv" through the
whole backward (dq + totals + dkv). Median of --runs timed calls after warm-up (block_until_ready).
Writes DIR/autotune.json and DIR/launch_table.py (the new entries); with --write it also rewrites the table
of this GPU generation in pallas_kernels/launch_config.py (between the AUTOTUNE markers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import importlib  # noqa: E402

lc = importlib.import_module("pallas_kernels.launch_config")
from pallas_kernels import sparse_linear as sl  # noqa: E402
from experiments.timing import time_samples  # noqa: E402

CANDIDATES = {
    "fwd": [(w, s, kv) for w, s, kv in itertools.product((4, 8), (2, 3), (64, 128))],
    "sum": [(w, s, 128) for w, s in itertools.product((4, 8), (1, 2, 3))],
    "dq": [(w, s, r) for w, s, r in itertools.product((4, 8), (1, 2), (32, 64, 128))],
    "dkv": [(w, s, r) for w, s, r in itertools.product((4, 8), (1, 2), (32, 64, 128))],
}


def median_ms(f, *args, runs):
    return 1e3 * statistics.median(time_samples(f, *args, warmup=2, iters=runs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--n", type=int, default=32760)
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--kernels", nargs="*", default=["fwd", "sum", "dq", "dkv"])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="candidates to try, e.g. 8,2,128 (default: all)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    b, n, d, bq, bk = 1, args.n, args.d, 128, 64
    h = args.heads or (12 if d == 128 else 24)
    nq, nk = -(-n // bq), -(-n // bk)
    topk = max(1, int(nk * (1 - args.sparsity) + 1e-6))
    ks = jax.random.split(jax.random.PRNGKey(0), 6)
    q, k, v, do = (jax.random.normal(ks[i], (b, n, h, d), jnp.float32).astype(jnp.bfloat16) for i in range(4))
    qp = jax.nn.softmax(q.astype(jnp.float32), -1).astype(q.dtype)
    kp = jax.nn.softmax(k.astype(jnp.float32), -1).astype(q.dtype)
    perm = jax.vmap(lambda kk: jax.random.permutation(kk, nk)[:topk])(jax.random.split(ks[4], b * h * nq))
    lut = jnp.sort(perm.reshape(b, h, nq, topk), -1).astype(jnp.int32)
    alpha = jax.random.uniform(ks[5], (b, h, nq), jnp.float32)
    cfg = sl._validate(q, k, v, qp, kp, lut, bq, bk, "complement", None, 1e-6, None)
    gen = lc.gpu_generation()
    out = jax.jit(lambda *a: sl._forward(*a, cfg, fused=True, residuals=True))(q, k, v, qp, kp, lut, alpha)
    res = sl._residuals(q, k, v, qp, kp, lut, alpha, out)

    runners = {
        "fwd": lambda: median_ms(
            jax.jit(lambda *a: sl._forward(*a, cfg, fused=True, residuals=False)["o"]),
            q,
            k,
            v,
            qp,
            kp,
            lut,
            alpha,
            runs=args.runs,
        ),
        "sum": lambda: median_ms(jax.jit(lambda kp, v: sl._prepass(kp, v, cfg)), kp, v, runs=args.runs),
        "dq": lambda: median_ms(
            jax.jit(lambda res, do: sl._backward(res, cfg, fused=True, do=do)), res, do, runs=args.runs
        ),
    }
    runners["dkv"] = runners["dq"]
    results, best = {}, {}
    for kern in args.kernels:
        results[kern] = []
        cands = CANDIDATES[kern]
        if args.only:
            cands = [tuple(int(x) for x in c.split(",")) for c in args.only]
        for cand in cands:
            try:
                with lc.override_launch_config(**{kern: cand}):
                    t = runners[kern]()
            except Exception as e:  # e.g. shared memory exceeded: not a candidate
                t = None
                print(f"{kern} {cand}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            results[kern].append((cand, t))
            print(f"{kern} {cand}: {t}", flush=True)
        ok = [(t, c) for c, t in results[kern] if t is not None]
        if ok:
            best[kern] = min(ok)[1]
            print(f"best {kern}: {best[kern]} {min(ok)[0]:.3f} ms", flush=True)
    entries = {f'("{kk}", {d}, {bq}, {bk})': v_ for kk, v_ in best.items()}
    snippet = "\n".join(f"        {kk}: {tuple(v_)}," for kk, v_ in entries.items())
    meta = dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, generation=gen, n=n, h=h, d=d, sparsity=args.sparsity
    )
    with open(os.path.join(args.out, "autotune.json"), "w") as f:
        json.dump(
            dict(meta=meta, results={kk: [[list(c), t] for c, t in v_] for kk, v_ in results.items()}, best=best),
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "launch_table.py"), "w") as f:
        f.write(f"# {meta}\n{snippet}\n")
    print(snippet)
    if args.write:
        path = os.path.join(os.path.dirname(lc.__file__), "launch_config.py")
        src = open(path).read()
        for kern, cand in best.items():
            key = f'("{kern}", {d}, {bq}, {bk})'
            block = re.search(rf'    "{gen}": {{\n(.*?)\n    }},', src, re.S)
            if block is None:
                continue
            body = block.group(1)
            line = f"        {key}: {tuple(cand)},"
            if key in body:
                body = re.sub(re.escape(key) + r": \([^)]*\),", f"{key}: {tuple(cand)},", body)
            else:
                body = (body + "\n" + line) if body.strip() else line
            src = src[: block.start(1)] + body + src[block.end(1) :]
        open(path, "w").write(src)
        print("wrote", path)


if __name__ == "__main__":
    main()
