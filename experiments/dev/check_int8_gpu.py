"""Check and time the low-bit (INT8 / INT8+FP8) SLA2 sparse-branch kernel on a GPU, in one process.

  python -m experiments.dev.check_int8_gpu [--out DIR] [--sparsity 0.95 0.97] [--runs 30] [--budget-s 190]

1. What the GPU runs (--sass-only runs just this; it needs no GPU): jax 0.11 hands Pallas-Triton kernels to XLA
   as Triton IR (custom call "__gpu$xla.gpu.triton", bytecode in its backend config), so the PTX is never seen
   in Python. The forward kernels of the wan-1.3b calls are lowered for CUDA, their TTIR is extracted and
   compiled for sm_90a by the standalone ``triton`` package (a proxy for XLA's Triton: same front end, its own
   version), then ``ptxas -v`` and ``cuobjdump -sass`` (Triton's bundled tools): MMA instructions in PTX,
   SASS opcode counts (HGMMA / IGMMA / QGMMA / HMMA / I2FP / MUFU.EX2 / LDL / STL), registers and spills.
   Written to DIR/sass_summary.txt and DIR/ptx_sass.tar.gz. (The Triton kernels: the H100 launch table with
   KernelConfig forward "triton", experiments.dev.sass_report.hopper_config.)
2. Small shapes (ragged N, D 64/128): low-bit o_s vs the fake-quant reference of sla2_jax (xla backend) for the
   default and the variants (VARIANTS: quant and KernelConfig changes), fused output vs combine of the low-bit
   branches; the pre-pass's int8 tiles vs the XLA quantisation.
3. wan-1.3b (B=1, H=12, N=32760, D=128, bf16, random normal q, k, v), LUT from sla2_jax.route, alpha = the
   router's captured mass: relative error (norm-wise) of the bf16 / low-bit fused outputs vs dense attention
   (sla2_jax.dense_attention) and vs the bf16 kernel; median forward times (experiments.timing, synchronised,
   after warm-up) of cuDNN, the bf16 fused kernel, the low-bit variants (whole forward, pre-pass alone, forward
   with pre-quantised keys), all in this one run.
4. --module (or --module-only, which skips 1-3): the library's low-bit path, ``sla2_attention(quant="int8")`` on
   the pallas backend, where the front end quantises K~ in its read of K (front_end.block_means_phi_int8) and the
   forward kernel quantises Q (no pre-pass). Small shapes: int8 keys bit-equal to the XLA quantisation, LUT vs the
   XLA router, output vs the fake-quant xla module, the pre-pass path and bf16. wan-1.3b: module forward bf16 /
   int8 / int8 with the pre-pass (route_with_features + the kernel without keys: the path before), front end with
   and without the int8 keys, the XLA mean of K alone, kernels alone, cuDNN; two rounds of timings.
Writes DIR/check_int8_gpu.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

import pallas_kernels as pk
import sla2_jax as sla
from experiments.dev import sass_report as sass
from experiments.dev.common import kernel_call, phi_array_low_bit_route
from experiments.timing import time_samples
from pallas_kernels import attention, quantize
from sla2_jax.feature_maps import softmax_phi

R: dict = {"meta": {}, "ptx": {}, "small": [], "wan": [], "module_small": [], "module": [], "errors": []}
T0 = time.time()

# Variants of the low-bit forward: name -> (quant, KernelConfig changes of heuristic_config for the call). On Hopper
# the heuristic takes the Mosaic kernels; "triton" variants run the Triton low-bit kernel (launch "lowbit").
VARIANTS = {
    "int8": ("int8", {}),
    "int8_fp8": ("int8_fp8", {}),
    "int8_triton": ("int8", {"forward": "triton", "backward": "triton"}),
    "int8_fp8_triton": ("int8_fp8", {"mosaic_fp8": False}),
    "int8_triton_w8s3": ("int8", {"forward": "triton", "backward": "triton", "launch": {"lowbit": (8, 3, 64)}}),
}
CORE = ("int8", "int8_fp8")  # timed at every sparsity, with pre-pass and kernel separately
SMALL = {128: ("int8", "int8_fp8", "int8_triton"), 64: ("int8", "int8_fp8")}
PREPASSES = {"qk": True, "k_only": False}  # quantize.prequantize timed alone: Q and K~, or K~ alone (queries=)


def variant_config(name, n, d, dtype=jnp.bfloat16, block_q=128, block_k=64):
    """(quant, KernelConfig) of a VARIANTS entry for a call of this shape."""
    quant, changes = VARIANTS[name]
    changes = dict(changes)
    config = pk.heuristic_config(n, d, dtype, block_q, block_k)
    if pk.mosaic_supports(n, d, dtype, block_q, block_k) is not None:
        changes.update(forward="triton", backward="triton")
    if "launch" in changes:
        table = dict(config.launch)
        table.update(changes.pop("launch"))
        changes["launch"] = tuple(table.items())
    return quant, config.replace(**changes)


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


def prequantize(q, k, cfg, queries=True):
    """The low-bit forward's quantisation pre-pass (quantize.prequantize) for the call cfg."""
    return quantize.prequantize(q, k, cfg.block_q, cfg.block_k, cfg.interpret, queries=queries)


