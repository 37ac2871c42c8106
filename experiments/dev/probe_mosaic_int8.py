"""GPU probe: the INT8 Mosaic GPU sparse forward (pallas_kernels/mosaic_forward.py) vs the bf16 Mosaic one and the
Triton INT8 one, in one process.

    python -m experiments.dev.probe_mosaic_int8 --out DIR [--sparsity 0.95 0.97] [--runs 20] [--rounds 2]

1. Small checks first (fresh seed; ragged and whole N, N % 8 == 0, D 64 / 128, bf16): Mosaic INT8 o_s, lse vs the
   Triton INT8 kernel (same quantised keys) and vs the fake-quant reference (dense float32 attention over the
   dequantised Q, K~ with the LUT's mask, LSE + q . mean_N(K)); the bf16 Mosaic kernel vs dense float32 (the shared
   skeleton must still give the bf16 results).
2. wan-1.3b (B=1, H=12, N=32760, D=128, experiments.dev.common.wan_setup) per sparsity: sparse part alone
   (INT8 Mosaic kernel on pre-quantised Q and K, + its Q pass, the Q pass alone, bf16 Mosaic, Triton INT8, Triton
   bf16), errors vs bf16 Mosaic and vs Triton INT8; the module forward (sla2_jax, backend "pallas", quant "int8" with
   KernelConfig.forward "mosaic" and "triton", quant None), errors vs bf16 and vs dense (cuDNN); cuDNN.
   --tune-only: the INT8 kernel's ring depth (stages 3 / 4 / 6) on pre-quantised operands.
   Timings: medians of synchronised calls (experiments.timing), `--rounds` rounds (their spread is the noise).
Each part runs on its own (an error is recorded, the next part goes on); JSON to DIR/probe_mosaic_int8.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import sla2_jax as sla
from experiments.dev.common import bench, default_config, error_text, kernel_call, rel, uniform_lut, wan_setup
from pallas_kernels import KernelConfig, attention
from pallas_kernels import mosaic_forward as mf
from pallas_kernels import quantize as qz

RESULTS: dict = {"errors": []}
TRITON = KernelConfig(forward="triton", backward="triton")
_LOG2E = math.log2(math.e)


def guarded(name, fn, default=None):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - record and go on
        traceback.print_exc()
        RESULTS["errors"].append(f"{name}: {error_text(e)}"[:3000])
        return default


def masked_dense(q, k, v, lut, block_k):
    """o (B, N, H, D) f32 and lse (B, H, N) base 2 of softmax(q k^T / sqrt(D)) over the LUT's keys (< N)."""
    _b, n, _h, d = q.shape
    nk = -(-n // block_k)
    sel = jnp.any(lut[..., None] == jnp.arange(nk)[None, None, None, None, :], axis=3)  # (B, H, Nq, Nk)
    mask = jnp.repeat(jnp.repeat(sel, 128, axis=2)[:, :, :n], block_k, axis=3)[..., :n]
    s = jnp.einsum("bnhd,bmhd->bhnm", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
    s = jnp.where(mask, s, -jnp.inf)
    o = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
    return o, jax.nn.logsumexp(s, axis=-1) * _LOG2E


def dequantise(x8, scales, block):
    """int8 (B, N, H, D) with scales (B, H, Nb) per block of rows -> float32."""
    per_row = jnp.repeat(jnp.swapaxes(scales, 1, 2), block, axis=1)[:, : x8.shape[1], :, None]  # (B, N, H, 1)
    return x8.astype(jnp.float32) * per_row


def fake_quant_reference(q, v, lut, keys, block_k):
    """The INT8 sparse branch in float32 on the dequantised Q (per 128 rows) and K~: (o, lse + q . mean)."""
    q8, q_scale = qz.quantize_blocks(q, 128)
    o, lse = masked_dense(dequantise(q8, q_scale, 128), dequantise(keys.k8, keys.scale, block_k), v, lut, block_k)
    shift = jnp.einsum("bnhd,bhd->bhn", q.astype(jnp.float32), keys.mean) / math.sqrt(q.shape[-1]) * _LOG2E
    return o, lse + shift


def triton_int8_sparse(q, k, v, lut, keys, block_k=64, quant="int8"):
    """(o_s, lse) of the Triton low-bit forward kernel alone (no linear branch; quant "int8" or "int8_fp8"), Q
    quantised in the kernel."""
    cfg = kernel_call(q, lut, block_k=block_k, linear_scope="all", config=TRITON)._replace(linear=False)
    quantised = qz.Quantised(None, None, *keys)
    out = attention.forward_lowbit_triton(
        q, k, v, None, None, lut, None, quantised, cfg, quant, fused=False, residuals=True
    )
    return out["o_s"], out["lse"]


def triton_bf16_sparse(q, k, v, lut, block_k=64):
    """(o_s, lse) of the Triton bf16 forward kernel alone (no linear branch)."""
    cfg = kernel_call(q, lut, block_k=block_k, linear_scope="all", config=TRITON)._replace(linear=False)
    out = attention.forward(q, k, v, None, None, lut, None, cfg, fused=False, residuals=True)
    return out["o_s"], out["lse"]


def int8_mosaic_kernel(q, k, v, lut, keys, queries, stages=4):
    """The INT8 Mosaic kernel on pre-quantised Q (queries) and K~ (keys): no Q pass inside."""
    return mf.sparse_attention_mosaic_int8(q, k, v, lut, keys, stages=stages, queries=queries)


def random_case(seed, n, d, topk, h=2):
    rng = np.random.default_rng([seed, n, d])
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.bfloat16) for _ in range(3))
    k = k + jnp.asarray(0.5 * rng.standard_normal(d), jnp.bfloat16)  # a common offset: smoothing matters
    nq, nk = -(-n // 128), -(-n // 64)
    return q, k, v, uniform_lut(rng, 1, h, nq, nk, topk)


def small_row(seed, n, d, topk):
    row = {"n": n, "d": d, "topk": topk}
    q, k, v, lut = random_case(seed, n, d, topk)
    keys = jax.jit(qz.quantize_keys_with_mean, static_argnums=1)(k, 64)
    o8, lse8 = jax.jit(mf.sparse_attention_mosaic_int8)(q, k, v, lut, keys)
    o_t, lse_t = jax.jit(triton_int8_sparse)(q, k, v, lut, keys)
    o_f, lse_f = fake_quant_reference(q, v, lut, keys, 64)
    o_d, lse_d = masked_dense(q, k, v, lut, 64)
    row.update(
        rel_o_vs_triton_int8=rel(o8, o_t),
        max_abs_lse_vs_triton_int8=float(jnp.max(jnp.abs(lse8[:, :, :n] - lse_t[:, :, :n]))),
        rel_o_vs_fake_quant=rel(o8, o_f),
        max_abs_lse_vs_fake_quant=float(jnp.max(jnp.abs(lse8[:, :, :n] - lse_f))),
        rel_o_triton_int8_vs_fake_quant=rel(o_t, o_f),
        rel_o_int8_vs_dense=rel(o8, o_d),
        finite=bool(jnp.all(jnp.isfinite(o8))) and bool(jnp.all(jnp.isfinite(lse8[:, :, :n]))),
    )
    o16, lse16 = jax.jit(mf.sparse_attention_mosaic)(q, k, v, lut)
    row.update(bf16_rel_o_vs_dense=rel(o16, o_d), bf16_max_abs_lse=float(jnp.max(jnp.abs(lse16[:, :, :n] - lse_d))))
    return row


def small_checks():
    seed = int.from_bytes(os.urandom(4), "little")
    RESULTS["small_seed"] = seed
    RESULTS["small"] = []
    for n, d, topk in [(2000, 128, 4), (4096, 64, 6), (1000, 64, 3), (4096, 128, 5)]:
        row = guarded(f"small {n} {d}", lambda n=n, d=d, topk=topk: small_row(seed, n, d, topk), {"n": n, "d": d})
        print("small", json.dumps(row), flush=True)
        RESULTS["small"].append(row)


def wan_sparse(sp, runs, rounds):
    """Sparse part alone at one sparsity: errors, then timings of every variant in `rounds` rounds."""
    q, k, v, _, _qp, _kp, lut, _alpha, cfg = wan_setup(sp, 29, 1, 12, 32760, 128, 128, 64)
    row = {"sparsity": sp, "topk": cfg.topk}
    scale = _LOG2E / math.sqrt(128)
    keys = jax.jit(qz.quantize_keys_with_mean, static_argnums=1)(k, 64)
    qpass = lambda q, mean: qz.quantize_queries(q, 128, mean, scale)
    queries = qz.QuantisedQueries(*jax.jit(qpass)(q, keys.mean))
    kernel8 = lambda q, k, v, lut, keys, queries: int8_mosaic_kernel(q, k, v, lut, keys, queries)
    fns = {
        "bf16_mosaic": (lambda q, k, v, lut: mf.sparse_attention_mosaic(q, k, v, lut, stages=4), (q, k, v, lut)),
        "int8_mosaic_kernel": (kernel8, (q, k, v, lut, keys, queries)),
        "int8_mosaic_with_q_pass": (mf.sparse_attention_mosaic_int8, (q, k, v, lut, keys)),
        "q_pass_pallas": (qpass, (q, keys.mean)),
        "int8_triton": (triton_int8_sparse, (q, k, v, lut, keys)),
        "bf16_triton": (triton_bf16_sparse, (q, k, v, lut)),
        "cudnn_dense": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), (q, k, v)),
    }
    outs = {}
    for name in ("bf16_mosaic", "int8_mosaic_with_q_pass", "int8_triton", "bf16_triton"):
        fn, args = fns[name]
        outs[name] = guarded(name, lambda fn=fn, args=args: jax.jit(fn)(*args))
    o8k = guarded("kernel8", lambda: jax.jit(kernel8)(q, k, v, lut, keys, queries))
    if outs.get("int8_mosaic_with_q_pass") is not None:
        o8, lse8 = outs["int8_mosaic_with_q_pass"]
        if o8k is not None:
            row["kernel_alone_equals_wrapper"] = rel(o8k[0], o8)
        for ref in ("bf16_mosaic", "int8_triton", "bf16_triton"):
            if outs.get(ref) is not None:
                row[f"rel_o_int8_mosaic_vs_{ref}"] = rel(o8, outs[ref][0])
                row[f"max_abs_lse_int8_mosaic_vs_{ref}"] = float(
                    jnp.max(jnp.abs(lse8[:, :, :32760] - outs[ref][1][:, :, :32760]))
                )
    if outs.get("int8_triton") is not None and outs.get("bf16_triton") is not None:
        row["rel_o_int8_triton_vs_bf16_triton"] = rel(outs["int8_triton"][0], outs["bf16_triton"][0])
    for rnd in range(1, rounds + 1):
        for name, (fn, args) in fns.items():
            row[f"{name}_ms_r{rnd}"] = guarded(f"time {name}", lambda fn=fn, args=args: bench(fn, *args, runs=runs))
    med = lambda name: statistics.median([row[f"{name}_ms_r{r}"] or float("nan") for r in range(1, rounds + 1)])
    row["speedup_int8_kernel_vs_bf16_mosaic"] = med("bf16_mosaic") / med("int8_mosaic_kernel")
    row["speedup_int8_with_q_pass_vs_bf16_mosaic"] = med("bf16_mosaic") / med("int8_mosaic_with_q_pass")
    print("wan_sparse", json.dumps(row), flush=True)
    return row


