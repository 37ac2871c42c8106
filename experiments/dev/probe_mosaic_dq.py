"""GPU probe: the Mosaic GPU dQ kernel (pallas_kernels/mosaic_dq.py) vs the Triton dq kernel.

    python -m experiments.dev.probe_mosaic_dq --out DIR [--sparsity 0.95 0.97] [--runs 20] [--stages 2 4]
        [--skip-small] [--no-sweep]

1. Small random checks (fresh seed, recorded): ragged and whole N, D 64 / 128, bf16 / f16, alpha None or random,
   block_k 64 / 128: dq vs a dense float32 reference written from the formulas with the LUT's token mask (lse and
   delta computed by the reference from its own o_s and a random dO); the reference itself is checked against
   jax.vjp of the dense masked attention. Each ring depth of --stages (the library uses 4).
2. wan-1.3b (B=1, H=12, N=32760, D=128, bf16, SLA router LUT) per sparsity: dq vs the Triton dq kernel (fused
   form, pallas_kernels.attention.backward_dq under KernelConfig(backward="triton"), with that call's delta) and
   vs the Triton sparse-only dq (alpha None), then medians of both Triton calls, of the Mosaic kernel alone
   (each ring depth) and of cuDNN forward / forward+backward, one process.
   Effective rate of the dq matmuls: flop = 6 * B * H * N^2 * D * (1 - s) (nominal) and 6 * B * H * Nq * 128 *
   topk * block_k * D (the LUT's exact count).
3. (unless --no-sweep) the kernel's time against the LUT length (random LUTs of length 5 / 10 / 25 / 50).
Each part runs on its own (an error is recorded, the next part goes on); JSON to DIR/probe_mosaic_dq.json.
The kernel has one build besides its ring depth; the variants that were measured and deleted, and the commit that
still has them: docs/dev/backward_kernels.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments.dev.common import config_dict, default_config, record_error, rel, wan_setup
from experiments.timing import time_samples
from pallas_kernels import attention
from pallas_kernels.mosaic_dq import sparse_attention_dq_mosaic

HIGHEST = lax.Precision.HIGHEST
RESULTS: dict = {}


def mosaic(stages, q, k, v, do, lse, delta, lut, alpha, block_k=64):
    """dq by the Mosaic kernel with a ring of `stages` K/V slots."""
    return sparse_attention_dq_mosaic(q, k, v, do, lse, delta, lut, alpha, block_k=block_k, stages=stages)


def token_mask(lut, n, block_q, block_k):
    """(B, H, N, N) bool: query r attends key c iff c's key block is in the LUT row of r's query block, c < N."""
    nk = -(-n // block_k)
    sel = jnp.any(lut[..., None] == jnp.arange(nk)[None, None, None, None, :], axis=3)  # (B, H, Nq, Nk)
    return jnp.repeat(jnp.repeat(sel, block_q, axis=2)[:, :, :n], block_k, axis=3)[..., :n]


def dense_reference(q, k, v, do, lut, alpha, block_k):
    """float32 dq (B, N, H, D) from the formulas, lse and delta (B, H, Npad) for the kernel, and the reference's
    own relative distance to jax.vjp of the dense masked attention (loss sum(a * o_s * dO)). Matmuls at HIGHEST
    precision (on the GPU jax's float32 default is TF32, ~3e-4 here)."""
    b, n, h, d = q.shape
    nq = lut.shape[2]
    scale = 1.0 / math.sqrt(d)
    q32, k32, v32, do32 = (x.astype(jnp.float32) for x in (q, k, v, do))
    mask = token_mask(lut, n, 128, block_k)
    a_rows = jnp.ones((b, h, n)) if alpha is None else jnp.repeat(alpha, 128, axis=-1)[..., :n]

    def o_s_of(q32):
        s = jnp.where(mask, jnp.einsum("bnhd,bmhd->bhnm", q32, k32, precision=HIGHEST) * scale, -jnp.inf)
        return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v32, precision=HIGHEST), s

    o_s, s = o_s_of(q32)
    lse = jax.nn.logsumexp(s, axis=-1) * math.log2(math.e)  # base 2 of logits * scale * log2(e)
    p = jnp.exp2(s * math.log2(math.e) - lse[..., None])
    delta = a_rows * jnp.einsum("bnhd,bnhd->bhn", do32, o_s, precision=HIGHEST)
    dp = a_rows[..., None] * jnp.einsum("bnhd,bmhd->bhnm", do32, v32, precision=HIGHEST)
    dq = scale * jnp.einsum("bhnm,bmhd->bnhd", p * (dp - delta[..., None]), k32, precision=HIGHEST)
    cot = do32 * jnp.transpose(a_rows, (0, 2, 1))[..., None]
    dq_vjp = jax.vjp(lambda x: o_s_of(x)[0], q32)[1](cot)[0]
    pad = ((0, 0), (0, 0), (0, nq * 128 - n))
    return dq, jnp.pad(lse, pad), jnp.pad(delta, pad), rel(dq, dq_vjp)


