"""GPU probe: INT8 Q quantised in the router's front end instead of a separate Q pass.

    python -m experiments.dev.probe_int8_front --out DIR [--sparsity 0.95 0.97] [--runs 20] [--rounds 3]

The library's INT8 forward on Hopper (sla2_jax.sla2_attention, quant="int8", backend "pallas") takes int8 Q, its
scales and the LSE shift from the Q front end (pallas_kernels.front_end.block_means_phi_int8_queries); the "old"
path (``old_module``) is the same computation written out with the Q front end of before (block_means_and_phi for
Q, no int8 Q: the Mosaic path then quantises Q by its own pass, quantize.quantize_queries).
Parts, correctness first:
  * small: fresh seed, ragged-free N (Mosaic needs N % 8 == 0) with partial last blocks, D 64 / 128, bf16 / f16:
    front-end q8 / scales / shift vs quantize_queries (Pallas and XLA); module output and gradients (q, k, v) new vs
    old; both vs the fake-quant reference (xla backend, quant int8) and vs dense float32 attention.
  * wan: wan-1.3b (B=1, H=12, N=32760, D=128, bf16) per sparsity: outputs new vs old, vs the bf16 module, vs cuDNN;
    then module forward times (bf16, int8 new, int8 old, cuDNN; synchronised medians, interleaved rounds;
    pipelined ms per call) and kernel-only times (CUPTI, jax.experimental.mosaic.gpu.profiler.measure: the sum of
    the call's kernels, and its kernels by name); the Q front end alone (4 / 8 warps) vs the bf16 one + the Q pass.
  * --tune (first): the int8 front-end kernels alone at wan-1.3b, 4 and 8 warps (kernel-only), outputs vs the
    4-warp kernel's; the bf16 front ends, the Q pass and the XLA mean of K alone.
Writes DIR/probe_int8_front.json after every part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp

import sla2_jax as sla
from experiments.dev.common import bench, kernel_ms, record_error, rel
from experiments.timing import pipelined_seconds
from pallas_kernels import front_end as fe
from pallas_kernels import quantize
from sla2_jax.feature_maps import PHI_FUNCTIONS, softmax_phi

RESULTS = {"meta": {"jax": jax.__version__}, "small": [], "wan": [], "errors": []}
_F32 = jnp.float32


def old_module(cfg):
    """sla2_attention(q, k, v, config=cfg) (pallas backend, alpha = the router's mass, int8 keys) with the Q front
    end of before: phi(Q) and the means without int8 Q, so the INT8 forward quantises Q in a pass of its own."""
    from sla2_jax.backends import fused
    from sla2_jax.routing import scores_from_block_means

    phi = PHI_FUNCTIONS[cfg.feature_map]

    def run(q, k, v):
        n = q.shape[1]
        k_phi, k_means, keys, k_in = fe.block_means_phi_int8(k, cfg.block_k, phi, pass_through=True)
        q_phi, q_means, q_in = fe.block_means_and_phi(q, cfg.block_q, phi, pass_through=True)
        scores = scores_from_block_means(q_means, k_means, n, cfg.block_k)
        lut, mass = fe.select_blocks(scores, cfg.num_selected(scores.shape[-1]), n, cfg.block_k)
        alpha = jax.lax.stop_gradient(mass)
        return fused(q_in, k_in, v, q_phi, k_phi, lut, alpha, cfg, keys=keys, queries=None).astype(q.dtype)

    return run


def module(cfg):
    return lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg)


def grads(fn, do):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(_F32) * do), argnums=(0, 1, 2)))


def guarded(name, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (a failing part is recorded, the probe goes on)
        row = {"part": name}
        record_error(row, "error", e)
        RESULTS["errors"].append(row)
        return None


def hlo_has(fn, args, text):
    return text in jax.jit(fn).lower(*args).as_text()


def small_row(seed, n, d, dtype, ratio):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, do = (jax.random.normal(kk, (1, n, 2, d), _F32) for kk in keys)
    k = k + 0.5 * jax.random.normal(keys[0], (d,))  # a mean over N: smoothing matters
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    row = {"seed": seed, "n": n, "d": d, "dtype": jnp.dtype(dtype).name, "ratio": ratio}
    # front end vs the Q pass it replaces
    k_mean = jnp.mean(k.astype(_F32), axis=1)
    c = (1.0 / math.sqrt(d)) * math.log2(math.e)
    phi, means, qq = jax.jit(lambda q, m: fe.block_means_phi_int8_queries(q, 128, softmax_phi, m, c))(q, k_mean)
    phi0, means0 = jax.jit(lambda q: fe.block_means_and_phi(q, 128, softmax_phi))(q)
    row["phi_max_abs"] = float(jnp.max(jnp.abs(phi.astype(_F32) - phi0.astype(_F32))))
    row["means_max_abs"] = float(jnp.max(jnp.abs(means - means0)))
    for method in ("pallas", "xla"):
        quantise = lambda q, m, method=method: quantize.quantize_queries(
            q, 128, m, c, method=method, interpret=jax.default_backend() != "gpu"
        )
        r8, rs, rsh = jax.jit(quantise)(q, k_mean)
        row[f"q8_steps_vs_{method}"] = int(jnp.sum(qq.q8 != r8))
        row[f"q8_max_step_vs_{method}"] = int(jnp.max(jnp.abs(qq.q8.astype(jnp.int32) - r8.astype(jnp.int32))))
        row[f"scale_equal_{method}"] = bool(jnp.all(qq.scale == rs))
        row[f"shift_max_abs_vs_{method}"] = float(jnp.max(jnp.abs(qq.shift - rsh)))
    # module: new vs old, outputs and gradients
    cfg = sla.SLA2Config(block_q=128, block_k=64, topk_ratio=ratio, alpha="mass", backend="pallas", quant="int8")
    new, old = module(cfg), old_module(cfg)
    row["new_has_q_pass"] = hlo_has(new, (q, k, v), "sla_int8_quant_q")
    row["old_has_q_pass"] = hlo_has(old, (q, k, v), "sla_int8_quant_q")
    o_new, o_old = jax.jit(new)(q, k, v), jax.jit(old)(q, k, v)
    fake = jax.jit(module(cfg.replace(backend="xla")))(q, k, v)
    dense = jax.jit(lambda q, k, v: sla.dense_attention(q.astype(_F32), k.astype(_F32), v.astype(_F32)))(q, k, v)
    o16 = jax.jit(module(cfg.replace(quant="none")))(q, k, v)
    row["o_new_vs_old"] = rel(o_new, o_old)
    row["o_new_vs_old_max_abs"] = float(jnp.max(jnp.abs(o_new.astype(_F32) - o_old.astype(_F32))))
    row["o_new_vs_fakequant"], row["o_old_vs_fakequant"] = rel(o_new, fake), rel(o_old, fake)
    row["o_new_vs_dense_f32"], row["o_bf16_module_vs_dense_f32"] = rel(o_new, dense), rel(o16, dense)
    row["o_new_vs_bf16_module"] = rel(o_new, o16)
    g_new, g_old = grads(new, do)(q, k, v), grads(old, do)(q, k, v)
    row["grad_new_vs_old"] = [rel(a, b) for a, b in zip(g_new, g_old)]
    row["finite"] = bool(jnp.all(jnp.isfinite(o_new))) and all(bool(jnp.all(jnp.isfinite(g))) for g in g_new)
    print("small", json.dumps(row), flush=True)
    return row


def cupti(fn, args, iterations=10):
    """Kernel-only ms per call (median over iterations of the sum of the call's kernels) and one call's kernels."""
    total, per_iter = kernel_ms(fn, args, iterations)
    kernels = {}
    for name, ms in per_iter[-1]:
        kernels[name[:80]] = round(kernels.get(name[:80], 0.0) + ms, 4)
    return total, kernels


def wan_row(sp, seed, runs, rounds):
    from experiments.inputs import random_qkv

    q, k, v = random_qkv(seed, 1, 32760, 12, 128)
    row = {"sparsity": sp, "seed": seed}
    base = sla.SLA2Config(block_q=128, block_k=64, topk_ratio=round(1 - sp, 4), alpha="mass", backend="pallas")
    fns = {
        "bf16": jax.jit(module(base)),
        "int8_new": jax.jit(module(base.replace(quant="int8"))),
        "int8_old": jax.jit(old_module(base.replace(quant="int8"))),
        "cudnn": jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")),
    }
    outs = {name: jax.block_until_ready(f(q, k, v)) for name, f in fns.items()}
    row["int8_new_vs_old"] = rel(outs["int8_new"], outs["int8_old"])
    row["int8_new_vs_old_max_abs"] = float(
        jnp.max(jnp.abs(outs["int8_new"].astype(_F32) - outs["int8_old"].astype(_F32)))
    )
    for name in ("bf16", "int8_new", "int8_old"):
        row[f"{name}_vs_cudnn"] = rel(outs[name], outs["cudnn"])
    row["int8_new_vs_bf16"] = rel(outs["int8_new"], outs["bf16"])
    row["int8_new_finite"] = bool(jnp.all(jnp.isfinite(outs["int8_new"])))
    print("wan check", json.dumps(row), flush=True)
    del outs
    for rnd in range(1, rounds + 1):  # interleaved rounds: their spread is the noise
        for name, f in fns.items():
            row[f"{name}_ms_r{rnd}"] = guarded(f"time {name}", lambda f=f: bench(f, q, k, v, runs=runs))
        for name, f in fns.items():
            row[f"{name}_pipelined_ms_r{rnd}"] = guarded(
                f"pipe {name}", lambda f=f: 1e3 * pipelined_seconds(f, q, k, v)
            )
    for name, f in fns.items():
        res = guarded(f"cupti {name}", lambda f=f: cupti(f, (q, k, v)))
        if res:
            row[f"{name}_cupti_ms"], row[f"{name}_kernels"] = res
    # the Q front end alone (default launch) vs the bf16 one + the separate Q pass (kernel-only)
    k_mean = jnp.mean(k.astype(_F32), axis=1)
    c = (1.0 / math.sqrt(128)) * math.log2(math.e)
    parts = {"q_front_int8": lambda q, m: fe.block_means_phi_int8_queries(q, 128, softmax_phi, m, c)}
    parts["q_front_bf16"] = lambda q, m: fe.block_means_and_phi(q, 128, softmax_phi)
    parts["q_pass"] = lambda q, m: quantize.quantize_queries(q, 128, m, c)
    for name, f in parts.items():
        res = guarded(f"cupti {name}", lambda f=f: cupti(f, (q, k_mean), iterations=20))
        if res:
            row[f"{name}_cupti_ms"] = res[0]
    print("wan", json.dumps(row), flush=True)
    return row


def tune(seed, workload="wan-1.3b", warps=(4, 8), feature_map="softmax"):
    """The int8 front-end kernels alone at the workload's shape (kernel-only, CUPTI): Q (block 128) and K (block
    64) with each number of warps, outputs vs the first's; the bf16 front ends, the Q pass and the XLA mean of K
    alone. feature_map "softmax" (the kernels also write phi) or "none" (as the library's low-bit forward calls
    them: no phi)."""
    from experiments.benchmark import WORKLOADS
    from experiments.inputs import random_qkv

    b, h, n, d = WORKLOADS[workload][0]
    q, k, _ = random_qkv(seed, b, n, h, d)
    phi = softmax_phi if feature_map == "softmax" else None
    k_mean = jnp.mean(k.astype(_F32), axis=1)
    c = (1.0 / math.sqrt(128)) * math.log2(math.e)
    row = {}
    variants = {
        "q": (q, lambda x, w: fe.block_means_phi_int8_queries(x, 128, phi, k_mean, c, num_warps=w)),
        "k": (k, lambda x, w: fe.block_means_phi_int8(x, 64, phi, num_warps=w)),
    }
    for which, (x, fn) in variants.items():
        ref = jax.jit(lambda x: fn(x, warps[0]))(x)
        for w in warps:
            name = f"{which}_w{w}"
            res = guarded(f"tune {name}", lambda w=w: cupti(lambda x: fn(x, w), (x,), iterations=20))
            if res is None:
                continue
            row[f"{name}_ms"] = res[0]
            out = jax.jit(lambda x, w=w: fn(x, w))(x)
            row[f"{name}_max_abs_per_output"] = [  # phi, means, int8 x, scales, shift (q) / mean (k)
                float(jnp.max(jnp.abs(a.astype(_F32) - b.astype(_F32))))
                for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))
            ]
    row["bf16_q_front_ms"] = cupti(lambda x: fe.block_means_and_phi(x, 128, phi), (q,), iterations=20)[0]
    row["bf16_k_front_ms"] = cupti(lambda x: fe.block_means_and_phi(x, 64, phi), (k,), iterations=20)[0]
    row.update(workload=workload, feature_map=feature_map)
    row["q_pass_ms"] = cupti(lambda x: quantize.quantize_queries(x, 128, k_mean, c), (q,), iterations=20)[0]
    row["k_mean_ms"] = cupti(lambda x: jnp.mean(x.astype(_F32), axis=1), (k,), iterations=20)[0]
    print("tune", json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--tune", action="store_true", help="first the int8 front-end kernels alone (4 / 8 warps)")
    ap.add_argument("--tune-workload", default="wan-1.3b", choices=["wan-1.3b", "wan-14b-720p"])
    ap.add_argument("--tune-warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tune-feature-map", default="softmax", choices=["softmax", "none"],
                    help="softmax: the kernels also write phi; none: as the library's low-bit forward")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS["meta"]["device"] = jax.devices()[0].device_kind
    seed = int(time.time()) % 1_000_000
    RESULTS["meta"]["seed"] = seed

    def save():
        with open(os.path.join(args.out, "probe_int8_front.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)

    if args.tune:
        RESULTS["tune"] = guarded("tune", lambda: tune(seed + 200, args.tune_workload, tuple(args.tune_warps),
                                                       args.tune_feature_map))
        save()
    cases = [(1000, 128, jnp.bfloat16, 0.3), (2040, 64, jnp.bfloat16, 0.2), (1000, 64, jnp.float16, 0.3)]
    for i, (n, d, dtype, ratio) in enumerate([] if args.skip_small else cases):
        RESULTS["small"].append(guarded(f"small {n} {d}", lambda: small_row(seed + i, n, d, dtype, ratio)))
        save()
    for sp in args.sparsity:
        RESULTS["wan"].append(guarded(f"wan {sp}", lambda sp=sp: wan_row(sp, seed + 100, args.runs, args.rounds)))
        save()
    print("errors", json.dumps(RESULTS["errors"])[:4000], flush=True)


if __name__ == "__main__":
    main()
