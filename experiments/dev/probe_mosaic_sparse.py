"""GPU probe: the Mosaic GPU sparse forward (pallas_kernels/mosaic_forward.py), alone and with the linear branch
in its epilogue (sparse_linear_attention_mosaic, KernelConfig.epilogue "mosaic") vs the Triton epilogue.

    python -m experiments.dev.probe_mosaic_sparse --out DIR [--parts small fused_small sweep wan ...] [--sparsity ...]
        [--loop pingpong|pipelined] [--pair-steps | --no-pair-steps]

Parts (each runs on its own: an error is recorded and the next part goes on; JSON to DIR/probe_mosaic_sparse.json):
  small        sparse_attention_mosaic on small random inputs (ragged and whole N, D 64 / 128) vs a dense float32
               reference with the LUT's token mask (o_s and lse).
  fused_small  sparse_linear_attention_mosaic (every output set the library asks for) vs the dense float32
               reference plus the linear branch from the same (bf16) H_i, Z_i in float32.
  sweep        kernel time against the LUT length (random ascending LUTs of 5 / 10 / 25 / 50 entries, wan-1.3b
               shape): slope = cost of one LUT entry, intercept = fixed cost of the grid's programs.
  wan          wan-1.3b (B=1, H=12, N=32760, D=128, bf16, SLA router LUT) per sparsity: outputs of the library
               forward with the Mosaic epilogue vs the Triton epilogue, then interleaved medians of the kernels, the
               library forward (states + kernel(s)), the sla2_jax module forward with each epilogue, and cuDNN.
  library      KernelConfig.forward triton vs mosaic through the custom_vjp and the module, fwd and fwd+bwd.
  dense        jax's dense Mosaic attention and cuDNN at N = 32768 (anchors).
  ncu_target   two launches of the plain and (wan-1.3b) of the fused kernel at the first --sparsity, shape
               --ncu-workload (for ncu: --kernel-name regex:sla_sparse).
  cupti        kernel-only (CUPTI) vs synchronised wall vs pipelined time per call, LUTs of 5 / 25 entries.
  module_fb    sla2_jax module forward and forward+backward, Triton vs Mosaic epilogue, cuDNN, one process.
  trace        Mosaic's on-device profiler regions (KernelConfig.profile_dir) via experiments.dev.profile_mosaic.
  ring         output tiles in finished V slots vs their own (KernelConfig.outputs_in_ring): outputs equal bit for
               bit, CUPTI times.
  block_k      the same work in 64-key vs 128-key LUT steps (bf16, INT8): the per-step overhead.
  loops        LOOP_VARIANTS (KernelConfig loop, pair_steps): INT8 / FP8 kernels of each variant vs the first
               variant and the dense float32 reference on small ragged cases, then on wan-1.3b with random LUTs the
               CUPTI kernel times of bf16 (plain, training and inference epilogues), INT8 and INT8 + FP8 under each
               variant, with each output's largest difference from the first variant's.
  --loop / --pair-steps: the KernelConfig fields of every other part (default: KernelConfig's).
  --trim-sass CSV: prints the top stall lines of an `ncu --page source --csv --print-source sass` export.
Every kernel call takes its variant as config= (a KernelConfig built from BASE); nothing changes module state.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.dev.common import bench, config_dict, kernel_ms, record_error, rel, uniform_lut, wan_setup
from experiments.timing import pipelined_seconds, time_samples
from pallas_kernels import KernelConfig, heuristic_config
from pallas_kernels.config import LOOPS
from pallas_kernels import attention, linear_states, quantize
from pallas_kernels import mosaic_forward as mf

RESULTS: dict = {}
BASE = KernelConfig(forward="mosaic", backward="mosaic")  # set by main from --loop and --pair-steps


def config(**changes) -> KernelConfig:
    """BASE with the given KernelConfig fields changed."""
    return BASE.replace(**changes)


def library_config(n=32760, d=128, **changes) -> KernelConfig:
    """The library's default for a bf16 call on a Hopper GPU (heuristic_config: the Mosaic kernels and the Triton
    launch table) with BASE's forward-loop fields and the given changes."""
    loop_fields = {x: getattr(BASE, x) for x in ("loop", "pair_steps", "outputs_in_ring", "p8_operand")}
    return heuristic_config(n, d, jnp.bfloat16, gpu="hopper").replace(**{**loop_fields, **changes})


def sparse_attention_mosaic(q, k, v, lut, *, block_k=64, stages=2, **changes):
    """mosaic_forward.sparse_attention_mosaic under config(**changes)."""
    return mf.sparse_attention_mosaic(q, k, v, lut, block_k=block_k, stages=stages, config=config(**changes))


def dense_reference(q, k, v, lut, block_q, block_k):
    """o_s (B, N, H, D) f32 and lse (B, H, N) base 2, softmax over the LUT's keys (< N) only."""
    b, n, h, d = q.shape
    nk = -(-n // block_k)
    sel = jnp.any(lut[..., None] == jnp.arange(nk)[None, None, None, None, :], axis=3)  # (B, H, Nq, Nk)
    mask = jnp.repeat(jnp.repeat(sel, block_q, axis=2)[:, :, :n], block_k, axis=3)[..., :n]
    s = jnp.einsum("bnhd,bmhd->bhnm", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(d)
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1) * math.log2(math.e)
    o = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32))
    return o, lse