def random_lut(rng, b, h, nq, nk, topk):
    """Ascending, duplicate-free LUT; about half its rows hold the last (ragged) key block."""
    rows = []
    for _ in range(b * h * nq):
        ids = rng.permutation(nk)[:topk]
        if rng.random() < 0.5 and nk - 1 not in ids:
            ids[0] = nk - 1
        rows.append(np.sort(ids))
    return jnp.asarray(np.stack(rows).reshape(b, h, nq, topk), jnp.int32)


SMALL_CASES = [  # n, d, topk, dtype, alpha, block_k
    (1000, 128, 4, jnp.bfloat16, True, 64),
    (2000, 64, 5, jnp.float16, False, 64),
    (4096, 128, 6, jnp.float16, True, 64),
    (4096, 64, 3, jnp.bfloat16, False, 64),
    (1048, 128, 2, jnp.bfloat16, True, 64),  # the last query block's second warpgroup lies wholly past N
    (2000, 128, 1, jnp.bfloat16, False, 64),
    (2000, 128, 3, jnp.bfloat16, True, 128),  # block_k 128: 4 slots exceed shared memory at D = 128, 2 fit
]


def small_checks(stages_list):
    seed = int.from_bytes(os.urandom(4), "little")
    RESULTS["small_seed"] = seed
    rows = []
    for n, d, topk, dtype, with_alpha, block_k in SMALL_CASES:
        row = {"n": n, "d": d, "topk": topk, "dtype": jnp.dtype(dtype).name, "alpha": with_alpha, "block_k": block_k}
        try:
            rng = np.random.default_rng([seed, n, d, topk])
            b, h, nq, nk = 1, 2, -(-n // 128), -(-n // block_k)
            q, k, v, do = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in range(4))
            lut = random_lut(rng, b, h, nq, nk, topk)
            alpha = jnp.asarray(rng.uniform(0.2, 1.0, (b, h, nq)), jnp.float32) if with_alpha else None
            dq_ref, lse, delta, row["rel_ref_vs_vjp"] = dense_reference(q, k, v, do, lut, alpha, block_k)
            for stages in stages_list if block_k == 64 else (2,):
                name = f"s{stages}"
                try:
                    fn = jax.jit(lambda *a, st=stages, bk=block_k: mosaic(st, *a, block_k=bk))
                    dq = fn(q, k, v, do, lse, delta, lut, alpha)
                    row[f"rel_{name}"] = rel(dq, dq_ref)
                    row[f"finite_{name}"] = bool(jnp.all(jnp.isfinite(dq)))
                except Exception as e:  # noqa: BLE001 - record and go on
                    record_error(row, f"error_{name}", e)
        except Exception as e:  # noqa: BLE001
            record_error(row, "error", e)
        print("small", json.dumps(row), flush=True)
        rows.append(row)
    RESULTS["small"] = rows


