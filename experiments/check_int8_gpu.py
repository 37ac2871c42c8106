"""Check and time the low-bit (INT8 / INT8+FP8) SLA2 sparse-branch kernel on a GPU, in one process.

  python -m experiments.check_int8_gpu [--out DIR] [--sparsity 0.95 0.97] [--runs 30] [--budget-s 330]

1. Which MMA instructions the INT8 and FP8 kernels compile to (XLA dump of a small jit, PTX grepped).
2. Small shapes (ragged N, D 64/128): low-bit o_s vs the fake-quant reference of sla2_jax (xla backend), fused
   output vs combine of the low-bit branches, gradients vs the bf16 kernel's.
3. wan-1.3b (B=1, H=12, N=32760, D=128, bf16, random normal q, k, v), LUT from sla2_jax.route, alpha = the
   router's captured mass: relative error (norm-wise) of the bf16 / int8 / int8_fp8 fused outputs vs dense
   attention (sla2_jax.dense_attention, f32) and vs the bf16 kernel; a naive per-tensor INT8 (no smoothing)
   fake quantisation through the bf16 kernel for comparison; median forward times (>= 20 runs after warm-up,
   block_until_ready) of the bf16 fused kernel, the low-bit fused kernels (several launch configs), the K
   pre-pass alone and cuDNN, all in this one run; forward+backward of bf16 vs int8 (QAT cost).
Writes DIR/check_int8_gpu.json and prints a table last.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys
import time
import traceback

_DUMP = "/tmp/int8_xla_dump"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP} --xla_dump_hlo_module_re=.*ptxcheck.*"
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sla2_jax as sla  # noqa: E402
from experiments.timing import time_samples  # noqa: E402
from pallas_kernels import int8_attention as ia  # noqa: E402
from pallas_kernels import sparse_linear as sl  # noqa: E402

R: dict = {"meta": {}, "ptx": {}, "small": [], "wan": [], "errors": []}
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def bench(fn, *args, runs=30, warmup=3):
    ts = [1e3 * t for t in time_samples(jax.jit(fn), *args, warmup=warmup + 1, iters=runs)]
    return statistics.median(ts), min(ts), max(ts)


def phi(x):
    return sla.feature_map(x, "softmax").astype(x.dtype)


def guarded(name, fn):
    try:
        return fn()
    except Exception as e:  # keep going: one failure must not hide the rest
        msg = f"{name}: {type(e).__name__}: {str(e)[:1500]}"
        log("FAILED", msg)
        traceback.print_exc()
        R["errors"].append(msg)
        return None


def ptx_check():
    b, n, h, d = 1, 256, 1, 128
    key = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(kk, (b, n, h, d)).astype(jnp.bfloat16) for kk in key)
    lut = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (b, h, 2, 2))

    def ptxcheck_lowbit(q, k, v):
        o8 = ia.sparse_linear_attention_lowbit(q, k, v, phi(q), phi(k), lut, quant="int8")[0]
        of = ia.sparse_linear_attention_lowbit(q, k, v, phi(q), phi(k), lut, quant="int8_fp8")[0]
        return o8, of

    jax.block_until_ready(jax.jit(ptxcheck_lowbit)(q, k, v))
    allf = glob.glob(os.path.join(_DUMP, "*"))
    log("dump files:", [os.path.basename(f) for f in allf][:40])
    files = [f for f in allf if os.path.isfile(f) and not f.endswith((".pb", ".pbtxt"))]
    text = "".join(open(f).read() for f in files)
    instr = sorted(set(re.findall(r"((?:wgmma\.mma_async|mma\.sync)[\w.]*)", text)))
    R["ptx"] = {
        "ptx_files": [os.path.basename(f) for f in files][:10],
        "mma_instructions": instr,
        "has_int8_mma": any(".s8" in x for x in instr),
        "has_fp8_mma": any("e4m3" in x for x in instr),
    }
    log("PTX files", len(files), "mma instructions:", instr)


def small_checks():
    for n, h, d, bq, bk, ratio in [(1000, 2, 128, 128, 64, 0.25), (777, 2, 64, 64, 32, 0.3)]:
        key = jax.random.split(jax.random.PRNGKey(n), 5)
        q = jax.random.normal(key[0], (1, n, h, d)).astype(jnp.bfloat16)
        k = (jax.random.normal(key[1], (1, n, h, d)) + 0.5 * jax.random.normal(key[3], (d,))).astype(jnp.bfloat16)
        v = jax.random.normal(key[2], (1, n, h, d)).astype(jnp.bfloat16)
        lut, _, mass = sla.route(q, k, sla.SLA2Config(block_q=bq, block_k=bk, topk_ratio=ratio))
        kw = dict(block_q=bq, block_k=bk)
        row = {"n": n, "h": h, "d": d, "block_q": bq, "block_k": bk}
        bs, bl = sl.sparse_linear_attention(q, k, v, phi(q), phi(k), lut, **kw)
        for quant in ia.QUANT_MODES:
            o_s, o_l = jax.jit(lambda *a: ia.sparse_linear_attention_lowbit(*a, quant=quant, **kw))(
                q, k, v, phi(q), phi(k), lut
            )
            r_s, r_l = sla.sparse_linear_branches(q, k, v, lut, quant=quant, backend="xla", **kw)
            row[f"{quant}_os_vs_fakequant"] = rel(o_s, r_s)
            row[f"{quant}_ol_vs_xla"] = rel(o_l, r_l)
            row[f"{quant}_os_vs_bf16"] = rel(o_s, bs)
            row[f"fakequant_{quant}_os_vs_bf16"] = rel(r_s, bs)
            o = ia.sla2_fused_attention_lowbit(q, k, v, phi(q), phi(k), lut, mass, quant=quant, **kw)
            row[f"{quant}_fused_vs_combine"] = rel(o, sla.combine(o_s, o_l, mass, block_q=bq))
        do = jax.random.normal(key[4], q.shape, jnp.float32)

        def grads(f):
            loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32) * do)
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(q, k, v, phi(q), phi(k), mass)

        g_ref = grads(lambda q, k, v, qp, kp, a: sl.sla2_fused_attention(q, k, v, qp, kp, lut, a, **kw))
        g_low = grads(lambda q, k, v, qp, kp, a: ia.sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, a, **kw))
        row["int8_grad_vs_bf16"] = {
            nm: rel(a, b) for nm, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g_low, g_ref)
        }
        R["small"].append(row)
        log("small", json.dumps(row))


def per_tensor_fake_quant(x):
    s = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))), 1e-12) / 127.0
    return (jnp.clip(jnp.round(x.astype(jnp.float32) / s), -127, 127) * s).astype(x.dtype)


def wan(sparsities, runs, budget_s):
    if not sparsities:
        return
    b, n, h, d = 1, 32760, 12, 128
    key = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(jnp.bfloat16) for kk in key[:3])
    do = jax.random.normal(key[3], (b, n, h, d), jnp.float32).astype(jnp.bfloat16)
    qp, kp = jax.jit(phi)(q), jax.jit(phi)(k)
    dense = jax.block_until_ready(jax.jit(sla.dense_attention)(q, k, v))
    log("dense reference done")
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    t_cudnn = guarded("cudnn", lambda: bench(cudnn, q, k, v, runs=runs))
    err_cudnn = guarded("cudnn err", lambda: rel(jax.jit(cudnn)(q, k, v), dense))
    log("cudnn", t_cudnn, err_cudnn)
    for sp in sparsities:
        row = {"sparsity": sp, "cudnn_fwd_ms": t_cudnn, "cudnn_err_vs_dense": err_cudnn}
        lut, _, mass = jax.jit(lambda q, k: sla.route(q, k, sla.SLA2Config(topk_ratio=round(1 - sp, 4))))(q, k)
        row["topk"] = int(lut.shape[-1])
        alpha = mass
        f_bf16 = lambda q, k, v, qp, kp, a: sl.sla2_fused_attention(q, k, v, qp, kp, lut, a)
        o_bf16 = jax.jit(f_bf16)(q, k, v, qp, kp, alpha)
        row["bf16_err_vs_dense"] = rel(o_bf16, dense)
        row["bf16_fwd_ms"] = guarded("bf16 time", lambda: bench(f_bf16, q, k, v, qp, kp, alpha, runs=runs))
        log(sp, "bf16", row["bf16_fwd_ms"], row["bf16_err_vs_dense"])
        # naive per-tensor INT8 (no smoothing) through the bf16 kernel: the baseline the block scales must beat.
        f_naive = lambda q, k, v, qp, kp, a: sl.sla2_fused_attention(
            per_tensor_fake_quant(q), per_tensor_fake_quant(k), v, qp, kp, lut, a
        )
        o_naive = jax.jit(f_naive)(q, k, v, qp, kp, alpha)
        row["naive_per_tensor_err_vs_bf16"] = rel(o_naive, o_bf16)
        row["naive_per_tensor_err_vs_dense"] = rel(o_naive, dense)
        for quant in ia.QUANT_MODES:
            f_low = lambda q, k, v, qp, kp, a, quant=quant: ia.sla2_fused_attention_lowbit(
                q, k, v, qp, kp, lut, a, quant=quant
            )
            o_low = guarded(f"{quant} fwd", lambda: jax.jit(f_low)(q, k, v, qp, kp, alpha))
            if o_low is None:
                continue
            row[f"{quant}_err_vs_dense"] = rel(o_low, dense)
            row[f"{quant}_err_vs_bf16"] = rel(o_low, o_bf16)
            row[f"{quant}_fwd_ms"] = guarded(f"{quant} time", lambda: bench(f_low, q, k, v, qp, kp, alpha, runs=runs))
            log(sp, quant, row[f"{quant}_fwd_ms"], row[f"{quant}_err_vs_dense"], row[f"{quant}_err_vs_bf16"])
        # launch-config variants of the int8 kernel (fresh jit each)
        row["int8_variants_ms"] = {}
        variants = [
            (qp_, pp_, nw, ns)
            for (qp_, pp_) in [(True, "pallas"), (False, "pallas"), (False, "xla")]
            for (nw, ns) in [(8, 3), (8, 4)]
        ]
        for qpre, prep, nw, ns in variants:
            if time.time() - T0 > budget_s:
                break
            with ia.override_launch(nw, ns), ia.options(q_prepass=qpre, prepass=prep):
                f_var = lambda q, k, v, qp, kp, a: ia.sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, a, quant="int8")
                t = guarded(f"int8 {qpre} {prep} w{nw} s{ns}", lambda: bench(f_var, q, k, v, qp, kp, alpha, runs=runs))
            name = f"{'qpre' if qpre else 'qkernel'}_{prep}_w{nw}_s{ns}"
            row["int8_variants_ms"][name] = t
            log(sp, "int8 variant", name, t)
        cfg_ = sl._validate(q, k, v, qp, kp, lut, 128, 64, "complement", None, 1e-6, None)
        with ia.options(prepass="pallas", q_prepass=True):
            row["prepass_pallas_qk_ms"] = guarded(
                "prepass pallas", lambda: bench(lambda q, k: ia._prequantize(q, k, cfg_), q, k, runs=runs)
            )
        row["k_prepass_xla_ms"] = guarded("prepass", lambda: bench(lambda k: ia.quantize_keys(k, 64), k, runs=runs))
        if time.time() - T0 < budget_s:

            def fb(f):
                return lambda q, k, v, qp, kp, a: jax.grad(
                    lambda *x: jnp.sum(f(*x).astype(jnp.float32) * do.astype(jnp.float32)), argnums=(0, 1, 2, 3, 4, 5)
                )(q, k, v, qp, kp, a)

            f_low8 = lambda q, k, v, qp, kp, a: ia.sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, a)
            row["bf16_fwd_bwd_ms"] = guarded("bf16 fb", lambda: bench(fb(f_bf16), q, k, v, qp, kp, alpha, runs=runs))
            row["int8_fwd_bwd_ms"] = guarded("int8 fb", lambda: bench(fb(f_low8), q, k, v, qp, kp, alpha, runs=runs))
            g8 = jax.jit(fb(f_low8))(q, k, v, qp, kp, alpha)
            g16 = jax.jit(fb(f_bf16))(q, k, v, qp, kp, alpha)
            row["int8_grad_vs_bf16"] = {
                nm: rel(a, bb) for nm, a, bb in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g8, g16)
            }
        R["wan"].append(row)
        log("wan row", json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    dev = jax.devices()[0]
    R["meta"] = {"device": dev.device_kind, "jax": jax.__version__, "python": sys.version.split()[0], "runs": args.runs}
    log("device", dev.device_kind, "jax", jax.__version__)
    guarded("ptx", ptx_check)
    if not args.skip_small:
        guarded("small", small_checks)
    guarded("wan", lambda: wan(args.sparsity, args.runs, args.budget_s))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_int8_gpu.json"), "w") as f:
        json.dump(R, f, indent=1)

    print(
        "\n=== low-bit SLA2 kernel, wan-1.3b (B=1 H=12 N=32760 D=128 bf16),",
        R["meta"]["device"],
        "jax",
        R["meta"]["jax"],
        "===",
    )
    print("PTX mma:", R["ptx"].get("mma_instructions"))
    hdr = [
        "sparsity",
        "cudnn ms",
        "bf16 ms",
        "int8 ms",
        "int8_fp8 ms",
        "int8 speedup vs bf16",
        "bf16 err/dense",
        "int8 err/dense",
        "int8_fp8 err/dense",
        "int8 err/bf16",
        "naive err/bf16",
        "prepass ms pallas(q+k)/xla(k)",
        "best int8 variant",
    ]
    print(" | ".join(hdr))
    for r in R["wan"]:
        med = lambda x: x[0] if isinstance(x, (list, tuple)) else float("nan")
        variants = {k_: med(v_) for k_, v_ in r.get("int8_variants_ms", {}).items() if v_}
        best = min(variants.items(), key=lambda kv: kv[1]) if variants else ("-", float("nan"))
        t8 = min(med(r.get("int8_fwd_ms")), best[1])
        print(
            " | ".join(
                str(x)
                for x in [
                    r["sparsity"],
                    f"{med(r['cudnn_fwd_ms']):.3f}",
                    f"{med(r.get('bf16_fwd_ms')):.3f}",
                    f"{med(r.get('int8_fwd_ms')):.3f}",
                    f"{med(r.get('int8_fp8_fwd_ms')):.3f}",
                    f"{med(r.get('bf16_fwd_ms')) / t8:.2f}x",
                    f"{r.get('bf16_err_vs_dense', float('nan')):.4f}",
                    f"{r.get('int8_err_vs_dense', float('nan')):.4f}",
                    f"{r.get('int8_fp8_err_vs_dense', float('nan')):.4f}",
                    f"{r.get('int8_err_vs_bf16', float('nan')):.4f}",
                    f"{r.get('naive_per_tensor_err_vs_bf16', float('nan')):.4f}",
                    f"{med(r.get('prepass_pallas_qk_ms')):.3f}/{med(r.get('k_prepass_xla_ms')):.3f}",
                    f"{best[0]} {best[1]:.3f}",
                ]
            )
        )
    for r in R["wan"]:
        print(
            "fwd+bwd ms bf16 / int8:",
            r.get("bf16_fwd_bwd_ms"),
            r.get("int8_fwd_bwd_ms"),
            "grad rel vs bf16:",
            r.get("int8_grad_vs_bf16"),
        )
    print("errors:", R["errors"])


if __name__ == "__main__":
    main()
