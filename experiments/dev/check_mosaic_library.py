"""GPU check: the Mosaic GPU kernels through the library (pallas_kernels.sla2_fused_attention / sla2_jax), per
kernel choice (a KernelConfig's forward, backward and state_dtype: CHOICES).

    python -m experiments.dev.check_mosaic_library --out DIR [--sparsity 0.9 0.95 0.97] [--runs 20]
        [--choices triton mosaic_all ...] [--small-only | --skip-small]

1. Small random inputs (fresh seed; N whole and ragged, D 64 / 128, bf16 and f16): the fused SLA2 output and its
   six gradients (q, k, v, phi(q), phi(k), alpha) vs jax.grad of the dense float32 reference (SMALL_CHOICES).
2. wan-1.3b (B=1, H=12, N=32760, D=128, bf16, SLA router LUT) per sparsity: output and gradients of each choice vs
   the all-Triton one, then medians of synchronised calls of the backward alone (residuals precomputed), the kernel
   forward+backward and the sla2_jax module forward / forward+backward, with cuDNN in the same process.
Each part runs on its own (an error is recorded and the next part goes on); JSON to DIR/check_mosaic_library.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.dev.common import bench, config_dict, default_config, record_error, rel, uniform_lut, wan_setup
from experiments.dev.common import with_config
from pallas_kernels import attention, sla2_fused_attention
from pallas_kernels.reference import reference_fused

CHOICES = {  # name: (forward, backward, state_dtype) of the KernelConfig (the rest: heuristic_config's)
    "triton": ("triton", "triton", "float32"),
    "mosaic_fwd": ("mosaic", "triton", "float32"),
    "mosaic_all": ("mosaic", "mosaic", "float32"),
    "mosaic_all_bf16_states": ("mosaic", "mosaic", "bfloat16"),
}
SMALL_CHOICES = tuple(CHOICES)
GRADS = ("q", "k", "v", "q_phi", "k_phi", "alpha")
RESULTS: dict = {}


def choice_config(choice, n, d, dtype):
    """The KernelConfig of a CHOICES entry for a call of this shape: heuristic_config's launch parameters and the
    choice's forward, backward and state_dtype."""
    forward, backward, state_dtype = CHOICES[choice]
    return default_config(n, d, dtype, forward=forward, backward=backward, state_dtype=state_dtype)


def fused_grads(lut, w, fn=sla2_fused_attention, config=None, linear_scope="complement"):
    """(q, k, v, q_phi, k_phi, alpha) -> (fused output, six gradients of sum(o * w)); config: the KernelConfig
    (None for the reference, which takes none)."""
    if config is not None:
        fn = functools.partial(fn, config=config)

    def run(q, k, v, qp, kp, a):
        kw = dict(block_q=128, block_k=64, linear_scope=linear_scope)
        loss = lambda *x: jnp.sum(fn(*x[:5], lut, x[5], **kw).astype(jnp.float32) * w)
        return fn(q, k, v, qp, kp, lut, a, **kw), jax.grad(loss, argnums=tuple(range(6)))(
            q, k, v, qp, kp, a
        )

    return run


def small_checks(choices, linear_scope="complement"):
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
        o_ref, g_ref = jax.jit(fused_grads(lut, w, reference_fused, linear_scope=linear_scope))(q, k, v, qp, kp, alpha)
        for choice in choices:
            row = dict(n=n, d=d, topk=topk, dtype=jnp.dtype(dtype).name, choice=choice, linear_scope=linear_scope)
            try:
                config = choice_config(choice, n, d, dtype)
                row["config"] = config_dict(config)
                o, g = jax.jit(fused_grads(lut, w, config=config, linear_scope=linear_scope))(q, k, v, qp, kp, alpha)
                row["rel_o"] = rel(o, o_ref)
                row.update({f"rel_d{name}": rel(a, r) for name, a, r in zip(GRADS, g, g_ref)})
            except Exception as e:  # noqa: BLE001 - record and go on
                record_error(row, "error", e)
            print("small", json.dumps(row), flush=True)
            rows.append(row)
    RESULTS["small"] = rows
    for choice in choices:
        mine = [r for r in rows if r["choice"] == choice]
        errors = [r["error"][:200] for r in mine if "error" in r]
        worst = max((v for r in mine for key, v in r.items() if key.startswith("rel_")), default=None)
        print(f"small {choice}: worst relative error {worst}" + (f", errors {errors}" if errors else ""), flush=True)


def fused_residuals(q, k, v, qp, kp, lut, alpha, cfg):
    """The Residuals of the fused forward (what its custom_vjp keeps for the backward)."""
    out = attention.forward(q, k, v, qp, kp, lut, alpha, cfg, fused=True, residuals=True)
    return attention.residuals(q, k, v, qp, kp, lut, alpha, out)


def wan(sparsity, runs, choices):
    import sla2_jax as sla

    q, k, v, do, qp, kp, lut, alpha, cfg0 = wan_setup(sparsity, 41, 1, 12, 32760, 128, 128, 64)
    row, outs = dict(sparsity=sparsity, topk=cfg0.topk), {}
    for choice in choices:
        t = {}
        try:
            config = choice_config(choice, cfg0.n, cfg0.d, q.dtype)
            row[f"config_{choice}"] = config_dict(config)
            cfg = with_config(cfg0, config)
            mcfg = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend="pallas", alpha="mass", kernel=config)
            module = lambda q, k, v, mcfg=mcfg: sla.sla2_attention(q, k, v, config=mcfg)
            module_grads = lambda q, k, v, do, module=module: jax.grad(
                lambda *x: jnp.sum(module(*x).astype(jnp.float32) * do), argnums=(0, 1, 2)
            )(q, k, v)
            run = fused_grads(lut, do.astype(jnp.float32), config=config)
            fwd_bwd = lambda *x, run=run: run(*x)[1]
            outs[choice] = jax.jit(run)(q, k, v, qp, kp, alpha)
            res = jax.jit(lambda *x, cfg=cfg: fused_residuals(*x, cfg))(q, k, v, qp, kp, lut, alpha)
            bwd = lambda res, do, cfg=cfg: attention.backward(res, cfg, fused=True, do=do)
            t["kernel_bwd"] = bench(bwd, res, do, runs=runs)
            t["kernel_fwd_bwd"] = bench(fwd_bwd, q, k, v, qp, kp, alpha, runs=runs)
            t["module_fwd"] = bench(module, q, k, v, runs=runs)
            t["module_fwd_bwd"] = bench(module_grads, q, k, v, do, runs=runs)
            del res
        except Exception as e:  # noqa: BLE001
            record_error(row, f"error_{choice}", e)
        row[f"times_ms_{choice}"] = t
    if "triton" in outs:
        o_t, g_t = outs["triton"]
        for choice in [c for c in choices if c != "triton" and c in outs]:
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.9, 0.95, 0.97])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--choices", nargs="*", default=list(CHOICES), choices=list(CHOICES),
                    help="kernel choices to check (default: all); the wan part compares each with 'triton'")
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--small-only", action="store_true", help="only the small checks against the dense reference")
    ap.add_argument("--linear-scope", default="complement", choices=["complement", "all"],
                    help="linear scope of the small checks")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    small = [c for c in args.choices if c in SMALL_CHOICES]
    try:
        if not args.skip_small:
            small_checks(small, args.linear_scope)
        for s in [] if args.small_only else args.sparsity:
            wan(s, args.runs, args.choices)
    finally:
        name = "check_mosaic_library" + ("" if args.linear_scope == "complement" else f"_{args.linear_scope}")
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
