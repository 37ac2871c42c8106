"""GPU probe: FP8 P V in the INT8 Mosaic GPU sparse forward ("int8_fp8" on Hopper), in one process with the bf16
and INT8 Mosaic kernels, the Triton int8_fp8 kernel and cuDNN.

    python -m experiments.dev.probe_mosaic_fp8 --out DIR [--sparsity 0.95 0.97] [--iters 20] [--runs 20] [--rounds 2]

1. Small checks first (fresh seed; ragged and whole N, N % 8 == 0, D 64 / 128, bf16 and f16, random LUTs): the FP8
   Mosaic kernel (KernelConfig.p8_operand "registers" and "smem") o_s, lse vs the Triton int8_fp8
   kernel (same quantised Q, K~, V), vs the fake-quant reference (dense float32 over the dequantised Q, K~, V with
   the LUT's mask, P = exp(S - rowmax) quantised to e4m3 with the scale 1/448, divided by the float32 row sum), vs
   the INT8 Mosaic kernel (P V in 16 bit) and vs dense float32 attention (unquantised).
2. wan-1.3b (B=1, H=12, N=32760, D=128, router LUT of experiments.dev.common.wan_setup) per sparsity:
   errors of the FP8 kernel vs bf16 / INT8 Mosaic and Triton int8_fp8 (LSEs without the shift q . mean_N(K));
   the Pallas FP8 V pass vs the XLA one (bits); kernel-only times by CUPTI
   (jax.experimental.mosaic.gpu.profiler.measure, median over iterations of the summed kernel times of one call):
   bf16 Mosaic (stages 4), INT8 Mosaic and INT8+FP8 Mosaic on pre-quantised operands (P8 from registers, from
   shared memory), the FP8 V pass alone (XLA interleaved / plain, Pallas), the INT8 Q pass alone, cuDNN.
3. Module forward (sla2_jax.sla2_attention, backend "pallas", alpha "mass"): quant "int8_fp8" (Mosaic), the same on
   the Triton path (KernelConfig.mosaic_fp8 False), "int8", "none", cuDNN: synchronised medians (experiments.timing)
   in `--rounds` interleaved rounds; errors vs cuDNN and vs the bf16 module. `--lean` drops the Triton kernels, the
   shared-memory variant and the Triton module path.
Each part is guarded (an error is recorded, the next part goes on); JSON to DIR/probe_mosaic_fp8.json after each.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

import sla2_jax as sla
from experiments.dev.common import bench, default_config, kernel_ms, record_error, rel, wan_setup
from experiments.dev.probe_mosaic_int8 import dequantise, masked_dense, random_case, triton_int8_sparse
from pallas_kernels import KernelConfig
from pallas_kernels import mosaic_forward as mf
from pallas_kernels import quantize as qz

RESULTS: dict = {"errors": []}
_LOG2E = math.log2(math.e)


def natural_values(values, block_k=64):
    """Interleaved FP8 V^T -> dequantised V (B, N', H, D) float32 in natural key order (checks the permutation)."""
    v8t, v_scale = values
    b, h, d, nkb = v8t.shape
    inv = np.argsort(np.asarray(qz.P8_KEY_ORDER))
    v8t = v8t.reshape(b, h, d, nkb // 16, 16)[..., inv].reshape(b, h, d, nkb)
    return jnp.transpose(v8t.astype(jnp.float32) * v_scale[..., None], (0, 3, 1, 2))


def fake_quant_fp8_reference(q, v, lut, keys, values, block_k=64):
    """SLA2 int8_fp8 sparse branch in float32: dequantised Q (per 128 rows), K~, V (e4m3 per channel); P = exp(S -
    rowmax) quantised to e4m3 with the scale 1/448 (sla2_jax.quant.fake_quant_probabilities), divided by the float32
    row sum of the unquantised P. Returns (o, lse + q . mean) (lse base 2, of the unquantised P)."""
    _b, n, _h, d = q.shape
    nk = -(-n // block_k)
    q8, q_scale = qz.quantize_blocks(q, 128)
    qd, kd = dequantise(q8, q_scale, 128), dequantise(keys.k8, keys.scale, block_k)
    vd = natural_values(values, block_k)[:, :n]
    sel = jnp.any(lut[..., None] == jnp.arange(nk)[None, None, None, None, :], axis=3)
    mask = jnp.repeat(jnp.repeat(sel, 128, axis=2)[:, :, :n], block_k, axis=3)[..., :n]
    s = jnp.einsum("bnhd,bmhd->bhnm", qd, kd) / math.sqrt(d)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p8 = sla.fake_quant_fp8(p, 1.0 / 448.0)
    o = jnp.einsum("bhnm,bmhd->bnhd", p8 / denom, vd)
    lse = (m[..., 0] + jnp.log(denom[..., 0])) * _LOG2E
    shift = jnp.einsum("bnhd,bhd->bhn", q.astype(jnp.float32), keys.mean) / math.sqrt(d) * _LOG2E
    return o, lse + shift


def triton_fp8_sparse(q, k, v, lut, keys, block_k=64):
    """(o_s, lse) of the Triton int8_fp8 forward kernel alone (no linear branch), Q quantised in the kernel."""
    return triton_int8_sparse(q, k, v, lut, keys, block_k, quant="int8_fp8")


def mosaic_fp8(q, k, v, lut, keys, p8_operand="registers"):
    """The INT8 + FP8 Mosaic kernel with its V pass (and its Q pass: no queries given)."""
    values = qz.quantize_values_fp8(v, 64, interleave=True)
    config = KernelConfig(forward="mosaic", p8_operand=p8_operand)
    return mf.sparse_attention_mosaic_int8(q, k, v, lut, keys, values=values, config=config)


def mosaic_kernel(q, k, v, lut, keys, queries, values=None, p8_operand="registers"):
    """The INT8 (values None) or INT8 + FP8 Mosaic kernel on pre-quantised operands (no passes inside)."""
    config = KernelConfig(forward="mosaic", p8_operand=p8_operand)
    return mf.sparse_attention_mosaic_int8(q, k, v, lut, keys, stages=4, queries=queries, values=values, config=config)


def small_row(seed, n, d, topk, dtype):
    row = {"n": n, "d": d, "topk": topk, "dtype": jnp.dtype(dtype).name}
    q, k, v, lut = random_case(seed, n, d, topk)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    keys = jax.jit(qz.quantize_keys_with_mean, static_argnums=1)(k, 64)
    values = jax.jit(lambda v: qz.quantize_values_fp8(v, 64, interleave=True))(v)
    o_t, lse_t = jax.jit(triton_fp8_sparse)(q, k, v, lut, keys)
    o_f, lse_f = fake_quant_fp8_reference(q, v, lut, keys, values)
    o_d, _ = masked_dense(q, k, v, lut, 64)
    o_i8, _ = jax.jit(mf.sparse_attention_mosaic_int8)(q, k, v, lut, keys)
    row["triton_fp8_vs_fake_quant"] = rel(o_t, o_f)
    row["int8_mosaic_vs_dense"] = rel(o_i8, o_d)
    row["triton_fp8_vs_dense"] = rel(o_t, o_d)
    for operand in ("registers", "smem"):
        try:
            o8, lse8 = jax.jit(mosaic_fp8, static_argnums=5)(q, k, v, lut, keys, operand)
            row[operand] = {
                "vs_triton_fp8": rel(o8, o_t),
                "max_abs_lse_vs_triton_fp8": float(jnp.max(jnp.abs(lse8[:, :, :n] - lse_t[:, :, :n]))),
                "vs_fake_quant": rel(o8, o_f),
                "max_abs_lse_vs_fake_quant": float(jnp.max(jnp.abs(lse8[:, :, :n] - lse_f))),
                "vs_int8_mosaic": rel(o8, o_i8),
                "vs_dense": rel(o8, o_d),
                "finite": bool(jnp.all(jnp.isfinite(o8))) and bool(jnp.all(jnp.isfinite(lse8[:, :, :n]))),
            }
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_{operand}", e)
    return row


def small_checks():
    seed = int.from_bytes(os.urandom(4), "little")
    RESULTS["small_seed"] = seed
    RESULTS["small"] = []
    cases = [(2000, 128, 4, jnp.bfloat16), (1000, 64, 3, jnp.float16), (4096, 64, 6, jnp.bfloat16)]
    cases += [(4096, 128, 5, jnp.float16), (1000, 128, 8, jnp.bfloat16)]
    for n, d, topk, dtype in cases:
        row = {"n": n, "d": d}
        try:
            row = small_row(seed, n, d, topk, dtype)
        except Exception as e:  # noqa: BLE001
            record_error(row, "error", e)
        print("small", json.dumps(row), flush=True)
        RESULTS["small"].append(row)


def cupti_ms(fn, args, iterations):
    """Median over iterations of the summed kernel times (ms) of one call of jit(fn), and the kernels' names."""
    ms, per_iter = kernel_ms(fn, args, iterations)
    return ms, sorted({kn for kn, _ in per_iter[0]})


def wan_sparse(sp, iterations, lean=False):
    q, k, v, _, _qp, _kp, lut, _alpha, cfg = wan_setup(sp, 29, 1, 12, 32760, 128, 128, 64)
    row = {"sparsity": sp, "topk": cfg.topk}
    scale = _LOG2E / math.sqrt(128)
    keys = jax.jit(qz.quantize_keys_with_mean, static_argnums=1)(k, 64)
    qpass = lambda q, mean: qz.quantize_queries(q, 128, mean, scale)
    vpass = lambda v: qz.quantize_values_fp8(v, 64, interleave=True, method="xla")
    queries = qz.QuantisedQueries(*jax.jit(qpass)(q, keys.mean))
    shift = queries.shift
    values = jax.jit(vpass)(v)
    smem = lambda *a: mosaic_kernel(*a, p8_operand="smem")
    cases = {
        "bf16_mosaic": (lambda q, k, v, lut: mf.sparse_attention_mosaic(q, k, v, lut, stages=4), (q, k, v, lut)),
        "int8_mosaic_kernel": (mosaic_kernel, (q, k, v, lut, keys, queries)),
        "fp8_mosaic_kernel": (mosaic_kernel, (q, k, v, lut, keys, queries, values)),
        "fp8_mosaic_kernel_smem": (smem, (q, k, v, lut, keys, queries, values)),
        "fp8_mosaic_with_passes": (mosaic_fp8, (q, k, v, lut, keys)),
        "v_pass": (vpass, (v,)),
        "v_pass_plain": (lambda v: qz.quantize_values_fp8(v, 64, method="xla"), (v,)),
        "v_pass_pallas": (lambda v: qz.quantize_values_fp8(v, 64, interleave=True, method="pallas"), (v,)),
        "q_pass": (qpass, (q, keys.mean)),
        "cudnn": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), (q, k, v)),
    }
    if lean:
        for name in ("fp8_mosaic_kernel_smem", "v_pass_plain"):
            del cases[name]
    try:
        values_p = jax.jit(cases["v_pass_pallas"][0])(v)
        row["v_pass_pallas_differing_bytes"] = int(jnp.sum(values_p[0].view(jnp.uint8) != values[0].view(jnp.uint8)))
        row["v_pass_pallas_scales_equal"] = bool(jnp.all(values_p[1] == values[1]))
        del values_p
    except Exception as e:  # noqa: BLE001
        record_error(row, "error_v_pass_pallas", e)
    outs = {}
    for name in ("bf16_mosaic", "int8_mosaic_kernel", "fp8_mosaic_kernel", "fp8_mosaic_kernel_smem"):
        if name not in cases:
            continue
        fn, args = cases[name]
        try:
            outs[name] = jax.jit(fn)(*args)
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_out_{name}", e)
    try:
        if not lean:
            outs["triton_fp8"] = jax.jit(triton_fp8_sparse)(q, k, v, lut, keys)
            outs["triton_int8"] = jax.jit(triton_int8_sparse)(q, k, v, lut, keys)
    except Exception as e:  # noqa: BLE001
        record_error(row, "error_out_triton", e)
    for name in ("bf16_mosaic", "triton_fp8", "triton_int8"):  # the int8 kernels alone leave the shift q . mean_N(K)
        if name in outs:  # out of their LSE: compare without it
            outs[name] = (outs[name][0], outs[name][1] - shift)
    if "fp8_mosaic_kernel" in outs:
        o8, lse8 = outs["fp8_mosaic_kernel"]
        row["fp8_finite"] = bool(jnp.all(jnp.isfinite(o8)))
        refs = ("bf16_mosaic", "int8_mosaic_kernel", "fp8_mosaic_kernel_smem")
        for ref in refs + ("triton_fp8", "triton_int8"):
            if ref in outs:
                row[f"rel_o_fp8_vs_{ref}"] = rel(o8, outs[ref][0])
                row[f"max_abs_lse_fp8_vs_{ref}"] = float(
                    jnp.max(jnp.abs(lse8[..., :32760] - outs[ref][1][..., :32760]))
                )
    if "int8_mosaic_kernel" in outs and "bf16_mosaic" in outs:
        row["rel_o_int8_vs_bf16_mosaic"] = rel(outs["int8_mosaic_kernel"][0], outs["bf16_mosaic"][0])
    if "triton_fp8" in outs and "triton_int8" in outs:
        row["rel_o_triton_fp8_vs_triton_int8"] = rel(outs["triton_fp8"][0], outs["triton_int8"][0])
    del outs
    times, names = {}, {}
    for name, (fn, args) in cases.items():
        try:
            times[name], names[name] = cupti_ms(fn, args, iterations)
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_time_{name}", e)
    row["cupti_ms"], row["kernels"] = times, names
    if "bf16_mosaic" in times:
        row["speedup_vs_bf16_mosaic"] = {x: times["bf16_mosaic"] / t for x, t in times.items() if "mosaic" in x}
    flop = 4 * 12 * cfg.nq * 128 * cfg.topk * 64 * 128
    row["eff_tflops"] = {x: flop / (t * 1e-3) / 1e12 for x, t in times.items() if "kernel" in x or "bf16" in x}
    print("wan_sparse", json.dumps(row), flush=True)
    return row


def wan_module(sp, runs, rounds, lean=False):
    q, k, v, *_ = wan_setup(sp, 31, 1, 12, 32760, 128, 128, 64)
    row = {"sparsity": sp}
    base = sla.SLA2Config(block_q=128, block_k=64, topk_ratio=round(1 - sp, 4), alpha="mass", backend="pallas")
    fns = {
        x: jax.jit(lambda q, k, v, x=x: sla.sla2_attention(q, k, v, config=base.replace(quant=x)))
        for x in ("none", "int8", "int8_fp8")
    }
    triton_fp8 = base.replace(quant="int8_fp8", kernel=default_config(q.shape[1], q.shape[3], mosaic_fp8=False))
    fns["int8_fp8_triton"] = jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=triton_fp8))
    if lean:
        del fns["int8_fp8_triton"]
    fns["cudnn"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    outs = {}
    for name, fn in fns.items():
        try:
            outs[name] = fn(q, k, v)
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_{name}", e)
    for name in ("none", "int8", "int8_fp8", "int8_fp8_triton"):
        if name in outs and "cudnn" in outs:
            row[f"{name}_err_vs_dense"] = rel(outs[name], outs["cudnn"])
        if name in outs and "none" in outs and name != "none":
            row[f"{name}_err_vs_bf16"] = rel(outs[name], outs["none"])
            row[f"{name}_finite"] = bool(jnp.all(jnp.isfinite(outs[name])))
    del outs
    for rnd in range(1, rounds + 1):
        for name, fn in fns.items():
            try:
                row[f"module_{name}_ms_r{rnd}"] = bench(fn, q, k, v, runs=runs)
            except Exception as e:  # noqa: BLE001
                record_error(row, f"error_time_{name}", e)
    print("wan_module", json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--iters", type=int, default=20, help="CUPTI iterations per kernel")
    ap.add_argument("--runs", type=int, default=20, help="synchronised calls per module median")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parts", nargs="*", default=["small", "sparse", "module"], choices=("small", "sparse", "module"))
    ap.add_argument("--lean", action="store_true", help="no Triton outputs, smem variant, Triton module path")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    path = os.path.join(args.out, "probe_mosaic_fp8.json")

    def save():
        with open(path, "w") as f:
            json.dump(RESULTS, f, indent=1)

    if "small" in args.parts:
        small_checks()
        save()
    for part, fn in (
        ("sparse", lambda sp: wan_sparse(sp, args.iters, args.lean)),
        ("module", lambda sp: wan_module(sp, args.runs, args.rounds, args.lean)),
    ):
        if part not in args.parts:
            continue
        RESULTS[f"wan_{part}"] = []
        for sp in args.sparsity:
            row = {"sparsity": sp}
            try:
                row = fn(sp)
            except Exception as e:  # noqa: BLE001
                record_error(row, "error", e)
            RESULTS[f"wan_{part}"].append(row)
            save()
    print("errors", json.dumps(RESULTS["errors"])[:4000], flush=True)


if __name__ == "__main__":
    main()
