"""GPU probe: the Mosaic GPU dK/dV kernel (pallas_kernels/mosaic_dkv.py) vs dense float32 and vs Triton.

    python -m experiments.dev.probe_mosaic_dkv --out DIR [--sparsity 0.95 0.97] [--runs 20] [--skip-small]

1. Small random checks (fresh seed, recorded): ragged and whole N, D 64 / 128, bf16 / f16, alpha None / random,
   LUTs that leave some key blocks unselected. Reference: dk, dv = jax.grad of sum(a_row * dO * o_s) in float32
   (HIGHEST precision) with the LUT's token mask; lse and delta of the kernel's input come from that reference
   (padded rows set to NaN, so unmasked rows >= N would show). Relative errors, finiteness, and the max |dk|, |dv|
   over never-selected key blocks (must be 0).
2. wan-1.3b (B=1, H=12, N=32760, D=128, bf16, router LUT) at each sparsity: dk, dv vs the Triton dkv kernel with
   zero linear terms (pallas_kernels.attention.backward_dkv under KernelConfig(backward="triton")) and without the
   linear branch (cfg.linear=False), then
   kernel-only times (CUPTI) of the Mosaic kernel, then medians of synchronised calls, interleaved twice: Triton
   (incl. its transposed LUT), Mosaic (transposed LUT + kernel) and the Mosaic kernel alone, plus the kernel with
   all counts 0 (its fixed cost per key block: K, V load, exchange, stores); cuDNN forward+backward in the same
   process for scale.
   Effective TFLOP/s = 8 * sum(count) * 128 * 64 * D / time (four matmuls of 128 query rows x 64 keys x D per
   selected (query block, key block) pair, 2 flop per multiply-add).
Every part is in try/except (errors recorded, the next part goes on); JSON to DIR/probe_mosaic_dkv.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.dev.common import bench, config_dict, default_config, error_text, kernel_ms, rel, wan_setup
from pallas_kernels import attention
from pallas_kernels.linear_states import transpose_lut
from pallas_kernels.mosaic_dkv import sparse_attention_dkv_mosaic

RESULTS: dict = {}
HIGHEST = jax.lax.Precision.HIGHEST


def random_lut(rng, b, h, nq, nk, topk):
    """(B, H, Nq, topk) int32 ascending, drawn from a random 3/4 of the key blocks (the rest never selected)."""
    pool = max(topk, (3 * nk) // 4)
    rows = []
    for _ in range(b * h):
        allowed = rng.permutation(nk)[:pool]
        rows.append(np.sort(np.stack([rng.choice(allowed, topk, replace=False) for _ in range(nq)]), axis=-1))
    return jnp.asarray(np.stack(rows).reshape(b, h, nq, topk), jnp.int32)


def dense_reference(q, k, v, do, lut, alpha_rows, block_q=128, block_k=64):
    """float32 dk, dv (B, N, H, D), lse (base 2) and delta (B, H, N) of L = sum(a_row * dO * o_s), masked softmax."""
    _b, n, _h, d = q.shape
    nk = -(-n // block_k)
    sel = jnp.any(lut[..., None] == jnp.arange(nk), axis=3)  # (B, H, Nq, Nk)
    mask = jnp.repeat(jnp.repeat(sel, block_q, axis=2)[:, :, :n], block_k, axis=3)[..., :n]
    q32, do32 = q.astype(jnp.float32), do.astype(jnp.float32)

    def logits(k32):
        s = jnp.einsum("bnhd,bmhd->bhnm", q32, k32, precision=HIGHEST) / math.sqrt(d)
        return jnp.where(mask, s, -jnp.inf)

    def o_s(k32, v32):
        return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits(k32), axis=-1), v32, precision=HIGHEST)

    def loss(k32, v32):
        return jnp.sum(o_s(k32, v32) * do32 * alpha_rows.transpose(0, 2, 1)[..., None])

    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    dk, dv = jax.grad(loss, argnums=(0, 1))(k32, v32)
    lse = jax.nn.logsumexp(logits(k32), axis=-1) * math.log2(math.e)
    delta = alpha_rows * jnp.einsum("bnhd,bnhd->bhn", do32, o_s(k32, v32), precision=HIGHEST)
    return dk, dv, lse, delta


def small_case(seed, n, d, dtype, use_alpha, topk):
    b, h = 1, 2
    nq, nk = -(-n // 128), -(-n // 64)
    rng = np.random.default_rng([seed, n, d, int(use_alpha)])
    q, k, v, do = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in range(4))
    lut = random_lut(rng, b, h, nq, nk, topk)
    alpha = jnp.asarray(rng.uniform(0.3, 0.9, (b, h, nq)), jnp.float32) if use_alpha else None
    alpha_rows = jnp.repeat(alpha, 128, axis=-1)[..., :n] if use_alpha else jnp.ones((b, h, n), jnp.float32)
    dk_ref, dv_ref, lse, delta = jax.jit(dense_reference)(q, k, v, do, lut, alpha_rows)
    pad = ((0, 0), (0, 0), (0, nq * 128 - n))
    lse_p = jnp.pad(lse, pad, constant_values=jnp.nan)
    delta_p = jnp.pad(delta, pad, constant_values=jnp.nan)
    lut_t, count = jax.jit(transpose_lut, static_argnums=1)(lut, nk)
    unselected = np.repeat(np.asarray(count) == 0, 64, axis=-1)[..., :n]  # (B, H, N) keys never selected
    row = {"n": n, "d": d, "dtype": jnp.dtype(dtype).name, "alpha": use_alpha, "topk": topk}
    row["unselected_key_blocks"] = int(np.sum(np.asarray(count) == 0))
    try:
        dk, dv = jax.jit(sparse_attention_dkv_mosaic)(q, k, v, do, lse_p, delta_p, lut_t, count, alpha)
        dk32, dv32 = np.asarray(dk, np.float32), np.asarray(dv, np.float32)
        off = np.transpose(unselected, (0, 2, 1))  # (B, N, H)
        row["mosaic"] = {
            "rel_dk": rel(dk32, dk_ref),
            "rel_dv": rel(dv32, dv_ref),
            "finite": bool(np.isfinite(dk32).all() and np.isfinite(dv32).all()),
            "max_abs_unselected": float(max(np.abs(dk32[off]).max(initial=0), np.abs(dv32[off]).max(initial=0))),
        }
    except Exception as e:  # noqa: BLE001 - record and go on
        row["mosaic"] = {"error": error_text(e)}
        traceback.print_exc()
    print("small", json.dumps(row), flush=True)
    return row


def small_checks():
    seed = int.from_bytes(os.urandom(4), "little")
    RESULTS["small_seed"] = seed
    cases = [
        (1000, 128, jnp.bfloat16, True, 3),
        (2000, 64, jnp.float16, False, 4),
        (4096, 128, jnp.float16, True, 5),
        (4096, 64, jnp.bfloat16, True, 6),
        (904, 64, jnp.bfloat16, True, 2),  # the last query block's second half lies wholly past N
        (2000, 128, jnp.bfloat16, False, 1),
    ]
    rows = []
    for n, d, dtype, use_alpha, topk in cases:
        try:
            rows.append(small_case(seed, n, d, dtype, use_alpha, topk))
        except Exception as e:  # noqa: BLE001
            rows.append({"n": n, "d": d, "error": error_text(e)})
            traceback.print_exc()
    RESULTS["small"] = rows


def wan(sparsity, runs):
    q, k, v, do, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 29, 1, 12, 32760, 128, 128, 64)
    cfg = cfg._replace(config=default_config(cfg.n, cfg.d, forward="triton", backward="triton"))
    b, _n, h, d = q.shape
    row = {"sparsity": sparsity, "topk": cfg.topk, "triton_config": config_dict(cfg.config)}
    fwd = jax.jit(lambda *a: attention.forward(*a, cfg, fused=True, residuals=True))
    res = attention.residuals(q, k, v, qp, kp, lut, alpha, fwd(q, k, v, qp, kp, lut, alpha))
    res_dq = jax.jit(lambda res, do: attention.backward_dq(res, cfg, fused=True, do=do))(res, do)
    totals = (jnp.zeros((b, h, d, d), jnp.float32), jnp.zeros((b, h, d), jnp.float32))
    cfg0 = cfg._replace(linear=False)

    def triton(res, res_dq, totals, do):
        out = attention.backward_dkv(res, res_dq, totals, cfg, fused=True, do=do)
        return out["dk"], out["dv"]

    def triton_sparse(res, res_dq, do):
        out = attention.backward_dkv(res, res_dq, (None, None), cfg0, fused=True, do=do)
        return out["dk"], out["dv"]

    lse, delta = res[9], res_dq["delta"]
    lut_t, count = jax.jit(transpose_lut, static_argnums=1)(lut, cfg.nk)
    flop = 8 * float(jnp.sum(count)) * 128 * 64 * d
    row["flop"] = flop
    t, errs = {}, {}
    try:
        dk_t, dv_t = jax.jit(triton)(res, res_dq, totals, do)
        dk_t0, dv_t0 = jax.jit(triton_sparse)(res, res_dq, do)
        errs["triton_sparse_vs_triton"] = [rel(dk_t0, dk_t), rel(dv_t0, dv_t)]
    except Exception as e:  # noqa: BLE001
        row["triton_error"] = error_text(e)
        traceback.print_exc()
        dk_t = None
    kernel = jax.jit(sparse_attention_dkv_mosaic)
    mosaic_ok = False
    try:
        dk_m, dv_m = kernel(q, k, v, do, lse, delta, lut_t, count, alpha)
        finite = bool(jnp.all(jnp.isfinite(dk_m)) & jnp.all(jnp.isfinite(dv_m)))
        errs["mosaic"] = {"finite": finite}
        if dk_t is not None:
            errs["mosaic"].update(rel_dk=rel(dk_m, dk_t), rel_dv=rel(dv_m, dv_t))
        mosaic_ok = True
    except Exception as e:  # noqa: BLE001
        errs["mosaic"] = {"error": error_text(e)}
        traceback.print_exc()
    row["errors"] = errs
    try:  # kernel-only times (CUPTI): the wall clock of one call carries ~0.2 ms of dispatch + synchronisation
        if mosaic_ok:
            args = (q, k, v, do, lse, delta, lut_t, count, alpha)
            row["cupti_ms"] = {"mosaic": float(kernel_ms(kernel, args, iterations=runs)[0])}
    except Exception as e:  # noqa: BLE001
        row["cupti_error"] = error_text(e)
        traceback.print_exc()

    def with_lut(q, k, v, do, lse, delta, lut, alpha):
        lt, c = transpose_lut(lut, cfg.nk)
        return sparse_attention_dkv_mosaic(q, k, v, do, lse, delta, lt, c, alpha)

    for rep in range(2):  # interleaved twice: the spread between repeats is the noise level
        try:
            if dk_t is not None:
                t.setdefault("triton_dkv", []).append(bench(triton, res, res_dq, totals, do, runs=runs))
                t.setdefault("triton_dkv_no_linear", []).append(bench(triton_sparse, res, res_dq, do, runs=runs))
            if mosaic_ok:
                args = (q, k, v, do, lse, delta)
                t.setdefault("mosaic_with_lut", []).append(bench(with_lut, *args, lut, alpha, runs=runs))
                t.setdefault("mosaic_kernel", []).append(bench(kernel, *args, lut_t, count, alpha, runs=runs))
                # fixed cost per key block: no query block listed
                t.setdefault("mosaic_kernel_count0", []).append(
                    bench(kernel, *args, lut_t, jnp.zeros_like(count), alpha, runs=runs)
                )
        except Exception as e:  # noqa: BLE001
            row[f"timing_error_{rep}"] = error_text(e)
            traceback.print_exc()
    try:
        cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        grads = lambda q, k, v, do: jax.grad(lambda *x: jnp.sum(cudnn(*x).astype(jnp.float32) * do), argnums=(0, 1, 2))(
            q, k, v
        )
        t["cudnn_fwd_bwd"] = [bench(grads, q, k, v, do, runs=runs)]
    except Exception as e:  # noqa: BLE001
        row["cudnn_error"] = error_text(e)
    row["times_ms"] = t
    row["eff_tflops"] = {
        kk: flop / (min(vv) * 1e-3) / 1e12 for kk, vv in t.items() if kk != "cudnn_fwd_bwd" and "count0" not in kk
    }
    print("wan", json.dumps(row), flush=True)
    RESULTS.setdefault("wan", []).append(row)


def summary():
    """A short table of the wan rows (printed last)."""
    lines = []
    for row in RESULTS.get("wan", []):
        lines.append(f"sparsity {row['sparsity']} topk {row['topk']}")
        for name, e in row.get("errors", {}).items():
            lines.append(f"  err {name}: {e}")
        for name, ts in row.get("times_ms", {}).items():
            tf = row["eff_tflops"].get(name)
            lines.append(f"  {name:34s} {' '.join(f'{x:.3f}' for x in ts)} ms" + (f"  {tf:.0f} TFLOP/s" if tf else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    if not args.skip_small:
        small_checks()
    for s in args.sparsity:
        try:
            wan(s, args.runs)
        except Exception as e:  # noqa: BLE001
            RESULTS.setdefault("wan", []).append({"sparsity": s, "error": error_text(e)})
            traceback.print_exc()
    with open(os.path.join(args.out, "probe_mosaic_dkv.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    print(summary())


if __name__ == "__main__":
    main()