def small_checks():
    rows, seed = [], int.from_bytes(os.urandom(4), "little")
    RESULTS["small_seed"] = seed
    for n, d, topk, dtype in [
        (2000, 128, 4, jnp.bfloat16),
        (4096, 64, 6, jnp.bfloat16),
        (1000, 64, 3, jnp.float16),
        (776, 128, 1, jnp.float16),
    ]:
        row = dict(n=n, d=d, topk=topk, dtype=jnp.dtype(dtype).name)
        try:
            rng = np.random.default_rng([seed, n, d])
            b, h, nq, nk = 1, 2, -(-n // 128), -(-n // 64)
            q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in range(3))
            lut = uniform_lut(rng, b, h, nq, nk, topk)
            o, lse = jax.jit(sparse_attention_mosaic)(q, k, v, lut)
            row["config"] = config_dict(config())
            o_ref, lse_ref = dense_reference(q, k, v, lut, 128, 64)
            row.update(rel_o=rel(o, o_ref), max_abs_lse=float(jnp.max(jnp.abs(lse[:, :, :n] - lse_ref))))
        except Exception as e:  # noqa: BLE001 - record and go on
            record_error(row, "error", e)
        print("small", json.dumps(row), flush=True)
        rows.append(row)
    RESULTS["small"] = rows


def fused(q, k, v, lut, lin_arrays, outputs=("o",), stages=4, **changes):
    """sparse_linear_attention_mosaic with lin_arrays = (q_phi, h, z, alpha) (jit arguments; eps 1e-6 static) under
    config(**changes)."""
    linear = mf.LinearInputs(*lin_arrays, 1e-6)
    kernel_config = config(**changes)
    return mf.sparse_linear_attention_mosaic(q, k, v, lut, linear, outputs=outputs, stages=stages, config=kernel_config)


def random_linear_inputs(rng, b, n, h, d, nq, dtype, with_alpha=True):
    """q_phi (B, N, H, D) dtype (softmax rows, positive), H_i (B, H, Nq, D, D) bf16, Z_i (B, H, Nq, D) f32 positive,
    alpha (B, H, Nq) f32 in [0, 1]: random stand-ins of the library's states (their values do not matter here)."""
    x = rng.standard_normal((b, n, h, d))
    q_phi = jnp.asarray(np.exp(x) / np.exp(x).sum(-1, keepdims=True), dtype)
    hs = jnp.asarray(rng.standard_normal((b, h, nq, d, d)) * math.sqrt(n / d), jnp.bfloat16)
    zs = jnp.asarray(rng.uniform(0.5, 2.0, (b, h, nq, d)) * (n / d), jnp.float32)
    alpha = jnp.asarray(rng.uniform(0.0, 1.0, (b, h, nq)), jnp.float32) if with_alpha else None
    return mf.LinearInputs(q_phi, hs, zs, alpha, 1e-6)


def linear_reference(linear, n):
    """o_l (B, N, H, D) and den (B, H, N) in float32 from the same (bf16) H_i, Z_i: o_l = phi(Q_i) H_i / den."""
    b, _, h, d = linear.q_phi.shape
    nq = linear.h.shape[2]
    qp = jnp.pad(linear.q_phi.astype(jnp.float32), ((0, 0), (0, nq * 128 - n), (0, 0), (0, 0)))
    qp = qp.reshape(b, nq, 128, h, d)
    hp = jax.lax.Precision.HIGHEST
    num = jnp.einsum("biqhd,bhide->biqhe", qp, linear.h.astype(jnp.float32), precision=hp)
    den = jnp.einsum("biqhd,bhid->bhiq", qp, linear.z, precision=hp) + linear.eps
    o_l = num / jnp.transpose(den, (0, 2, 3, 1))[..., None]
    return o_l.reshape(b, nq * 128, h, d)[:, :n], den.reshape(b, h, nq * 128)[:, :, :n]


FUSED_SMALL_CASES = [  # n, d, topk, dtype, outputs, stages
    (2000, 128, 4, jnp.bfloat16, ("o", "o_s", "o_l", "lse", "den"), 3),
    (2000, 128, 5, jnp.bfloat16, ("o",), 4),
    (4096, 64, 6, jnp.bfloat16, ("o",), 4),
    (1000, 64, 3, jnp.float16, ("o_s", "o_l", "lse", "den"), 4),
    (1048, 128, 2, jnp.bfloat16, ("o", "o_s", "o_l", "lse", "den"), 3),  # last block's 2nd half past N
    (776, 128, 1, jnp.float16, ("o_s", "o_l"), 4),
    (2000, 128, 5, jnp.bfloat16, ("o", "o_s", "o_l", "lse", "den"), 3),
    # the third output tile through a finished V slot (mosaic_forward.ring_holds_outputs), ring of 4;
    # topk 4 / 7 / 2 / 1 put the two warpgroups' slots at different places of the ring (topk 1: own tiles)
    (2000, 128, 4, jnp.bfloat16, ("o", "o_s", "o_l", "lse", "den"), 4),
    (4096, 128, 7, jnp.bfloat16, ("o", "o_s", "o_l", "lse", "den"), 4),
    (1048, 64, 2, jnp.float16, ("o", "o_s", "o_l", "lse", "den"), 4),
    (776, 128, 1, jnp.bfloat16, ("o", "o_s", "o_l"), 4),
    (4096, 64, 25, jnp.bfloat16, ("o", "o_s", "o_l", "lse", "den"), 4),
]