def tune(sp, runs, rounds):
    """INT8 kernel alone on pre-quantised operands: ring depth (stages), vs bf16 Mosaic, interleaved in `rounds`
    rounds; o_s of each variant vs the default's (stages 4)."""
    q, k, v, _, _, _, lut, _, _ = wan_setup(sp, 29, 1, 12, 32760, 128, 128, 64)
    scale = _LOG2E / math.sqrt(128)
    keys = jax.jit(qz.quantize_keys_with_mean, static_argnums=1)(k, 64)
    queries = qz.QuantisedQueries(*jax.jit(lambda q, m: qz.quantize_queries(q, 128, m, scale))(q, keys.mean))
    args8 = (q, k, v, lut, keys, queries)
    fns = {"bf16_mosaic_s4": (lambda q, k, v, lut: mf.sparse_attention_mosaic(q, k, v, lut, stages=4), (q, k, v, lut))}
    for stages in (3, 4, 6):
        fns[f"int8_s{stages}"] = (lambda *a, st=stages: int8_mosaic_kernel(*a, stages=st), args8)
    row = {"sparsity": sp}
    ref = jax.jit(fns["int8_s4"][0])(*args8)[0]
    for name, (fn, args) in fns.items():
        if name.startswith("int8"):
            row[f"{name}_rel_o_vs_s4"] = guarded(name, lambda fn=fn, args=args: rel(jax.jit(fn)(*args)[0], ref))
    for rnd in range(1, rounds + 1):
        for name, (fn, args) in fns.items():
            row[f"{name}_ms_r{rnd}"] = guarded(f"time {name}", lambda fn=fn, args=args: bench(fn, *args, runs=runs))
    print("tune", json.dumps(row), flush=True)
    return row


