"""GPU check: the Mosaic GPU kernels through the library (pallas_kernels.sla2_fused_attention / sla2_jax), per
kernel choice (sparse_linear.OPTIONS "fwd_kernel", "bwd_kernel", "state_dtype": CHOICES).

    python -m experiments.check_mosaic_library --out DIR [--sparsity 0.9 0.95 0.97] [--runs 20]

1. Small random inputs (fresh seed; N whole and ragged, D 64 / 128, bf16 and f16): the fused SLA2 output and its
   six gradients (q, k, v, phi(q), phi(k), alpha) vs jax.grad of the dense float32 reference (SMALL_CHOICES).
2. wan-1.3b (B=1, H=12, N=32760, D=128, bf16, SLA router LUT) per sparsity: output and gradients of each choice vs
   the all-Triton one, then medians of synchronised calls of the backward alone (residuals precomputed), the kernel
   forward+backward and the sla2_jax module forward / forward+backward, with cuDNN in the same process.
Each part runs on its own (an error is recorded and the next part goes on); JSON to DIR/check_mosaic_library.json.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.check_kernels_gpu import wan_setup
from experiments.probe_common import bench, record_error, rel, uniform_lut
from pallas_kernels import sla2_fused_attention
from pallas_kernels import sparse_linear as sl
from pallas_kernels.reference import reference_fused

CHOICES = {  # name: (fwd_kernel, bwd_kernel, state_dtype)
    "triton": ("triton", "triton", "float32"),
    "mosaic_fwd": ("mosaic", "triton", "float32"),
    "mosaic_all": ("mosaic", "mosaic", "float32"),
    "mosaic_all_bf16_states": ("mosaic", "mosaic", "bfloat16"),
}
SMALL_CHOICES = ("mosaic_all", "mosaic_all_bf16_states")  # the all-Triton and Mosaic-forward paths: earlier sessions
GRADS = ("q", "k", "v", "q_phi", "k_phi", "alpha")
RESULTS: dict = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def use(choice):
    """Sets sparse_linear.OPTIONS for a CHOICES entry (and drops compiled functions that baked in the old one)."""
    jax.clear_caches()
    sl.OPTIONS["fwd_kernel"], sl.OPTIONS["bwd_kernel"], sl.OPTIONS["state_dtype"] = CHOICES[choice]


def fused_grads(lut, w, fn=sla2_fused_attention):
    """(q, k, v, q_phi, k_phi, alpha) -> (fused output, six gradients of sum(o * w))."""

    def run(q, k, v, qp, kp, a):
        loss = lambda *x: jnp.sum(fn(*x[:5], lut, x[5], block_q=128, block_k=64).astype(jnp.float32) * w)
        return fn(q, k, v, qp, kp, lut, a, block_q=128, block_k=64), jax.grad(loss, argnums=tuple(range(6)))(
            q, k, v, qp, kp, a
        )

    return run


def small_checks():
    seed = int.from_bytes(os.urandom(4), "little")
    RESULTS["small_seed"] = seed
    rows = []
    for n, d, topk, dtype in [(1000, 128, 3, jnp.bfloat16), (2048, 64, 5, jnp.bfloat16), (776, 64, 2, jnp.float16)]:
        rng = np.random.default_rng([seed, n, d])
        b, h, nq, nk = 1, 2, -(-n // 128), -(-n // 64)
        q, k, v, w = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for _ in range(4))
        k = k - k.mean(axis=1, keepdims=True)
        qp, kp = (jax.nn.softmax(x, axis=-1) for x in (q, k))
        q, k, v, qp, kp = (x.astype(dtype) for x in (q, k, v, qp, kp))
        lut = uniform_lut(rng, b, h, nq, nk, topk)
        alpha = jnp.asarray(rng.uniform(0.2, 0.8, (b, h, nq)), jnp.float32)
        o_ref, g_ref = jax.jit(fused_grads(lut, w, reference_fused))(q, k, v, qp, kp, alpha)
        for choice in SMALL_CHOICES:
            row = dict(n=n, d=d, topk=topk, dtype=jnp.dtype(dtype).name, choice=choice)
            try:
                use(choice)
                o, g = jax.jit(fused_grads(lut, w))(q, k, v, qp, kp, alpha)
                row["rel_o"] = rel(o, o_ref)
                row.update({f"rel_d{name}": rel(a, r) for name, a, r in zip(GRADS, g, g_ref)})
            except Exception as e:  # noqa: BLE001 - record and go on
                record_error(row, "error", e)
            print("small", json.dumps(row), flush=True)
            rows.append(row)
    RESULTS["small"] = rows


def wan(sparsity, runs):
    import sla2_jax as sla

    q, k, v, do, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 41, 1, 12, 32760, 128, 128, 64)
    row, outs = dict(sparsity=sparsity, topk=cfg.topk), {}
    mcfg = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend="pallas", alpha="mass")
    module = lambda q, k, v: sla.sla2_attention(q, k, v, config=mcfg)
    module_grads = lambda q, k, v, do: jax.grad(
        lambda *x: jnp.sum(module(*x).astype(jnp.float32) * do), argnums=(0, 1, 2)
    )(q, k, v)
    run = fused_grads(lut, do.astype(jnp.float32))
    fwd_bwd = lambda *x: run(*x)[1]
    for choice in CHOICES:
        t = {}
        try:
            use(choice)
            outs[choice] = jax.jit(run)(q, k, v, qp, kp, alpha)
            res = jax.jit(lambda *x: sl._fused_fwd(*x, cfg)[1])(q, k, v, qp, kp, lut, alpha)
            t["kernel_bwd"] = bench(lambda res, do: sl._fused_bwd(cfg, res, do), res, do, runs=runs)
            t["kernel_fwd_bwd"] = bench(fwd_bwd, q, k, v, qp, kp, alpha, runs=runs)
            t["module_fwd"] = bench(module, q, k, v, runs=runs)
            t["module_fwd_bwd"] = bench(module_grads, q, k, v, do, runs=runs)
            del res
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_{choice}", e)
        row[f"times_ms_{choice}"] = t
    if "triton" in outs:
        o_t, g_t = outs["triton"]
        for choice in [c for c in CHOICES if c != "triton" and c in outs]:
            o_m, g_m = outs[choice]
            row[f"rel_vs_triton_{choice}"] = {
                "o": rel(o_m, o_t),
                **{f"d{nm}": rel(a, b) for nm, a, b in zip(GRADS, g_m, g_t)},
            }
            row[f"finite_{choice}"] = bool(jnp.all(jnp.isfinite(o_m))) and all(
                bool(jnp.all(jnp.isfinite(g))) for g in g_m
            )
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    cudnn_fb = lambda q, k, v, do: jax.grad(lambda *x: jnp.sum(cudnn(*x).astype(jnp.float32) * do), argnums=(0, 1, 2))(
        q, k, v
    )
    row["cudnn_fwd"] = bench(cudnn, q, k, v, runs=runs)
    row["cudnn_fwd_bwd"] = bench(cudnn_fb, q, k, v, do, runs=runs)
    print("wan", json.dumps(row), flush=True)
    RESULTS.setdefault("wan", []).append(row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.9, 0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--skip-small", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    saved = dict(sl.OPTIONS)
    try:
        if not args.skip_small:
            small_checks()
        for s in args.sparsity:
            wan(s, args.runs)
    finally:
        sl.OPTIONS.update(saved)
        with open(os.path.join(args.out, "check_mosaic_library.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