def fused_small_checks():
    """sparse_linear_attention_mosaic vs the dense f32 reference (fresh seed, recorded)."""
    rows, seed = [], int.from_bytes(os.urandom(4), "little")
    RESULTS["fused_small_seed"] = seed
    for n, d, topk, dtype, outputs, stages in FUSED_SMALL_CASES:
        row = dict(n=n, d=d, topk=topk, dtype=jnp.dtype(dtype).name, outputs=outputs, stages=stages)
        try:
            rng = np.random.default_rng([seed, n, d, len(outputs)])
            b, h, nq, nk = 1, 2, -(-n // 128), -(-n // 64)
            q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in range(3))
            lut = uniform_lut(rng, b, h, nq, nk, topk)
            linear = random_linear_inputs(rng, b, n, h, d, nq, dtype, with_alpha="o" in outputs)
            kw = {"outputs": outputs, "stages": stages}
            out = jax.jit(lambda *a, kw=kw: fused(*a, **kw))(q, k, v, lut, linear[:4])
            o_s, lse = dense_reference(q, k, v, lut, 128, 64)
            o_l, den = linear_reference(linear, n)
            ref = {"o_s": o_s, "o_l": o_l, "lse": lse, "den": den}
            if "o" in outputs:
                a = jnp.repeat(linear.alpha, 128, axis=-1)[:, :, :n].transpose(0, 2, 1)[..., None]
                ref["o"] = a * o_s + (1.0 - a) * o_l
            for name in outputs:
                got = out[name][:, :, :n] if name in ("lse", "den") else out[name]
                row[f"rel_{name}"] = rel(got, ref[name])
                row[f"finite_{name}"] = bool(jnp.all(jnp.isfinite(got)))
        except Exception as e:  # noqa: BLE001 - record and go on
            record_error(row, "error", e)
        print("fused_small", json.dumps(row), flush=True)
        rows.append(row)
    RESULTS["fused_small"] = rows


def timed_rounds(cands, runs, rounds=3):
    """{key: (fn, args)} -> {key: [median, min, max]} over `rounds` interleaved rounds of a median of `runs` ms;
    a candidate that fails to compile or run is recorded under timing_errors and left out."""
    jitted = {}
    for key, (fn, args) in cands.items():
        try:
            jitted[key] = jax.jit(fn)
            time_samples(jitted[key], *args, warmup=2, iters=2)
        except Exception as e:  # noqa: BLE001
            record_error(RESULTS.setdefault("timing_errors", {}), key, e)
            jitted.pop(key, None)
    meds = {key: [] for key in jitted}
    for _ in range(rounds):
        for key in jitted:
            args = cands[key][1]
            meds[key].append(1e3 * statistics.median(time_samples(jitted[key], *args, warmup=1, iters=runs)))
    return {key: [statistics.median(m), min(m), max(m)] for key, m in meds.items()}


def sweep(runs, topks=(5, 10, 25, 50)):
    """Kernel time vs LUT length on the wan-1.3b shape; a least-squares line per variant."""
    q, k, v, _, _, _, _, alpha, cfg = wan_setup(0.95, 29, 1, 12, 32760, 128, 128, 64)
    rng = np.random.default_rng(7)
    linear = random_linear_inputs(rng, 1, 32760, 12, 128, cfg.nq, jnp.bfloat16)
    variants = {
        "plain_s4": lambda q, k, v, lut, lin: sparse_attention_mosaic(q, k, v, lut, stages=4),
        "fused_o_s4": lambda q, k, v, lut, lin: fused(q, k, v, lut, lin),
    }
    cands = {}
    for topk in topks:
        lut = uniform_lut(rng, 1, 12, cfg.nq, cfg.nk, topk)
        for name, fn in variants.items():
            cands[f"{name}_topk{topk}"] = (fn, (q, k, v, lut, linear[:4]))
    stats = timed_rounds(cands, runs, rounds=2)
    RESULTS["sweep_ms"] = stats
    fits = {}
    for name in variants:
        pts = [(t, stats[f"{name}_topk{t}"][0]) for t in topks if f"{name}_topk{t}" in stats]
        if len(pts) >= 2:
            slope, icept = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            flop_per_entry = 4 * 12 * cfg.nq * 128 * 64 * 128
            fits[name] = dict(
                us_per_entry=1e3 * slope,
                fixed_us=1e3 * icept,
                fixed_us_per_program_per_sm=1e3 * icept * 132 / (12 * cfg.nq),
                marginal_tflops=flop_per_entry / (slope * 1e-3) / 1e12,
            )
    RESULTS["sweep_fit"] = fits
    print("sweep", json.dumps(stats), json.dumps(fits), flush=True)


def library_forward(cfg, epilogue, residuals):
    """(q, k, v, q_phi, k_phi, lut, alpha) -> the fused forward's output dict (attention.forward: states and
    kernel(s)) with the library's KernelConfig and this epilogue."""
    call = cfg._replace(config=library_config(cfg.n, cfg.d, epilogue=epilogue))
    def forward(q, k, v, qp, kp, lut, a):
        return attention.forward(q, k, v, qp, kp, lut, a, call, fused=True, residuals=residuals)

    return forward


def library_module(sparsity, epilogue="mosaic"):
    """(q, k, v) -> the sla2_jax module forward (backend pallas, alpha "mass") with this epilogue."""
    import sla2_jax as sla

    kernel = library_config(epilogue=epilogue)
    mcfg = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend="pallas", alpha="mass", kernel=kernel)
    return lambda q, k, v: sla.sla2_attention(q, k, v, config=mcfg)


