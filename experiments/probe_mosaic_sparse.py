"""GPU probe: the experimental Mosaic GPU sparse forward (pallas_kernels/sparse_mosaic.py) vs the Triton one.

    python -m experiments.probe_mosaic_sparse --out DIR

1. Correctness of sparse_attention_mosaic on small random inputs (ragged and whole N, D 64 / 128) against a dense
   float32 reference with the LUT's token mask (o_s and lse).
2. wan-1.3b (B=1, H=12, N=32760, D=128, bf16) at the given sparsities with the SLA router's LUT: o_s and lse vs
   the Triton sparse-only forward (sparse_linear._forward without a linear branch), then medians of synchronised
   calls of both, of jax's dense Mosaic GPU attention (N=32768) and of cuDNN, in one process.
Each part runs on its own (an error is recorded and the next part goes on); JSON to DIR/probe_mosaic_sparse.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.check_kernels_gpu import wan_setup
from experiments.probe_common import bench, record_error, rel, uniform_lut
from pallas_kernels import sparse_linear as sl
from pallas_kernels.sparse_mosaic import sparse_attention_mosaic

RESULTS: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


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
        (777, 128, 1, jnp.float16),
    ]:
        row = dict(n=n, d=d, topk=topk, dtype=jnp.dtype(dtype).name)
        try:
            rng = np.random.default_rng([seed, n, d])
            b, h, nq, nk = 1, 2, -(-n // 128), -(-n // 64)
            q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), dtype) for _ in range(3))
            lut = uniform_lut(rng, b, h, nq, nk, topk)
            o, lse = jax.jit(sparse_attention_mosaic)(q, k, v, lut)
            o_ref, lse_ref = dense_reference(q, k, v, lut, 128, 64)
            row.update(rel_o=rel(o, o_ref), max_abs_lse=float(jnp.max(jnp.abs(lse[:, :, :n] - lse_ref))))
        except Exception as e:  # noqa: BLE001 - record and go on
            record_error(row, "error", e)
        print("small", json.dumps(row), flush=True)
        rows.append(row)
    RESULTS["small"] = rows


def wan(sparsity, runs):
    q, k, v, _, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 29, 1, 12, 32760, 128, 128, 64)
    row = dict(sparsity=sparsity, topk=cfg.topk)
    flop = 4 * 12 * 32760**2 * 128 * (1 - sparsity)
    cfg0 = cfg._replace(linear=False)
    triton = lambda q, k, v, lut: tuple(
        sl._forward(q, k, v, None, None, lut, None, cfg0, fused=False, residuals=True)[x] for x in ("o_s", "lse")
    )
    t = {}
    try:
        o_t, lse_t = jax.jit(triton)(q, k, v, lut)
        t["triton_sparse_fwd"] = bench(triton, q, k, v, lut, runs=runs)
    except Exception as e:  # noqa: BLE001
        row["triton_error"] = f"{type(e).__name__}: {e}"[:2000]
        o_t = None
    for stages in (2, 3, 4):
        try:
            fn = lambda q, k, v, lut, s=stages: sparse_attention_mosaic(q, k, v, lut, stages=s)
            o_m, lse_m = jax.jit(fn)(q, k, v, lut)
            if o_t is not None and stages == 2:
                row["rel_o_vs_triton"] = rel(o_m, o_t)
                row["max_abs_lse_vs_triton"] = float(jnp.max(jnp.abs(lse_m[:, :, :32760] - lse_t[:, :, :32760])))
            t[f"mosaic_sparse_fwd_stages{stages}"] = bench(fn, q, k, v, lut, runs=runs)
        except Exception as e:  # noqa: BLE001
            record_error(row, f"mosaic_error_stages{stages}", e)
    t["cudnn_fwd"] = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, k, v)
    row["times_ms"] = t
    row["eff_tflops"] = {kk: flop / (vv * 1e-3) / 1e12 for kk, vv in t.items() if kk != "cudnn_fwd"}
    print("wan", json.dumps(row), flush=True)
    RESULTS.setdefault("wan", []).append(row)


def library(sparsity, runs):
    """OPTIONS["fwd_kernel"] "triton" vs "mosaic" through the kernels' custom_vjp and the sla2_jax module: outputs
    and all gradients of the mosaic path vs the triton path, then medians of forward and forward+backward."""
    import pallas_kernels as pk
    import sla2_jax as sla

    q, k, v, do, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 31, 1, 12, 32760, 128, 128, 64)
    row, outs = dict(sparsity=sparsity), {}
    fused = lambda *a: pk.sla2_fused_attention(*a, block_q=128, block_k=64)

    def fused_grads(q, k, v, qp, kp, a, do):
        f = lambda *x: jnp.sum(fused(*x[:5], lut, x[5]).astype(jnp.float32) * do)
        return jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, qp, kp, a)

    mcfg = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend="pallas", alpha="mass")
    module = lambda q, k, v: sla.sla2_attention(q, k, v, config=mcfg)
    module_grads = lambda q, k, v, do: jax.grad(
        lambda *x: jnp.sum(module(*x).astype(jnp.float32) * do), argnums=(0, 1, 2)
    )(q, k, v)
    for kernel in ("triton", "mosaic"):
        jax.clear_caches()
        sl.OPTIONS["fwd_kernel"] = kernel
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
    sl.OPTIONS["fwd_kernel"] = "auto"
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-dense", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    small_checks()
    for s in args.sparsity:
        wan(s, args.runs)
    for s in args.sparsity:
        library(s, args.runs)
    if not args.skip_dense:
        dense_mosaic(args.runs)
    with open(os.path.join(args.out, "probe_mosaic_sparse.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