def guarded(name, fn):
    try:
        return fn()
    except Exception as e:  # keep going: one failure must not hide the rest
        msg = f"{name}: {type(e).__name__}: {str(e)[:1500]}"
        log("FAILED", msg)
        traceback.print_exc()
        R["errors"].append(msg)
        return None


# ----------------------------------------------------------------------------------------------------------
# 1. PTX / SASS
# ----------------------------------------------------------------------------------------------------------
def _wan_ttir(n=32760, heads=12, topk=25):
    """{name: (ttir text, num_warps, num_stages)} of the Triton forward kernels of the wan-1.3b calls (the H100
    launch table, also on a CPU machine), lowered for CUDA."""
    config = sass.hopper_config(n, 128)
    sds = jax.ShapeDtypeStruct
    x = sds((1, n, heads, 128), jnp.bfloat16)
    lut, alpha = sds((1, heads, -(-n // 128), topk), jnp.int32), sds((1, heads, -(-n // 128)), jnp.float32)
    kw = {"interpret": False, "config": config}
    calls = {
        "bf16": lambda q, lut, a: pk.sla2_fused_attention(q, q, q, q, q, lut, a, **kw),
        "int8": lambda q, lut, a: pk.sla2_fused_attention_lowbit(q, q, q, q, q, lut, a, **kw),
        "int8_fp8": lambda q, lut, a: pk.sla2_fused_attention_lowbit(q, q, q, q, q, lut, a, quant="int8_fp8", **kw),
    }
    found = {}
    for label, f in calls.items():
        found.update(sass.kernel_ttir(f, (x, lut, alpha), label, match=("fwd", "quant")))
    return found


def sass_report(out_dir):
    """Compile the extracted TTIR with the standalone triton package for sm_90a; PTX MMA, registers, SASS ops."""
    import triton

    rows = sass.compile_report(_wan_ttir(), out_dir, work="/tmp/int8_sass")
    R["ptx"] = {"triton": triton.__version__, "kernels": rows}


# ----------------------------------------------------------------------------------------------------------
# 2. Small shapes
# ----------------------------------------------------------------------------------------------------------
def small_checks():
    for n, h, d, bq, bk, ratio in [(1000, 2, 128, 128, 64, 0.25), (777, 2, 64, 64, 32, 0.3)]:
        key = jax.random.split(jax.random.PRNGKey(n + int(time.time()) % 1000), 5)
        q = jax.random.normal(key[0], (1, n, h, d)).astype(jnp.bfloat16)
        k = (jax.random.normal(key[1], (1, n, h, d)) + 0.5 * jax.random.normal(key[3], (d,))).astype(jnp.bfloat16)
        v = jax.random.normal(key[2], (1, n, h, d)).astype(jnp.bfloat16)
        lut, _, mass = sla.route(q, k, sla.SLA2Config(block_q=bq, block_k=bk, topk_ratio=ratio))
        kw = {"block_q": bq, "block_k": bk}
        row = {"n": n, "h": h, "d": d, "block_q": bq, "block_k": bk}
        cfg = kernel_call(q, lut, block_q=bq, block_k=bk)
        qz = jax.jit(lambda q, k, cfg=cfg: prequantize(q, k, cfg))(q, k)  # the pre-pass of a call without keys
        for name_, x8, ref in (("k8", qz.k8, sla.smooth_keys(k)), ("q8", qz.q8, q)):
            r8, _ = sla.quantize_int8_blocks(ref, bk if name_ == "k8" else bq)
            diff = jnp.abs(x8.astype(jnp.int32) - r8.astype(jnp.int32))
            row[f"prepass_{name_}_max_diff"] = int(jnp.max(diff))
            row[f"prepass_{name_}_frac_diff"] = float(jnp.mean(diff > 0))
        bs, _ = pk.sparse_linear_attention(q, k, v, phi(q), phi(k), lut, **kw)
        refs = {qm: sla.sparse_linear_branches(q, k, v, lut, quant=qm, backend="xla", **kw) for qm in pk.QUANT_MODES}
        for name in SMALL[d]:
            row[name] = guarded(
                f"small {name}", lambda name=name: small_variant(name, q, k, v, lut, mass, kw, refs, bs)
            )
        row["fakequant_int8_os_vs_bf16"] = rel(refs["int8"][0], bs)
        R["small"].append(row)
        log("small", json.dumps(row))


def small_variant(name, q, k, v, lut, mass, kw, refs, bs):
    """Errors of one low-bit variant on a small shape (vs its fake-quant reference, the bf16 kernel, combine)."""
    quant, config = variant_config(name, q.shape[1], q.shape[3], q.dtype, kw["block_q"], kw["block_k"])
    kw = dict(kw, config=config)
    o_s, o_l = jax.jit(lambda *a: pk.sparse_linear_attention_lowbit(*a, quant=quant, **kw))(
        q, k, v, phi(q), phi(k), lut
    )
    o = jax.jit(lambda *a: pk.sla2_fused_attention_lowbit(*a, quant=quant, **kw))(
        q, k, v, phi(q), phi(k), lut, mass
    )
    r_s, r_l = refs[quant]
    return {
        "os_vs_fakequant": rel(o_s, r_s),
        "os_vs_bf16": rel(o_s, bs),
        "ol_vs_xla": rel(o_l, r_l),
        "fused_vs_combine": rel(o, sla.combine(o_s, o_l, mass, block_q=kw["block_q"])),
        "finite": bool(jnp.all(jnp.isfinite(o))),
    }


# ----------------------------------------------------------------------------------------------------------
# 3. wan-1.3b
# ----------------------------------------------------------------------------------------------------------
def time_variant(name, sp, lut, alpha, cfg, inputs, refs, runs, split):
    """Errors and median times of one low-bit variant; split: also the pre-pass alone and the forward with the keys
    quantised before (the library's path: no pre-pass; Q quantised by the kernel or its own Q pass)."""
    q, k, v, qp, kp = inputs
    dense, o_bf16 = refs
    quant, config = variant_config(name, q.shape[1], q.shape[3], q.dtype)
    cfg = cfg._replace(config=config)
    vr = {"config": {f: getattr(config, f) for f in ("forward", "backward", "mosaic_fp8")}, "launch": config.launch}
    f_low = lambda q, k, v, qp, kp, a: pk.sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, a, quant=quant,
                                                                      config=config)
    o_low = jax.jit(f_low)(q, k, v, qp, kp, alpha)
    vr["err_vs_dense"] = rel(o_low, dense)
    vr["err_vs_bf16"] = rel(o_low, o_bf16)
    vr["finite"] = bool(jnp.all(jnp.isfinite(o_low)))
    vr["fwd_ms"] = bench(f_low, q, k, v, qp, kp, alpha, runs=runs)
    if split:
        pre = lambda q, k: prequantize(q, k, cfg)
        vr["prepass_ms"] = bench(pre, q, k, runs=runs)
        qz = jax.jit(lambda q, k: prequantize(q, k, cfg, queries=False))(q, k)
        keys = quantize.QuantisedKeys(qz.k8, qz.k_scale, qz.k_mean)
        kern = lambda q, k, v, qp, kp, a, keys: attention.forward_lowbit(
            q, k, v, qp, kp, lut, a, keys, cfg, quant, fused=True, residuals=False
        )["o"]
        vr["kernel_ms"] = bench(kern, q, k, v, qp, kp, alpha, keys, runs=runs)
    log(sp, name, json.dumps(vr))
    return vr


def wan(sparsities, runs, budget_s, n, heads):
    b, d = 1, 128
    key = jax.random.split(jax.random.PRNGKey(int(time.time()) % 10000), 4)
    q, k, v = (jax.random.normal(kk, (b, n, heads, d), jnp.float32).astype(jnp.bfloat16) for kk in key[:3])
    qp, kp = jax.jit(phi)(q), jax.jit(phi)(k)
    dense = jax.block_until_ready(jax.jit(sla.dense_attention)(q, k, v))
    log("dense reference done")
    R["meta"]["empty_jit_call_ms"] = bench(lambda x: x + 1.0, jnp.ones((8,), jnp.float32), runs=runs)
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    t_cudnn = guarded("cudnn", lambda: bench(cudnn, q, k, v, runs=runs))
    err_cudnn = guarded("cudnn err", lambda: rel(jax.jit(cudnn)(q, k, v), dense))
    log("cudnn", t_cudnn, err_cudnn)
    rows = []
    for sp in sparsities:  # core variants at every sparsity
        row = {"sparsity": sp, "cudnn_fwd_ms": t_cudnn, "cudnn_err_vs_dense": err_cudnn, "variants": {}}
        lut, _, alpha = jax.jit(lambda q, k: sla.route(q, k, sla.SLA2Config(topk_ratio=round(1 - sp, 4))))(q, k)
        row["topk"] = int(lut.shape[-1])
        cfg = kernel_call(q, lut)
        f_bf16 = lambda q, k, v, qp, kp, a: pk.sla2_fused_attention(q, k, v, qp, kp, lut, a)
        o_bf16 = jax.jit(f_bf16)(q, k, v, qp, kp, alpha)
        row["bf16_err_vs_dense"] = rel(o_bf16, dense)
        row["bf16_fwd_ms"] = guarded("bf16 time", lambda: bench(f_bf16, q, k, v, qp, kp, alpha, runs=runs))
        log(sp, "bf16", row["bf16_fwd_ms"], row["bf16_err_vs_dense"])
        ctx = (lut, alpha, cfg, (q, k, v, qp, kp), (dense, o_bf16))
        for name in CORE:
            if time.time() - T0 < budget_s:
                row["variants"][name] = guarded(name, lambda: time_variant(name, sp, *ctx, runs, True))
        rows.append((row, ctx))
        R["wan"].append(row)
    row, ctx = rows[0]  # the other variants at the first sparsity, while the budget lasts
    for name in VARIANTS:
        if name not in CORE and time.time() - T0 < budget_s:
            row["variants"][name] = guarded(name, lambda: time_variant(name, row["sparsity"], *ctx, runs, False))
    for prep, queries in PREPASSES.items():
        if time.time() - T0 < budget_s:
            pre = lambda q, k, queries=queries: prequantize(q, k, ctx[2], queries)
            row[f"prepass_{prep}_ms"] = guarded(prep, lambda pre=pre: bench(pre, q, k, runs=runs))
            log("prepass", prep, row.get(f"prepass_{prep}_ms"))


# ----------------------------------------------------------------------------------------------------------
# 4. The library's low-bit module path (front-end int8 keys, Q quantised in the kernel)
# ----------------------------------------------------------------------------------------------------------
def _module_fns(sp, block_q=128, block_k=64, ratio=None):
    """Jitted module forwards {name: f(q, k, v)}: bf16, int8 (front-end keys), int8 with the pre-pass (before)."""
    from sla2_jax.functional import route_with_features

    base = sla.SLA2Config(block_q=block_q, block_k=block_k, topk_ratio=ratio or round(1 - sp, 4), alpha="mass")
    cfg = {qm: base.replace(backend="pallas", quant=qm) for qm in ("none", "int8")}
    kw = {"block_q": block_q, "block_k": block_k}

    def prepass_path(q, k, v):
        lut, mass, qp, kp = route_with_features(q, k, cfg["int8"], feature_map="softmax")
        return pk.sla2_fused_attention_lowbit(q, k, v, qp, kp, lut, mass, quant="int8", **kw).astype(q.dtype)

    return base, {
        "bf16": jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg["none"])),
        "int8": jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg["int8"])),
        "int8_prepass": jax.jit(prepass_path),
    }