def wan(sparsity, runs):
    """Library forward with the Mosaic vs the Triton epilogue: errors, then interleaved timings with cuDNN."""
    q, k, v, _, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 29, 1, 12, 32760, 128, 128, 64)
    row = dict(sparsity=sparsity, topk=cfg.topk, config=config_dict(library_config()))
    fwd = lambda res, epilogue="mosaic": library_forward(cfg, epilogue, res)
    names = ("o", "o_s", "o_l", "lse", "den")
    lib_args = (q, k, v, qp, kp, lut, alpha)
    try:
        outs = {c: jax.jit(fwd(True, c))(*lib_args) for c in ("triton", "mosaic")}
        row["rel_train_mosaic_vs_triton"] = {x: rel(outs["mosaic"][x], outs["triton"][x]) for x in names}
        o_inf = jax.jit(lambda *a: fwd(False, "mosaic")(*a)["o"])(*lib_args)
        row["rel_infer_o_mosaic_vs_triton"] = rel(o_inf, outs["triton"]["o"])
        row["finite"] = all(bool(jnp.all(jnp.isfinite(outs["mosaic"][x]))) for x in names)
        del outs, o_inf
    except Exception as e:  # noqa: BLE001
        record_error(row, "error_outputs", e)
    state_cfg = cfg._replace(config=library_config())
    states = lambda kp, v, lut: linear_states.complement_states(kp, v, lut, state_cfg)
    h_i, z_i = jax.jit(states)(kp, v, lut)
    lin = (qp, h_i, z_i, alpha)
    lib_args = (q, k, v, qp, kp, lut, alpha)
    cands = {
        "states": (states, (kp, v, lut)),
        "cudnn_fwd": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), (q, k, v)),
        "kernel_plain_s4": (lambda q, k, v, lut: sparse_attention_mosaic(q, k, v, lut, stages=4), (q, k, v, lut)),
        "kernel_fused_o_s4": (fused, (q, k, v, lut, lin)),
        "kernel_fused_train_s3": (lambda *a: fused(*a, outputs=names, stages=3), (q, k, v, lut, lin)),
    }
    for c in ("triton", "mosaic"):
        cands[f"lib_infer_{c}"] = (lambda *a, c=c: fwd(False, c)(*a)["o"], lib_args)
        cands[f"module_fwd_{c}"] = (library_module(sparsity, c), (q, k, v))
        cands[f"lib_train_{c}"] = (lambda *a, c=c: fwd(True, c)(*a)["o"], lib_args)
    try:
        row["times_ms"] = timed_rounds(cands, runs)
        t = row["times_ms"]
        flop = 4 * 12 * cfg.nq * 128 * cfg.topk * 64 * 128
        row["eff_tflops"] = {x: flop / (t[x][0] * 1e-3) / 1e12 for x in t if x.startswith("kernel")}
        if "cudnn_fwd" in t:
            row["speedup_vs_cudnn"] = {x: t["cudnn_fwd"][0] / t[x][0] for x in t if x.startswith("module")}
    except Exception as e:  # noqa: BLE001
        record_error(row, "error_times", e)
    print("wan", json.dumps(row), flush=True)
    RESULTS.setdefault("wan", []).append(row)


def ring_outputs(sparsity, iterations=20):
    """Output tiles in finished V slots (KernelConfig.outputs_in_ring) vs tiles of their own,
    wan-1.3b with the router's LUT: the five-output fused kernel (ring of 4 vs 3) and the INT8 kernel's o_s must be
    equal bit for bit (the ring depth does not change the arithmetic; a race on a reused slot would show here);
    then kernel-only times (CUPTI) of each."""

    q, k, v, _, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 29, 1, 12, 32760, 128, 128, 64)
    state_cfg = cfg._replace(config=library_config())
    h_i, z_i = jax.jit(lambda kp, v, lut: linear_states.complement_states(kp, v, lut, state_cfg))(kp, v, lut)
    lin = (qp, h_i, z_i, alpha)
    names = ("o", "o_s", "o_l", "lse", "den")
    keys = jax.jit(lambda k: quantize.quantize_keys_with_mean(k, 64))(k)
    int8 = lambda ring: lambda q, k, v, lut: mf.sparse_attention_mosaic_int8(
        q, k, v, lut, keys, stages=4, config=config(outputs_in_ring=ring)
    )
    cases = {
        "train5_ring4": (lambda *a: fused(*a, outputs=names, stages=4, outputs_in_ring=True), (q, k, v, lut, lin)),
        "train5_own_s3": (lambda *a: fused(*a, outputs=names, stages=3, outputs_in_ring=False), (q, k, v, lut, lin)),
        "infer_o_s4": (lambda *a: fused(*a, outputs_in_ring=True), (q, k, v, lut, lin)),
        "int8_ring": (int8(True), (q, k, v, lut)),
        "int8_own": (int8(False), (q, k, v, lut)),
    }
    row, outs = dict(sparsity=sparsity, topk=cfg.topk), {}
    for key, (fn, args) in cases.items():
        try:
            outs[key] = jax.block_until_ready(jax.jit(fn)(*args))
            row[f"cupti_ms_{key}"] = kernel_ms(fn, args, iterations)[0]
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_{key}", e)
    diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    if "train5_ring4" in outs and "train5_own_s3" in outs:
        row["max_abs_diff_train5"] = {x: diff(outs["train5_ring4"][x], outs["train5_own_s3"][x]) for x in names}
    if "int8_ring" in outs and "int8_own" in outs:
        row["max_abs_diff_int8"] = [diff(a, b) for a, b in zip(outs["int8_ring"], outs["int8_own"])]
    print("ring", json.dumps(row), flush=True)
    RESULTS.setdefault("ring", []).append(row)