def timed_rounds(cands, runs, rounds=3):
    """{key: (fn, args)} -> {key: (median, min, max) over `rounds` interleaved rounds of a median of `runs` ms}."""
    jitted = {}
    for key, (fn, args) in cands.items():
        try:
            time_samples(jax.jit(fn), *args, warmup=3, iters=3)
            jitted[key] = jax.jit(fn)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is left out
            record_error(RESULTS.setdefault("timing_errors", {}), key, e)
    cands = {key: c for key, c in cands.items() if key in jitted}
    meds = {key: [] for key in cands}
    for _ in range(rounds):
        for key, (_, args) in cands.items():
            meds[key].append(1e3 * statistics.median(time_samples(jitted[key], *args, warmup=1, iters=runs)))
    return {key: (statistics.median(m), min(m), max(m)) for key, m in meds.items()}


def wan(sparsity, runs, stages_list):
    q, k, v, do, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 29, 1, 12, 32760, 128, 128, 64)
    cfg = cfg._replace(config=default_config(cfg.n, cfg.d, forward="triton", backward="triton"))
    b, n, h, d = q.shape
    row = {"sparsity": sparsity, "topk": cfg.topk, "triton_config": config_dict(cfg.config)}
    flop_nominal = 6 * b * h * n**2 * d * (1 - sparsity)
    flop_lut = 6 * b * h * cfg.nq * 128 * cfg.topk * cfg.block_k * d
    row.update(flop_nominal=flop_nominal, flop_lut=flop_lut)
    cands, refs = {}, {}
    try:  # the fused Triton dq (as the library's backward calls it) and its delta
        fwd = jax.jit(lambda *a: attention.forward(*a, cfg, fused=True, residuals=True))(q, k, v, qp, kp, lut, alpha)
        res = attention.residuals(q, k, v, qp, kp, lut, alpha, fwd)
        triton = lambda res, do: attention.backward_dq(res, cfg, fused=True, do=do)
        out = jax.jit(triton)(res, do)
        refs["fused"] = (out["dq"], fwd["lse"], out["delta"], alpha)
        cands["triton_dq_fused"] = (triton, (res, do))
    except Exception as e:  # noqa: BLE001
        record_error(row, "triton_fused_error", e)
    try:  # the Triton sparse-only dq (no linear branch, no alpha)
        cfg0 = cfg._replace(linear=False)
        fwd0 = jax.jit(
            lambda *a: attention.forward(*a, None, None, lut, None, cfg0, fused=False, residuals=True)
        )(q, k, v)
        res0 = attention.residuals(q, k, v, None, None, lut, None, fwd0)
        triton0 = lambda res0, do: attention.backward_dq(res0, cfg0, fused=False, do_s=do)
        out0 = jax.jit(triton0)(res0, do)
        refs["sparse_only"] = (out0["dq"], fwd0["lse"], out0["delta"], None)
        cands["triton_dq_sparse_only"] = (triton0, (res0, do))
    except Exception as e:  # noqa: BLE001
        record_error(row, "triton_sparse_only_error", e)
    for stages in stages_list:
        for form, (dq_t, lse, delta, a) in refs.items():
            key = f"mosaic_s{stages}_{form}"
            try:
                fn = lambda q, k, v, do, lse, delta, lut, a, st=stages: mosaic(st, q, k, v, do, lse, delta, lut, a)
                dq = jax.jit(fn)(q, k, v, do, lse, delta, lut, a)
                row[f"rel_{key}_vs_triton"] = rel(dq, dq_t)
                row[f"finite_{key}"] = bool(jnp.all(jnp.isfinite(dq)))
                cands[key] = (fn, (q, k, v, do, lse, delta, lut, a))
            except Exception as e:  # noqa: BLE001
                record_error(row, f"error_{key}", e)
    dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    grads = lambda q, k, v, do: jax.grad(lambda *x: jnp.sum(dpa(*x).astype(jnp.float32) * do), argnums=(0, 1, 2))(
        q, k, v
    )
    cands["cudnn_fwd"] = (dpa, (q, k, v))
    cands["cudnn_fwd_bwd"] = (grads, (q, k, v, do))
    stats = timed_rounds(cands, runs)
    row["times_ms"] = {key: st[0] for key, st in stats.items()}
    row["times_ms_round_min_max"] = {key: st[1:] for key, st in stats.items()}
    row["tflops_lut"] = {key: flop_lut / (st[0] * 1e-3) / 1e12 for key, st in stats.items() if "cudnn" not in key}
    print("wan", json.dumps(row), flush=True)
    RESULTS.setdefault("wan", []).append(row)