def _bit_diff(a, b):
    d = jnp.abs(a.astype(jnp.int32) - b.astype(jnp.int32))
    return {"max": int(jnp.max(d)), "frac": float(jnp.mean(d > 0))}


def module_small():
    """Small ragged shapes: int8 keys vs XLA, LUT vs the XLA router, module outputs vs fake quant / before / bf16."""
    for n, h, d, bq, bk, ratio in [(1000, 2, 128, 128, 64, 0.25), (777, 2, 64, 64, 32, 0.3)]:
        key = jax.random.split(jax.random.PRNGKey(n + int(time.time()) % 1000), 4)
        q, v = (jax.random.normal(kk, (1, n, h, d)).astype(jnp.bfloat16) for kk in key[:2])
        k = (jax.random.normal(key[2], (1, n, h, d)) + 0.5 * jax.random.normal(key[3], (d,))).astype(jnp.bfloat16)
        row = {"n": n, "h": h, "d": d, "block_q": bq, "block_k": bk}
        row.update(module_small_row(q, k, v, bq, bk, ratio))
        R["module_small"].append(row)
        log("module small", json.dumps(row))


def module_small_row(q, k, v, bq, bk, ratio):
    """One small shape of module_small."""
    from pallas_kernels.front_end import block_means_phi_int8
    from sla2_jax.functional import route_with_features

    base, fns = _module_fns(None, bq, bk, ratio)
    row = {}
    _, _, keys = jax.jit(lambda k: block_means_phi_int8(k, bk, softmax_phi))(k)
    r8, rs = jax.jit(lambda k: sla.quantize_int8_blocks(sla.smooth_keys(k), bk))(k)
    row["keys_k8_vs_xla"] = _bit_diff(keys.k8, r8)
    row["keys_scale_equal"] = bool(jnp.all(keys.scale == rs))
    lut8 = jax.jit(lambda q, k: phi_array_low_bit_route(q, k, base, None))(q, k)[0]
    lut16 = jax.jit(lambda q, k: route_with_features(q, k, base))(q, k)[0]
    lut_xla = jax.jit(lambda q, k: sla.route(q, k, base.replace(backend="xla"))[0])(q, k)
    row["lut_vs_xla_frac_diff"] = float(jnp.mean(lut8 != lut_xla))
    row["lut_vs_bf16_front_frac_diff"] = float(jnp.mean(lut8 != lut16))
    outs = {name: f(q, k, v) for name, f in fns.items()}
    fake = jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=base.replace(backend="xla", quant="int8")))
    row["int8_vs_fakequant"] = rel(outs["int8"], fake(q, k, v))
    row["int8_vs_prepass_path"] = rel(outs["int8"], outs["int8_prepass"])
    row["int8_vs_prepass_max_abs"] = float(jnp.max(jnp.abs(outs["int8"].astype(_F) - outs["int8_prepass"].astype(_F))))
    row["int8_vs_bf16"] = rel(outs["int8"], outs["bf16"])
    row["finite"] = bool(jnp.all(jnp.isfinite(outs["int8"])))
    return row