def key_block_size(iterations=20):
    """How much of a LUT step is per-step overhead: the same sparse attention work (wan-1.3b shape,
    random ascending LUTs at 95% / 97%) in 64-key steps (block_k 64, topk 25 / 15) vs 128-key steps (block_k 128,
    topk 13 / 8, i.e. 64 x 128 score tiles per warpgroup as FlashAttention-3 uses), bf16 and INT8 (pre-quantised
    operands), CUPTI kernel-only times and effective TFLOP/s (4 * rows * keys * D per selected block). Each variant is
    first checked against the dense float32 reference on a small ragged case (fresh seed)."""

    seed = int.from_bytes(os.urandom(4), "little")
    row = {"seed": seed}
    rng = np.random.default_rng(seed)
    n, h, d = 32760, 12, 128
    nq = -(-n // 128)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.bfloat16) for _ in range(3))
    for block_k in (64, 128):  # correctness first (small ragged case)
        try:
            ns, hs = 2000, 2
            qs, ks, vs = (jnp.asarray(rng.standard_normal((1, ns, hs, d)), jnp.bfloat16) for _ in range(3))
            lut = uniform_lut(rng, 1, hs, -(-ns // 128), -(-ns // block_k), 3)
            o, lse = jax.jit(lambda *a, bk=block_k: sparse_attention_mosaic(*a, block_k=bk, stages=2))(qs, ks, vs, lut)
            o_ref, lse_ref = dense_reference(qs, ks, vs, lut, 128, block_k)
            row[f"small_bk{block_k}"] = dict(
                rel_o=rel(o, o_ref), max_abs_lse=float(jnp.max(jnp.abs(lse[:, :, :ns] - lse_ref)))
            )
        except Exception as e:  # noqa: BLE001
            record_error(row, f"small_bk{block_k}_error", e)
    for sparsity in (0.95, 0.97):
        for block_k in (64, 128):
            nk = -(-n // block_k)
            topk = max(1, round((1 - sparsity) * nk))
            lut = uniform_lut(rng, 1, h, nq, nk, topk)
            flop = 4 * h * nq * 128 * topk * block_k * d
            keys = jax.jit(lambda k, bk=block_k: quantize.quantize_keys_with_mean(k, bk))(k)
            queries = jax.jit(lambda q, m: quantize.quantize_queries(q, 128, m, _SCALE))(q, keys.mean)
            cases = {}
            for stages in (2, 4) if block_k == 64 else (2, 3):
                cases[f"bf16_s{stages}"] = (
                    lambda q, k, v, lut, st=stages, bk=block_k: sparse_attention_mosaic(
                        q, k, v, lut, block_k=bk, stages=st
                    ),
                    (q, k, v, lut),
                )
                cases[f"int8_s{stages}"] = (
                    lambda q, k, v, lut, st=stages, bk=block_k: mf.sparse_attention_mosaic_int8(
                        q, k, v, lut, keys, block_k=bk, stages=st, queries=queries, config=config()
                    ),
                    (q, k, v, lut),
                )
            for name, (fn, args) in cases.items():
                key = f"s{sparsity}_bk{block_k}_topk{topk}_{name}"
                try:
                    ms = kernel_ms(fn, args, iterations)[0]
                    row[key] = {"cupti_ms": ms, "eff_tflops": flop / (ms * 1e-3) / 1e12}
                except Exception as e:  # noqa: BLE001
                    record_error(row, f"{key}_error", e)
    print("block_k", json.dumps(row), flush=True)
    RESULTS["block_k"] = row


_SCALE = math.log2(math.e) / math.sqrt(128)  # sm_scale * log2(e) at D = 128


LOOP_VARIANTS = {  # KernelConfig changes of each variant of the loops part
    "pingpong": {"loop": "pingpong", "pair_steps": False},
    "pipelined": {"loop": "pipelined", "pair_steps": False},
    "pingpong_pairs": {"loop": "pingpong", "pair_steps": True},
    "pipelined_pairs": {"loop": "pipelined", "pair_steps": True},
}


def loop_variants(sparsities, loops=None, kinds_wanted=None, iterations=20):
    """The compute warpgroups' loop variants (LOOP_VARIANTS) for the kernel kinds named in kinds_wanted (None: all;
    "_s6" / "_s8": stages 6 / 8 asked); see the module docstring. Each kind is a function of (q, k, v, lut) and the
    KernelConfig changes of a variant."""
    seed = int.from_bytes(os.urandom(4), "little")
    row = {"seed": seed}
    loops = loops or list(LOOP_VARIANTS)

    def int8_kinds(keys, queries=None, bk=64):
        values = lambda v: quantize.quantize_values_fp8(v, bk, interleave=True)
        return {
            "int8": lambda q, k, v, lut, **ch: mf.sparse_attention_mosaic_int8(
                q, k, v, lut, keys, queries=queries, config=config(**ch)
            ),
            "int8_fp8": lambda q, k, v, lut, **ch: mf.sparse_attention_mosaic_int8(
                q, k, v, lut, keys, queries=queries, values=values(v), config=config(**ch)
            ),
            **{
                f"int8_s{st}": lambda q, k, v, lut, st=st, **ch: mf.sparse_attention_mosaic_int8(
                    q, k, v, lut, keys, queries=queries, stages=st, config=config(**ch)
                )
                for st in (6, 8)
            },
        }

    def wanted(kinds):
        return {x: f for x, f in kinds.items() if kinds_wanted is None or x in kinds_wanted}

    def max_diff(a, b):
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(a, b))

    def first(out):  # the first output of a tuple or a dict of outputs
        return out[0] if isinstance(out, tuple) else out[next(iter(out))]

    def each_variant(prefix, fn, args, measure):
        """fn(*args) under each variant of `loops`: row[prefix_variant] = measure(fn under it, its output), plus the
        output's largest difference (and the first output's relative one) from the first variant's."""
        base = None
        for loop in loops:
            key = f"{prefix}_{loop}"
            try:
                fn_loop = functools.partial(fn, **LOOP_VARIANTS[loop])
                out = jax.block_until_ready(jax.jit(fn_loop)(*args))
                base = out if base is None else base
                row[key] = measure(fn_loop, out)
                row[key].update(
                    max_diff_vs_first=max_diff(out, base), rel_first_output_vs_first=rel(first(out), first(base))
                )
            except Exception as e:  # noqa: BLE001
                record_error(row, f"{key}_error", e)
            print("loops", key, row.get(key) or row.get(f"{key}_error", "")[:300], flush=True)

    rng = np.random.default_rng(seed)
    for n, d, topk in [(2000, 128, 4), (1000, 64, 3), (776, 128, 1), (4096, 128, 7)]:  # INT8 / FP8 correctness
        b, h = 1, 2
        q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.bfloat16) for _ in range(3))
        lut = uniform_lut(rng, b, h, -(-n // 128), -(-n // 64), topk)
        keys = jax.jit(lambda k: quantize.quantize_keys_with_mean(k, 64))(k)
        o_ref, _ = dense_reference(q, k, v, lut, 128, 64)
        for kind, fn in wanted(int8_kinds(keys)).items():
            each_variant(
                f"small_n{n}_d{d}_topk{topk}_{kind}",
                fn,
                (q, k, v, lut),
                lambda _, out: {"rel_o_vs_dense": rel(out[0], o_ref)},
            )
    n, h, d = 32760, 12, 128
    nq, nk = -(-n // 128), -(-n // 64)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.bfloat16) for _ in range(3))
    linear = random_linear_inputs(rng, 1, n, h, d, nq, jnp.bfloat16)
    keys = jax.jit(lambda k: quantize.quantize_keys_with_mean(k, 64))(k)
    queries = jax.jit(lambda q, m: quantize.quantize_queries(q, 128, m, _SCALE))(q, keys.mean)
    train = ("o", "o_s", "o_l", "lse", "den")
    kinds = {
        "bf16": lambda q, k, v, lut, **ch: sparse_attention_mosaic(q, k, v, lut, stages=4, **ch),
        "bf16_s6": lambda q, k, v, lut, **ch: sparse_attention_mosaic(q, k, v, lut, stages=6, **ch),
        "train5": lambda q, k, v, lut, **ch: fused(q, k, v, lut, linear[:4], outputs=train, **ch),
        "infer_o": lambda q, k, v, lut, **ch: fused(q, k, v, lut, linear[:4], **ch),
        **int8_kinds(keys, queries),
        "int8_infer_o": lambda q, k, v, lut, **ch: mf.sparse_linear_attention_mosaic_int8(
            q, k, v, lut, keys, linear, outputs=("o",), queries=queries, config=config(**ch)
        ),
    }
    for sparsity in sparsities:
        topk = max(1, round((1 - sparsity) * nk))
        lut = uniform_lut(rng, 1, h, nq, nk, topk)
        flop = 4 * h * nq * 128 * topk * 64 * d

        def timing(fn_loop, _out, lut=lut, flop=flop):
            ms = kernel_ms(fn_loop, (q, k, v, lut), iterations)[0]
            return {"cupti_ms": ms, "eff_tflops": flop / (ms * 1e-3) / 1e12}

        for kind, fn in wanted(kinds).items():
            each_variant(f"s{sparsity}_topk{topk}_{kind}", fn, (q, k, v, lut), timing)
    RESULTS["loops"] = row


def module_fwd_bwd(sparsity, runs):
    """sla2_jax module forward and forward+backward with KernelConfig.epilogue "triton" vs "mosaic" (everything else
    at the library's defaults), gradients of the two vs each other, cuDNN forward and forward+backward in the same
    process."""
    q, k, v, do, *_ = wan_setup(sparsity, 41, 1, 12, 32760, 128, 128, 64)
    module = {c: library_module(sparsity, c) for c in ("triton", "mosaic")}
    grads = lambda fn: (
        lambda q, k, v, do: jax.grad(
            lambda *x: jnp.sum(fn(*x).astype(jnp.float32) * do.astype(jnp.float32)), argnums=(0, 1, 2)
        )(q, k, v)
    )
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    row = {"sparsity": sparsity}
    try:
        g = {c: jax.jit(grads(module[c]))(q, k, v, do) for c in ("triton", "mosaic")}
        row["rel_grads_q_k_v_mosaic_vs_triton"] = [rel(a, b) for a, b in zip(g["mosaic"], g["triton"])]
        del g
    except Exception as e:  # noqa: BLE001
        record_error(row, "error_grads", e)
    cands = {"cudnn_fwd": (cudnn, (q, k, v)), "cudnn_fwd_bwd": (grads(cudnn), (q, k, v, do))}
    for c in ("triton", "mosaic"):
        cands[f"module_fwd_{c}"] = (module[c], (q, k, v))
        cands[f"module_fwd_bwd_{c}"] = (grads(module[c]), (q, k, v, do))
    row["times_ms"] = t = timed_rounds(cands, runs, rounds=2)
    row["speedup_vs_cudnn"] = {
        x: t["cudnn_fwd_bwd" if "bwd" in x else "cudnn_fwd"][0] / t[x][0] for x in t if x.startswith("module")
    }
    print("module_fb", json.dumps(row), flush=True)
    RESULTS.setdefault("module_fwd_bwd", []).append(row)


def ncu_target(workload="wan-1.3b", sparsity=0.95):
    """Launches for ncu: the plain kernel twice, then (wan-1.3b) the fused one ("o") twice, on random inputs of the
    workload's shape with a random LUT at the sparsity (25 entries at wan-1.3b, 95%); imports nothing beyond the
    kernels (no router, no Triton)."""
    from experiments.benchmark import WORKLOADS

    b, h, n, d = WORKLOADS[workload][0]
    nq, nk = -(-n // 128), -(-n // 64)
    topk = max(1, int(nk * (1 - sparsity) + 1e-6))
    rng = np.random.default_rng(5)
    q, k, v = jax.random.normal(jax.random.PRNGKey(5), (3, b, n, h, d), jnp.bfloat16)  # made on the device
    lut = uniform_lut(rng, b, h, nq, nk, topk)
    plain = jax.jit(lambda q, k, v, lut: sparse_attention_mosaic(q, k, v, lut, stages=4))
    for _ in range(2):
        jax.block_until_ready(plain(q, k, v, lut))
    if workload == "wan-1.3b":
        lin = random_linear_inputs(rng, b, n, h, d, nq, jnp.bfloat16)[:4]
        with_linear = jax.jit(fused)
        for _ in range(2):
            jax.block_until_ready(with_linear(q, k, v, lut, lin))
    print(f"ncu_target done: {workload}, {b}x{h}x{n}x{d}, LUT of {topk} of {nk} key blocks", flush=True)


def cupti(iterations=20):
    """Kernel-only times (CUPTI, jax.experimental.mosaic.gpu.profiler.measure) of the plain and the fused kernel on
    random wan-1.3b-shaped inputs (LUTs of 5 and 25 entries), beside the synchronised wall time of the same call: the
    difference is what a call costs outside the kernel (dispatch, synchronisation, other XLA kernels)."""

    rng = np.random.default_rng(5)
    n, h, d, nq, nk = 32760, 12, 128, 256, 512
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.bfloat16) for _ in range(3))
    lin = random_linear_inputs(rng, 1, n, h, d, nq, jnp.bfloat16)[:4]
    out = {}
    for topk in (5, 25):
        lut = uniform_lut(rng, 1, h, nq, nk, topk)
        cases = {
            "plain_s4": (lambda q, k, v, lut: sparse_attention_mosaic(q, k, v, lut, stages=4), (q, k, v, lut)),
            "fused_o_s4": (fused, (q, k, v, lut, lin)),
        }
        for name, (fn, args) in cases.items():
            row = {}
            try:
                jitted = jax.jit(fn)
                row["cupti_ms_median"], per_iter = kernel_ms(jitted, args, iterations)
                row["kernels"] = sorted({kn for kn, _ in per_iter[0]})
                row["wall_ms_median"] = 1e3 * statistics.median(time_samples(jitted, *args, warmup=3, iters=iterations))
                row["pipelined_ms_per_call"] = 1e3 * pipelined_seconds(jitted, *args, calls=iterations, repeats=1)
            except Exception as e:  # noqa: BLE001
                record_error(row, "error", e)
            print("cupti", name, topk, json.dumps(row), flush=True)
            out[f"{name}_topk{topk}"] = row
    RESULTS["cupti"] = out


def trace(parts=("plain_wan95", "plain_topk1", "fused_wan95")):
    """Mosaic's on-device profiler (KernelConfig.profile_dir): per program and warpgroup the clock at the named regions
    (c_setmaxnreg, c_wait_q, c_wait_k0, c_loop, c_epilogue, c_store, c_drain; m_setmaxnreg, m_prime), summarised by
    experiments.dev.profile_mosaic (the backward's profile driver: region lengths, gaps between programs on one SM)."""
    import tempfile

    from experiments.dev import profile_mosaic as pm

    pm.capture_profiler_buffers()
    q, k, v, _, qp, kp, lut, alpha, cfg = wan_setup(0.95, 29, 1, 12, 32760, 128, 128, 64)
    state_cfg = cfg._replace(config=library_config())
    h_i, z_i = jax.jit(lambda kp, v, lut: linear_states.complement_states(kp, v, lut, state_cfg))(kp, v, lut)
    lut1 = uniform_lut(np.random.default_rng(3), 1, 12, cfg.nq, cfg.nk, 1)
    prof = tempfile.mkdtemp()
    plain = lambda q, k, v, lut: sparse_attention_mosaic(q, k, v, lut, stages=4, profile_dir=prof)
    cases = {
        "plain_wan95": (plain, (q, k, v, lut)),
        "plain_topk1": (plain, (q, k, v, lut1)),
        "fused_wan95": (lambda *a: fused(*a, profile_dir=prof), (q, k, v, lut, (qp, h_i, z_i, alpha))),
    }
    out = {}
    for key in parts:
        row = {}
        try:
            fn = jax.jit(cases[key][0])
            for _ in range(3):
                jax.block_until_ready(fn(*cases[key][1]))
            jax.effects_barrier()
            pm.CAPTURED.clear()
            for _ in range(3):
                jax.block_until_ready(fn(*cases[key][1]))
            mhz = pm.sm_clock_mhz()
            jax.effects_barrier()
            buf, interned, entries = pm.CAPTURED[-1]
            row.update(pm.summarise_trace(buf, interned, entries, mhz))
        except Exception as e:  # noqa: BLE001
            record_error(row, "error", e)
        print("trace", key, json.dumps(row), flush=True)
        out[key] = row
    RESULTS["trace"] = out


def trim_sass(path, top=30):
    """Top `top` SASS lines by warp stall samples of an ncu source-page CSV export (all kernels in the file)."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith(('"#"', '"Address"'))]
    for s0, s1 in zip(starts, starts[1:] + [len(lines)]):
        rows = list(csv.DictReader(lines[s0:s1]))
        if not rows:
            continue
        cols = list(rows[0].keys())
        key = next((c for c in cols if "Sampling" in c and "All" in c), None) or next(
            (c for c in cols if "Sampling" in c), None
        )
        if key is None:
            print("no stall-sampling column in", cols)
            continue
        num = lambda r, c: float((r.get(c) or "0").replace(",", "") or 0)
        total = sum(num(r, key) for r in rows) or 1.0
        print(f"== {len(rows)} SASS lines; sorted by {key!r}, total {total:.0f}")
        src = next((c for c in cols if c.lower() == "source"), cols[1])
        for r in sorted(rows, key=lambda r: -num(r, key))[:top]:
            print(f"{100 * num(r, key) / total:5.1f}%  {r.get('Address', '')}  {r[src][:90]}")


def library(sparsity, runs):
    """KernelConfig.forward "triton" vs "mosaic" through the kernels' custom_vjp and the sla2_jax module: outputs
    and all gradients of the mosaic path vs the triton path, then medians of forward and forward+backward."""
    import pallas_kernels as pk
    import sla2_jax as sla

    q, k, v, do, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 31, 1, 12, 32760, 128, 128, 64)
    row, outs = dict(sparsity=sparsity), {}
    for kernel in ("triton", "mosaic"):
        kc = library_config(forward=kernel)
        fused = lambda *a, kc=kc: pk.sla2_fused_attention(*a, block_q=128, block_k=64, config=kc)

        def fused_grads(q, k, v, qp, kp, a, do, fused=fused):
            f = lambda *x: jnp.sum(fused(*x[:5], lut, x[5]).astype(jnp.float32) * do)
            return jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, qp, kp, a)

        mcfg = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend="pallas", alpha="mass", kernel=kc)
        module = lambda q, k, v, mcfg=mcfg: sla.sla2_attention(q, k, v, config=mcfg)
        module_grads = lambda q, k, v, do, module=module: jax.grad(
            lambda *x: jnp.sum(module(*x).astype(jnp.float32) * do), argnums=(0, 1, 2)
        )(q, k, v)
        t = {}
        try:
            outs[kernel] = (
                jax.jit(fused)(q, k, v, qp, kp, lut, alpha),
                jax.jit(fused_grads)(q, k, v, qp, kp, alpha, do),
            )
            t["kernel_fwd"] = bench(fused, q, k, v, qp, kp, lut, alpha, runs=runs)
            t["kernel_fwd_bwd"] = bench(fused_grads, q, k, v, qp, kp, alpha, do, runs=runs)
            t["module_fwd"] = bench(module, q, k, v, runs=runs)
            t["module_fwd_bwd"] = bench(module_grads, q, k, v, do, runs=runs)
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_{kernel}", e)
        row[kernel] = t
    if "triton" in outs and "mosaic" in outs:
        (o_t, g_t), (o_m, g_m) = outs["triton"], outs["mosaic"]
        row["rel_o"] = rel(o_m, o_t)
        row["rel_grads_q_k_v_qphi_kphi_alpha"] = [rel(a, b) for a, b in zip(g_m, g_t)]
        row["finite"] = bool(jnp.all(jnp.isfinite(o_m))) and all(bool(jnp.all(jnp.isfinite(g))) for g in g_m)
    row["cudnn_fwd"] = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, k, v)
    print("library", json.dumps(row), flush=True)
    RESULTS.setdefault("library", []).append(row)


def dense_mosaic(runs):
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    n = 32768
    q, k, v = (
        jax.random.normal(jax.random.PRNGKey(i), (1, n, 12, 128), jnp.float32).astype(jnp.float16) for i in range(3)
    )
    flop = 4 * 12 * n * n * 128
    row = {}
    for bkv in (64, 128):
        try:
            cfg = am.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2)
            ms = bench(lambda q, k, v: am.attention(q, k, v, cfg), q, k, v, runs=runs)
            row[f"mosaic_dense_bkv{bkv}_ms"] = ms
            row[f"mosaic_dense_bkv{bkv}_tflops"] = flop / (ms * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            row[f"error_bkv{bkv}"] = f"{type(e).__name__}: {e}"[:2000]
    ms = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, k, v, runs=runs)
    row.update(cudnn_ms=ms, cudnn_tflops=flop / (ms * 1e-3) / 1e12)
    print("dense", json.dumps(row), flush=True)
    RESULTS["dense_n32768"] = row


def main():
    global BASE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--parts", nargs="*", default=["small", "fused_small", "sweep", "wan"], choices=PARTS)
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--trim-sass", default=None)
    ap.add_argument("--ncu-workload", default="wan-1.3b", choices=["wan-1.3b", "wan-14b-720p"],
                    help="ncu_target: the shape (its sparsity: the first --sparsity)")
    ap.add_argument("--loop", default=None, choices=LOOPS, help="KernelConfig.loop of the other parts")
    ap.add_argument("--loops", nargs="*", default=None, choices=list(LOOP_VARIANTS), help="loops part: variants (all)")
    ap.add_argument("--kinds", nargs="*", default=None, help="kernel kinds of the loops part (default: all)")
    ap.add_argument("--pair-steps", action=argparse.BooleanOptionalAction, default=None,
                    help="KernelConfig.pair_steps of the other parts (default: KernelConfig's)")
    args = ap.parse_args()
    if args.trim_sass:
        trim_sass(args.trim_sass)
        return
    os.makedirs(args.out, exist_ok=True)
    changes = {"loop": args.loop, "pair_steps": args.pair_steps}
    BASE = BASE.replace(**{x: val for x, val in changes.items() if val is not None})
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__, config=config_dict(BASE))
    parts = {
        "small": small_checks,
        "fused_small": fused_small_checks,
        "sweep": lambda: sweep(args.runs),
        "wan": lambda: [(wan(s, args.runs), save(args.out)) for s in args.sparsity],
        "library": lambda: [library(s, args.runs) for s in args.sparsity],
        "dense": lambda: dense_mosaic(args.runs),
        "ncu_target": lambda: ncu_target(args.ncu_workload, args.sparsity[0]),
        "trace": trace,
        "cupti": cupti,
        "module_fb": lambda: [(module_fwd_bwd(s, args.runs), save(args.out)) for s in args.sparsity],
        "ring": lambda: [(ring_outputs(s), save(args.out)) for s in args.sparsity],
        "block_k": key_block_size,
        "loops": lambda: loop_variants(args.sparsity, args.loops, args.kinds),
    }
    try:
        for part in args.parts:
            try:
                parts[part]()
            except Exception as e:  # noqa: BLE001
                record_error(RESULTS, f"error_{part}", e)
            sys.stdout.flush()
            save(args.out)  # after every part: a run cut off by its time limit keeps what it measured
    finally:
        save(args.out)


PARTS = (
    "small", "fused_small", "sweep", "wan", "library", "dense", "ncu_target", "trace", "cupti", "module_fb", "ring",
    "block_k", "loops",
)


def save(out_dir):
    with open(os.path.join(out_dir, "probe_mosaic_sparse.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