def topk_sweep(runs, stages_list, topks=(5, 10, 25, 50)):
    """Kernel time against the LUT length on the wan-1.3b shape (random ascending LUTs, alpha random): the slope is
    the cost of one LUT entry, the intercept the per-program fixed cost (prologue, pipeline fill, epilogue)."""
    q, k, v, do, _, _, _, alpha, cfg = wan_setup(0.95, 29, 1, 12, 32760, 128, 128, 64)
    rng = np.random.default_rng(7)
    lse = jnp.asarray(rng.uniform(5.0, 8.0, (1, 12, cfg.npad)), jnp.float32)
    delta = jnp.asarray(rng.standard_normal((1, 12, cfg.npad)) * 0.1, jnp.float32)
    cands = {}
    for topk in topks:
        lut = random_lut(rng, 1, 12, cfg.nq, cfg.nk, topk)
        for stages in stages_list:
            fn = lambda q, k, v, do, lse, delta, lut, a, st=stages: mosaic(st, q, k, v, do, lse, delta, lut, a)
            cands[f"s{stages}_topk{topk}"] = (fn, (q, k, v, do, lse, delta, lut, alpha))
    try:
        stats = timed_rounds(cands, runs, rounds=2)
        RESULTS["topk_sweep_ms"] = {key: st[0] for key, st in stats.items()}
    except Exception as e:  # noqa: BLE001
        record_error(RESULTS, "topk_sweep_error", e)
    print("sweep", json.dumps(RESULTS.get("topk_sweep_ms")), flush=True)


def summary():
    """A short table for the end of the output."""
    lines = ["", "small checks (rel error vs dense f32):"]
    for r in RESULTS.get("small", []):
        errs = {kk[4:]: f"{vv:.2e}" for kk, vv in r.items() if kk.startswith("rel_")}
        bad = [kk for kk in r if kk.startswith("error")]
        lines.append(
            f"  N={r['n']} D={r['d']} topk={r['topk']} {r['dtype']} alpha={r['alpha']} bk={r['block_k']}: "
            f"{errs} {'ERRORS ' + str(bad) if bad else ''}"
        )
    for r in RESULTS.get("wan", []):
        lines.append(f"wan s={r['sparsity']} topk={r['topk']}:")
        for kk, ms in r.get("times_ms", {}).items():
            tf = r["tflops_lut"].get(kk)
            lo, hi = r["times_ms_round_min_max"][kk]
            lines.append(f"  {kk:34s} {ms:7.3f} ms [{lo:.3f}, {hi:.3f}]" + (f" {tf:6.1f} TFLOP/s" if tf else ""))
        for kk, vv in r.items():
            if kk.startswith(("rel_", "error")):
                lines.append(f"  {kk}: {vv if isinstance(vv, str) else f'{vv:.2e}'}"[:300])
    sweep = RESULTS.get("topk_sweep_ms") or {}
    for build in sorted({key.rsplit("_topk", 1)[0] for key in sweep}):
        pts = sorted(
            (int(key.rsplit("_topk", 1)[1]), ms) for key, ms in sweep.items() if key.rsplit("_topk", 1)[0] == build
        )
        slope, icept = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1) if len(pts) > 1 else (0.0, 0.0)
        lines.append(f"sweep {build}: " + " ".join(f"topk{t}={ms:.3f}" for t, ms in pts))
        lines.append(f"  fit: {1e3 * slope:.1f} us per LUT entry, {1e3 * icept:.0f} us fixed (whole grid)")
    print("\n".join(lines), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="K/V ring depths (the library uses 4)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the LUT-length sweep")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    path = os.path.join(args.out, "probe_mosaic_dq.json")
    if not args.skip_small:
        small_checks(args.stages)
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
    for s in args.sparsity:
        try:
            wan(s, args.runs, args.stages)
        except Exception as e:  # noqa: BLE001
            record_error(RESULTS.setdefault("wan_errors", {}), str(s), e)
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
    if not args.no_sweep:
        topk_sweep(args.runs, args.stages)
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)
    summary()


if __name__ == "__main__":
    main()