_F = jnp.float32


def module_wan(sparsities, runs, n, heads, rounds):
    """wan-1.3b module forward: bf16 vs int8 (front-end keys) vs int8 with the pre-pass, cuDNN; parts alone."""
    key = jax.random.split(jax.random.PRNGKey(int(time.time()) % 10000 + 7), 3)
    q, k, v = (jax.random.normal(kk, (1, n, heads, 128), jnp.float32).astype(jnp.bfloat16) for kk in key)
    dense = jax.block_until_ready(jax.jit(sla.dense_attention)(q, k, v))
    R["meta"]["empty_jit_call_ms"] = bench(lambda x: x + 1.0, jnp.ones((8,), jnp.float32), runs=runs)
    for sp in sparsities:
        R["module"].append(guarded(f"module {sp}", lambda sp=sp: module_row(sp, q, k, v, dense, runs, rounds)))


def module_row(sp, q, k, v, dense, runs, rounds):
    """One sparsity of module_wan."""
    from pallas_kernels.front_end import block_means_and_phi, block_means_phi_int8
    from sla2_jax.functional import route_with_features

    base, fns = _module_fns(sp)
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    row = {"sparsity": sp, "cudnn_fwd_ms": guarded("cudnn", lambda: bench(cudnn, q, k, v, runs=runs))}
    outs = {name: f(q, k, v) for name, f in fns.items()}
    for name, o in outs.items():
        row[f"{name}_err_vs_dense"] = rel(o, dense)
    row["int8_vs_bf16"] = rel(outs["int8"], outs["bf16"])
    row["int8_vs_prepass_path"] = rel(outs["int8"], outs["int8_prepass"])
    row["int8_finite"] = bool(jnp.all(jnp.isfinite(outs["int8"])))
    for rnd in range(1, rounds + 1):  # several rounds: the spread between them is the noise
        for name, f in fns.items():
            row[f"{name}_module_ms_r{rnd}"] = guarded(name, lambda f=f: bench(f, q, k, v, runs=runs))
    cfg8 = base.replace(backend="pallas", quant="int8")
    front8 = lambda q, k: phi_array_low_bit_route(q, k, cfg8, "softmax")
    row["front_bf16_ms"] = bench(lambda q, k: route_with_features(q, k, cfg8, feature_map="softmax"), q, k, runs=runs)
    row["front_int8_ms"] = bench(front8, q, k, runs=runs)
    row["k_prep_int8_ms"] = bench(lambda k: block_means_phi_int8(k, 64, softmax_phi), k, runs=runs)
    row["k_prep_bf16_ms"] = bench(lambda k: block_means_and_phi(k, 64, softmax_phi), k, runs=runs)
    for warps in (2, 8):  # launch of the int8 front-end kernel (default 4 warps, as block_means_and_phi)
        prep_w = lambda k, warps=warps: block_means_phi_int8(k, 64, softmax_phi, num_warps=warps)
        row[f"k_prep_int8_w{warps}_ms"] = bench(prep_w, k, runs=runs)
    row["k_mean_xla_ms"] = bench(lambda k: jnp.mean(k.astype(jnp.float32), axis=1), k, runs=runs)
    lut, mass, qp, kp, keys, queries = jax.jit(front8)(q, k)[:6]  # (then q, k as passed through)
    kern8 = lambda q, k, v, qp, kp, m, keys: pk.sla2_fused_attention_lowbit(
        q, k, v, qp, kp, lut, m, keys=keys, queries=queries
    )
    kern16 = lambda q, k, v, qp, kp, m: pk.sla2_fused_attention(q, k, v, qp, kp, lut, m)
    row["kernel_int8_keys_ms"] = bench(kern8, q, k, v, qp, kp, mass, keys, runs=runs)
    row["kernel_bf16_ms"] = bench(kern16, q, k, v, qp, kp, mass, runs=runs)
    log("module", sp, json.dumps(row))
    return row