def wan_module(sp, runs, rounds):
    """Module forward (sla2_jax, pallas backend): bf16 vs int8 (Mosaic) vs int8 (Triton); errors vs cuDNN."""
    q, k, v, *_ = wan_setup(sp, 31, 1, 12, 32760, 128, 128, 64)
    row = {"sparsity": sp}
    base = sla.SLA2Config(block_q=128, block_k=64, topk_ratio=round(1 - sp, 4), alpha="mass", backend="pallas")
    bf16 = jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=base.replace(quant="none")))
    int8 = lambda forward: jax.jit(
        lambda q, k, v: sla.sla2_attention(
            q, k, v, config=base.replace(quant="int8", kernel=default_config(q.shape[1], q.shape[3], forward=forward))
        )
    )
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    int8_triton = int8("triton")
    int8_mosaic = int8("mosaic")
    o_t = guarded("module int8 triton", lambda: int8_triton(q, k, v))
    o_m = guarded("module int8 mosaic", lambda: int8_mosaic(q, k, v))
    o_b, dense = bf16(q, k, v), cudnn(q, k, v)
    row["bf16_err_vs_dense"] = rel(o_b, dense)
    for name, o in (("int8_mosaic", o_m), ("int8_triton", o_t)):
        if o is not None:
            row[f"{name}_err_vs_dense"] = rel(o, dense)
            row[f"{name}_err_vs_bf16"] = rel(o, o_b)
            row[f"{name}_finite"] = bool(jnp.all(jnp.isfinite(o)))
    if o_m is not None and o_t is not None:
        row["int8_mosaic_vs_int8_triton"] = rel(o_m, o_t)
    fns = {"bf16": bf16, "int8_mosaic": int8_mosaic, "int8_triton": int8_triton, "cudnn": cudnn}
    for rnd in range(1, rounds + 1):
        for name, fn in fns.items():
            row[f"module_{name}_ms_r{rnd}"] = guarded(f"module {name}", lambda fn=fn: bench(fn, q, k, v, runs=runs))
    print("wan_module", json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-module", action="store_true")
    ap.add_argument("--tune-only", action="store_true", help="only the INT8 kernel's ring depth (stages)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    path = os.path.join(args.out, "probe_mosaic_int8.json")

    def save():
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)

    if args.tune_only:
        RESULTS["tune"] = [
            guarded(f"tune {sp}", lambda sp=sp: tune(sp, args.runs, args.rounds)) for sp in args.sparsity
        ]
        save()
        return
    small_checks()
    save()
    RESULTS["wan_sparse"] = []
    for sp in args.sparsity:
        RESULTS["wan_sparse"].append(guarded(f"wan {sp}", lambda sp=sp: wan_sparse(sp, args.runs, args.rounds)))
        save()
    RESULTS["wan_module"] = []
    for sp in [] if args.skip_module else args.sparsity:
        RESULTS["wan_module"].append(guarded(f"module {sp}", lambda sp=sp: wan_module(sp, args.runs, args.rounds)))
        save()
    print("errors", json.dumps(RESULTS["errors"])[:4000], flush=True)


if __name__ == "__main__":
    main()