def print_module_table():
    med = lambda x: x[0] if isinstance(x, (list, tuple)) else float("nan")
    for r in R["module_small"]:
        print("module small", r)
    for r in [r for r in R["module"] if r]:
        print(f"module fwd, wan-1.3b {r['sparsity']:.0%}: cudnn {med(r['cudnn_fwd_ms']):.3f} ms")
        for rnd in range(1, 1 + sum(key.startswith("bf16_module_ms_r") for key in r)):
            t = {name: med(r.get(f"{name}_module_ms_r{rnd}")) for name in ("bf16", "int8", "int8_prepass")}
            print(
                f"  round {rnd}: bf16 {t['bf16']:.3f} | int8 {t['int8']:.3f} ({t['bf16'] / t['int8']:.2f}x of bf16) |"
                f" int8 pre-pass path {t['int8_prepass']:.3f} ({t['bf16'] / t['int8_prepass']:.2f}x) ms"
            )
        parts = (
            "front_bf16_ms",
            "front_int8_ms",
            "k_prep_int8_ms",
            "k_prep_bf16_ms",
            "k_prep_int8_w2_ms",
            "k_prep_int8_w8_ms",
            "k_mean_xla_ms",
            "kernel_int8_keys_ms",
            "kernel_bf16_ms",
        )
        print("  parts (ms):", {p[:-3]: round(med(r[p]), 3) for p in parts})
        errs = {k_: round(v_, 5) for k_, v_ in r.items() if "err" in k_ or k_.startswith("int8_vs")}
        print("  errors:", errs, "finite", r["int8_finite"])


def print_table():
    med = lambda x: x[0] if isinstance(x, (list, tuple)) else float("nan")
    print("\n=== low-bit SLA2 kernel, wan-1.3b (B=1 H=12 N=32760 D=128 bf16),", R["meta"].get("device"), end=" ")
    print("jax", R["meta"].get("jax"), "; empty jit call ms", R["meta"].get("empty_jit_call_ms"), "===")
    print("SASS (standalone triton", R["ptx"].get("triton"), "sm_90a):")
    for row in R["ptx"].get("kernels", []):
        print("  ", row["kernel"], row["warps_stages"], row["ptx_mma"], row["sass_counts"], row["ptxas"])
    for r in R["small"]:
        print("small", {k: (v if not isinstance(v, dict) else v.get("os_vs_fakequant")) for k, v in r.items()})
    for r in R["wan"]:
        if not r:
            continue
        bf = med(r.get("bf16_fwd_ms"))
        print(
            f"sparsity {r['sparsity']} topk {r['topk']}: cudnn {med(r['cudnn_fwd_ms']):.3f} ms, bf16 {bf:.3f} ms,",
            end="",
        )
        print(f" bf16 err/dense {r['bf16_err_vs_dense']:.4f}")
        print("  pre-pass alone (ms):", {k[8:-3]: round(med(v), 3) for k, v in r.items() if k.startswith("prepass_")})
        print("  variant | fwd ms | prepass ms | kernel ms | speed-up vs bf16 (fwd / kernel) | err/dense | err/bf16")
        for name, vr in r["variants"].items():
            if not vr:
                continue
            f, p_, k_ = med(vr.get("fwd_ms")), med(vr.get("prepass_ms")), med(vr.get("kernel_ms"))
            print(
                f"  {name} | {f:.3f} | {p_:.3f} | {k_:.3f} | {bf / f:.2f}x / {bf / k_:.2f}x | "
                f"{vr.get('err_vs_dense', float('nan')):.4f} | {vr.get('err_vs_bf16', float('nan')):.4f}"
            )
    print("errors:", [e[:300] for e in R["errors"]])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=190.0)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--sass-only", action="store_true", help="only the PTX / SASS report (no GPU needed)")
    ap.add_argument("--module", action="store_true", help="also section 4 (the library's low-bit module path)")
    ap.add_argument("--module-only", action="store_true", help="only section 4")
    ap.add_argument("--rounds", type=int, default=2, help="section 4: rounds of module timings")
    ap.add_argument("--n", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=12)
    args = ap.parse_args()
    dev = jax.devices()[0]
    R["meta"].update(device=dev.device_kind, jax=jax.__version__, python=sys.version.split()[0], runs=args.runs)
    log("device", dev.device_kind, "jax", jax.__version__)
    os.makedirs(args.out, exist_ok=True)
    if args.module or args.module_only:
        if not args.skip_small:
            guarded("module small", module_small)
        guarded("module wan", lambda: module_wan(args.sparsity, args.runs, args.n, args.heads, args.rounds))
    if not args.sass_only and not args.module_only:
        if not args.skip_small:
            guarded("small", small_checks)
        guarded("wan", lambda: wan(args.sparsity, args.runs, args.budget_s, args.n, args.heads))
    if not args.module_only:
        guarded("sass report", lambda: sass_report(args.out))
    with open(os.path.join(args.out, "check_int8_gpu.json"), "w") as f:
        json.dump(R, f, indent=1)
    if not args.module_only:
        print_table()
    print_module_table()
    print("errors:", [e[:300] for e in R["errors"]])


if __name__ == "__main__":
    main()
