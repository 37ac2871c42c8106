"""Check and time the Pallas SLA kernels on a GPU (one process, side by side with cuDNN).

  python -m experiments.dev.check_kernels_gpu [--out DIR] [--sparsity 0.9 0.95 0.97] [--skip-small] [--skip-xla]
      [--forward mosaic|triton] [--backward mosaic|triton]

1. Small shapes (ragged N, D 64/128, both scopes, fused and not): forward and gradients vs the dense float32
   reference of pallas_kernels.reference (relative error, norm-wise).
2. wan-1.3b (B=1, H=12, N=32760, D=128, bf16) at each sparsity, LUT from the SLA router on random inputs:
   - relative error of forward and gradients vs the "xla" backend of sla2_jax (if importable),
   - median times (>= 20 runs after warm-up, block_until_ready) of: cuDNN forward and forward+backward, the
     kernel forward (branches / fused), kernel forward+backward (fused, grads w.r.t. q, k, v, phi(q), phi(k),
     alpha), the module (phi + router + fused kernel) forward and forward+backward (grads w.r.t. q, k, v), and
     the stages (router, pre-pass, forward kernel with residuals, backward kernels).
3. --variants A B ...: kernel variants (KernelConfig changes, VARIANTS below) on wan-1.3b at the first --sparsity:
   relative error of the fused forward and of all six gradients vs the first variant listed and (branches path) vs
   the xla backend, then per-stage medians of each, side by side. --fwd-variants: the forward alone (FWD_VARIANTS).
Every part runs with the KernelConfig of --forward / --backward (default: heuristic_config for the shape on this GPU),
passed as config= (or in the KernelCall of the stage functions of pallas_kernels.attention).
Writes JSON to DIR/check_kernels_gpu.json and prints a table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from experiments.dev.common import bench, config_dict, kernel_call, normal_qkv, phi, random_lut, rel, router_lut
from experiments.dev.common import wan_setup
from pallas_kernels import attention, linear_states
from pallas_kernels import reference as ref

RESULTS: dict = {"meta": {}, "small": [], "wan": []}
FAMILIES: dict = {}  # {"forward": ..., "backward": ...} from --forward / --backward (empty: heuristic_config's)


def base_config(n, d, dtype=jnp.bfloat16, bq=128, bk=64, **changes):
    """heuristic_config for the shape on this GPU with --forward / --backward applied, then `changes`."""
    family = {x: f for x, f in FAMILIES.items() if f is not None}
    if "mosaic" in family.values() and pk.mosaic_supports(n, d, dtype, bq, bk) is not None:
        family = {}  # a shape the Mosaic kernels cannot run (f32, ragged N % 8): the heuristic's Triton kernels
    return pk.heuristic_config(n, d, dtype, bq, bk).replace(**family, **changes)


def inputs(key, b, n, h, d, dtype):
    return normal_qkv(key, b, n, h, d, dtype)


# --------------------------------------------------------------------------------------------------------
def check_small():
    key = jax.random.PRNGKey(1)
    for n, d, dtype, scope, topk_frac in [
        (1000, 128, jnp.bfloat16, "complement", 0.25),
        (333, 64, jnp.bfloat16, "all", 0.4),
        (1000, 64, jnp.float16, "complement", 0.5),
        (777, 128, jnp.float32, "complement", 0.3),
        (200, 128, jnp.bfloat16, "complement", 1.0),
    ]:
        key, k1, k2, k3, k4 = jax.random.split(key, 5)
        b, h, bq, bk = 2, 3, 128, 64
        nq, nk = -(-n // bq), -(-n // bk)
        topk = max(1, int(round(topk_frac * nk)))
        q, k, v = inputs(k1, b, n, h, d, dtype)
        qp, kp = phi(q), phi(k)
        lut = random_lut(k2, b, h, nq, nk, topk)
        alpha = jax.random.uniform(k3, (b, h, nq), jnp.float32)
        w1, w2 = (jax.random.normal(kk, (b, n, h, d), jnp.float32) for kk in jax.random.split(k4))
        kw = dict(block_q=bq, block_k=bk, linear_scope=scope)
        kc = base_config(n, d, dtype, bq, bk)

        def loss_br(fn):
            def f(q, k, v, qp, kp):
                o_s, o_l = fn(q, k, v, qp, kp, lut, **kw)
                return jnp.sum(o_s.astype(jnp.float32) * w1) + jnp.sum(o_l.astype(jnp.float32) * w2)

            return f

        def loss_fu(fn):
            def f(q, k, v, qp, kp, a):
                return jnp.sum(fn(q, k, v, qp, kp, lut, a, **kw).astype(jnp.float32) * w1)

            return f

        row = dict(n=n, d=d, dtype=jnp.dtype(dtype).name, scope=scope, topk=topk, nk=nk, config=config_dict(kc))
        sparse_linear = functools.partial(pk.sparse_linear_attention, config=kc)
        fused = functools.partial(pk.sla2_fused_attention, config=kc)
        try:
            o = jax.jit(lambda *a: sparse_linear(*a, **kw))(q, k, v, qp, kp, lut)
            r = ref.reference_branches(q, k, v, qp, kp, lut, **kw)
            row["fwd_o_s"], row["fwd_o_l"] = (
                rel(o[0], r[0]),
                rel(o[1], r[1]) if topk < nk else float(jnp.abs(o[1]).max()),
            )
            g = jax.jit(jax.grad(loss_br(sparse_linear), argnums=(0, 1, 2, 3, 4)))(q, k, v, qp, kp)
            gr = jax.grad(loss_br(ref.reference_branches), argnums=(0, 1, 2, 3, 4))(q, k, v, qp, kp)
            row["grad"] = [rel(a, bb) for a, bb in zip(g, gr)]
            of = jax.jit(lambda *a: fused(*a, **kw))(q, k, v, qp, kp, lut, alpha)
            row["fused_fwd"] = rel(of, ref.reference_fused(q, k, v, qp, kp, lut, alpha, **kw))
            g = jax.jit(jax.grad(loss_fu(fused), argnums=(0, 1, 2, 3, 4, 5)))(q, k, v, qp, kp, alpha)
            gr = jax.grad(loss_fu(ref.reference_fused), argnums=(0, 1, 2, 3, 4, 5))(q, k, v, qp, kp, alpha)
            row["fused_grad"] = [rel(a, bb) for a, bb in zip(g, gr)]
        except Exception as e:  # keep going: report
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        print("small", json.dumps(row), flush=True)
        RESULTS["small"].append(row)


# --------------------------------------------------------------------------------------------------------
def wan(sparsity, b=1, h=12, n=32760, d=128, check_xla=True, bq=128, bk=64, runs=20):
    row = dict(
        workload="wan-1.3b" if (h, d) == (12, 128) else f"B{b}H{h}N{n}D{d}",
        sparsity=sparsity,
        b=b,
        h=h,
        n=n,
        d=d,
        block_q=bq,
        block_k=bk,
    )
    key = jax.random.PRNGKey(int(sparsity * 1000))
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = inputs(k1, b, n, h, d, jnp.bfloat16)
    do = jax.random.normal(k2, q.shape, jnp.float32).astype(jnp.bfloat16)
    nq, nk = -(-n // bq), -(-n // bk)
    topk = max(1, int(nk * (1 - sparsity) + 1e-6))
    row["topk"], row["nk"] = topk, nk
    lut = jax.jit(router_lut, static_argnums=(2, 3, 4))(q, k, topk, bq, bk)
    qp, kp = jax.jit(phi)(q), jax.jit(phi)(k)
    alpha = jax.random.uniform(k3, (b, h, nq), jnp.float32, 0.3, 0.9)
    kc = base_config(n, d, q.dtype, bq, bk)
    row["config"] = config_dict(kc)
    kw = dict(block_q=bq, block_k=bk, config=kc)
    eff_flop = 4 * b * h * n * n * d * (1 - sparsity)
    t = {}

    def timed(name, fn, *args):
        try:
            t[name] = bench(fn, *args, runs=runs)
        except Exception as e:
            t[name] = None
            row.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        print(f"  {row['workload']} {sparsity} {name}: {t[name]}", flush=True)

    # cuDNN baselines
    def cudnn_fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    def cudnn_fb(q, k, v, do):
        return jax.grad(lambda q, k, v: jnp.sum(cudnn_fwd(q, k, v).astype(jnp.float32) * do), argnums=(0, 1, 2))(
            q, k, v
        )

    timed("cudnn_fwd", cudnn_fwd, q, k, v)
    timed("cudnn_fwd_bwd", cudnn_fb, q, k, v, do)

    # kernels only (precomputed LUT, phi)
    timed("kernel_fwd_branches", lambda *a: pk.sparse_linear_attention(*a, **kw), q, k, v, qp, kp, lut)
    timed("kernel_fwd_fused", lambda *a: pk.sla2_fused_attention(*a, **kw), q, k, v, qp, kp, lut, alpha)
    timed(
        "kernel_fwd_fused_scope_all",
        lambda *a: pk.sla2_fused_attention(*a, linear_scope="all", **kw),
        q,
        k,
        v,
        qp,
        kp,
        lut,
        alpha,
    )

    def kernel_fb(q, k, v, qp, kp, a, do):
        f = lambda *x: jnp.sum(pk.sla2_fused_attention(*x[:5], lut, x[5], **kw).astype(jnp.float32) * do)
        return jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, qp, kp, a)

    timed("kernel_fwd_bwd_fused", kernel_fb, q, k, v, qp, kp, alpha, do)

    # module: phi + router + fused kernel (+ alpha constant)
    def module(q, k, v, a):
        l = jax.lax.stop_gradient(router_lut(q, k, topk, bq, bk))
        return pk.sla2_fused_attention(q, k, v, phi(q), phi(k), l, a, **kw)

    def module_fb(q, k, v, a, do):
        return jax.grad(lambda q, k, v: jnp.sum(module(q, k, v, a).astype(jnp.float32) * do), argnums=(0, 1, 2))(
            q, k, v
        )

    timed("module_fwd", module, q, k, v, alpha)
    timed("module_fwd_bwd", module_fb, q, k, v, alpha, do)

    # stages
    timed("stage_router", lambda q, k: router_lut(q, k, topk, bq, bk), q, k)
    timed("stage_phi", lambda q, k: (phi(q), phi(k)), q, k)
    cfg = kernel_call(q, lut, block_q=bq, block_k=bk, config=kc)
    timed("stage_prepass", lambda kp, v: linear_states.outer_sum(kp, v, cfg), kp, v)
    timed("stage_complement_states", lambda kp, v, lut: linear_states.complement_states(kp, v, lut, cfg), kp, v, lut)
    timed(
        "stage_fwd_kernel_residuals",
        lambda *a: attention.forward(*a, cfg, fused=True, residuals=True),
        q,
        k,
        v,
        qp,
        kp,
        lut,
        alpha,
    )
    timed("stage_transpose_lut", lambda l: linear_states.transpose_lut(l, nk), lut)
    try:
        out = jax.jit(lambda *a: attention.forward(*a, cfg, fused=True, residuals=True))(q, k, v, qp, kp, lut, alpha)
        res = attention.residuals(q, k, v, qp, kp, lut, alpha, out)
        timed("stage_bwd_kernels", lambda res, do: attention.backward(res, cfg, fused=True, do=do), res, do)
        timed("stage_bwd_dq", lambda res, do: attention.backward_dq(res, cfg, fused=True, do=do), res, do)
        res_dq = jax.jit(lambda res, do: attention.backward_dq(res, cfg, fused=True, do=do))(res, do)
        timed(
            "stage_bwd_totals",
            lambda res, rdq, do: attention.backward_states(res, rdq, cfg, fused=True, do=do),
            res,
            res_dq,
            do,
        )
        tot = jax.jit(lambda res, rdq, do: attention.backward_states(res, rdq, cfg, fused=True, do=do))(res, res_dq, do)
        timed(
            "stage_bwd_dkv_incl_transpose",
            lambda res, rdq, tot, do: attention.backward_dkv(res, rdq, tot, cfg, fused=True, do=do),
            res,
            res_dq,
            tot,
            do,
        )
        del out, res, res_dq, tot
    except Exception:
        traceback.print_exc()

    row["times_ms"] = t
    c = t.get("cudnn_fwd")
    cb = t.get("cudnn_fwd_bwd")
    sp = {}
    for name, base in (
        ("kernel_fwd_fused", c),
        ("module_fwd", c),
        ("kernel_fwd_branches", c),
        ("kernel_fwd_bwd_fused", cb),
        ("module_fwd_bwd", cb),
    ):
        if t.get(name) and base:
            sp[name] = base / t[name]
    row["speedup_vs_cudnn"] = sp
    if t.get("kernel_fwd_fused"):
        row["kernel_fwd_eff_tflops"] = eff_flop / t["kernel_fwd_fused"] / 1e9
    if c:
        row["cudnn_fwd_tflops"] = 4 * b * h * n * n * d / c / 1e9  # dense non-causal forward: 4 N^2 D per head

    # Memory of the compiled programs (arguments + outputs + temporaries, XLA memory analysis), GiB.
    def mem_gib(fn, *args):
        try:
            m = jax.jit(fn).lower(*args).compile().memory_analysis()
            return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes) / 2**30
        except Exception as e:
            return f"{type(e).__name__}"

    row["mem_gib"] = dict(
        cudnn_fwd_bwd=mem_gib(cudnn_fb, q, k, v, do),
        module_fwd_bwd=mem_gib(module_fb, q, k, v, alpha, do),
        cudnn_fwd=mem_gib(cudnn_fwd, q, k, v),
        module_fwd=mem_gib(module, q, k, v, alpha),
    )

    # correctness vs the xla backend of sla2_jax
    if check_xla:
        try:
            o_s, o_l = jax.jit(lambda *a: pk.sparse_linear_attention(*a, **kw))(q, k, v, qp, kp, lut)
            rel_fwd = xla_forward_check(q, k, v, qp, kp, lut, o_s, o_l, nk, bq, bk, d)
            row["xla_rel_fwd_o_s"], row["xla_rel_fwd_o_l"] = rel_fwd
            w2 = jax.random.normal(k3, q.shape, jnp.float32).astype(jnp.bfloat16)
            row["xla_rel_grad_q_k_v_qphi_kphi"], gp = xla_grads_check(q, k, v, qp, kp, lut, do, w2, nk, bq, bk, d, kc)
            row["nan_free"] = bool(all(jnp.all(jnp.isfinite(x)) for x in gp))
        except Exception as e:
            row["xla_check_error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
    print("wan", json.dumps(row), flush=True)
    RESULTS["wan"].append(row)


# Variants of the --variants / --fwd-variants parts: name -> KernelConfig changes of the base config. Launch
# parameters of the Triton kernels as {kernel: (num_warps, num_stages, rows)}.
def _launch(**kernels):
    return {"launch": tuple((kernel, tuple(params)) for kernel, params in kernels.items())}


VARIANTS = {
    "default": {},
    "triton": {"forward": "triton", "backward": "triton"},
    "triton_dkv4232": {"forward": "triton", "backward": "triton", **_launch(dkv=(4, 2, 32))},
    "triton_dkv4364": {"forward": "triton", "backward": "triton", **_launch(dkv=(4, 3, 64))},
    "triton_dkv42128": {"forward": "triton", "backward": "triton", **_launch(dkv=(4, 2, 128))},
    "triton_dkv41128": {"forward": "triton", "backward": "triton", **_launch(dkv=(4, 1, 128))},
    "triton_dkv8264": {"forward": "triton", "backward": "triton", **_launch(dkv=(8, 2, 64))},
    "triton_dq4264": {"forward": "triton", "backward": "triton", **_launch(dq=(4, 2, 64))},
    "triton_fwd4364": {"forward": "triton", "backward": "triton", **_launch(fwd=(4, 3, 64))},
    "mosaic_fwd": {"forward": "mosaic", "backward": "triton"},
    "mosaic": {"forward": "mosaic", "backward": "mosaic"},
    "mosaic_f32_states": {"forward": "mosaic", "backward": "mosaic", "state_dtype": "float32"},
    "mosaic_triton_epilogue": {"forward": "mosaic", "backward": "mosaic", "epilogue": "triton"},
}

# Forward variants (--fwd-variants), the first the reference; the first runs at every --sparsity, the others at the
# first only. Schedules measured before and no faster are in docs/dev/forward_kernel.md.
FWD_VARIANTS = {
    "fwd_triton": {"forward": "triton"},
    "fwd_triton_keys128": {"forward": "triton", **_launch(fwd=(8, 2, 128))},
    "fwd_triton_w8s4": {"forward": "triton", **_launch(fwd=(8, 4, 64))},
    "fwd_triton_w8s2": {"forward": "triton", **_launch(fwd=(8, 2, 64))},
    "fwd_mosaic": {"forward": "mosaic"},
    "fwd_mosaic_pipelined": {"forward": "mosaic", "loop": "pipelined"},
}


def variant_config(changes, n, d, bq=128, bk=64):
    """The base config (heuristic_config, --forward / --backward) with a variant's changes; launch entries are merged
    into the base's table."""
    changes = dict(changes)
    base = base_config(n, d, jnp.bfloat16, bq, bk)
    if "launch" in changes:
        table = dict(base.launch)
        table.update(dict(changes.pop("launch")))
        changes["launch"] = tuple(table.items())
    return base.replace(**changes)


def compare_fwd_variants(names, sparsities, b=1, h=12, n=32760, d=128, bq=128, bk=64, runs=20, out_dir="."):
    """Forward only: per sparsity, the fused forward of each variant vs the first (and the first's branches vs the
    xla backend), then medians of the forward-only call (primal), the VJP forward (residuals) and the states."""
    out = RESULTS.setdefault("fwd_variants", {})
    for si, sparsity in enumerate(sparsities):
        q, k, v, _, qp, kp, lut, alpha, cfg0 = wan_setup(sparsity, 29, b, h, n, d, bq, bk)
        topk, nk = cfg0.topk, cfg0.nk
        row = dict(topk=topk, nk=nk, variants={})
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"  # xla: CPU smoke runs of this script
        row["cudnn_fwd"] = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl), q, k, v)
        first = None
        for name in names if si == 0 else names[:1]:
            r, t = {}, {}
            try:
                kc = variant_config(FWD_VARIANTS[name], n, d, bq, bk)
                r["config"] = config_dict(kc)
                cfg = cfg0._replace(config=kc)
                kw = dict(block_q=bq, block_k=bk, config=kc)
                fused = lambda *a, kw=kw: pk.sla2_fused_attention(*a, **kw)
                vjp_fwd = lambda *a, cfg=cfg: attention.forward(*a, cfg, fused=True, residuals=True)["o"]
                o = jax.jit(fused)(q, k, v, qp, kp, lut, alpha)
                o_vjp = jax.jit(vjp_fwd)(q, k, v, qp, kp, lut, alpha)
                r["finite"] = bool(jnp.all(jnp.isfinite(o)))
                r["rel_primal_vs_vjp_fwd"] = rel(o, o_vjp)
                if first is None:
                    first = o
                    o_s, o_l = jax.jit(lambda *a: pk.sparse_linear_attention(*a, **kw))(q, k, v, qp, kp, lut)
                    r["rel_xla_o_s_o_l"] = xla_forward_check(q, k, v, qp, kp, lut, o_s, o_l, nk, bq, bk, d)
                    del o_s, o_l
                else:
                    r["rel_fwd_vs_first"] = rel(o, first)
                del o, o_vjp
                t["primal_fwd"] = bench(fused, q, k, v, qp, kp, lut, alpha, runs=runs)
                t["vjp_fwd"] = bench(vjp_fwd, q, k, v, qp, kp, lut, alpha, runs=runs)
                if si == 0 or name == names[0]:
                    states = lambda kp, v, l, cfg=cfg: linear_states.complement_states(kp, v, l, cfg)
                    t["states"] = bench(states, kp, v, lut)
                    sums = lambda kp, v, cfg=cfg: linear_states.outer_sum(kp, v, cfg, block_rows=bk)
                    t["outer_sum_key_blocks"] = bench(sums, kp, v)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"[:1500]
                traceback.print_exc()
            r["times_ms"] = t
            row["variants"][name if name not in row["variants"] else name + " (again)"] = r
            print("fwd variant", sparsity, name, json.dumps(r), flush=True)
            out[str(sparsity)] = row
            with open(os.path.join(out_dir, "check_kernels_gpu.json"), "w") as f:
                json.dump(RESULTS, f, indent=1)
    print("\n| sparsity | variant | primal fwd ms | vjp fwd ms | states ms | outer sum ms | rel vs first | cuDNN ms |")
    print("|---|---|---|---|---|---|---|---|")
    for sp, row in out.items():
        for name, r in row["variants"].items():
            tt = r["times_ms"]
            f = lambda c: f"{tt[c]:.3f}" if tt.get(c) else "-"
            rv = r.get("rel_fwd_vs_first", r.get("rel_xla_o_s_o_l", r.get("error", "")[:60]))
            print(
                f"| {sp} | {name} | {f('primal_fwd')} | {f('vjp_fwd')} | {f('states')} | "
                f"{f('outer_sum_key_blocks')} | {rv} | {row['cudnn_fwd']:.3f} |"
            )


def xla_forward_check(q, k, v, qp, kp, lut, o_s, o_l, nk, bq, bk, d):
    """[rel o_s, rel o_l] of the kernel's branches vs the xla backend of sla2_jax."""
    from sla2_jax import xla_backend
    from sla2_jax.routing import selection_mask

    xs = jax.jit(lambda q, k, v, l: xla_backend.xla_sparse(q, k, v, l, block_q=bq, block_k=bk, scale=d**-0.5))
    xl = jax.jit(
        lambda qp, kp, v, l: xla_backend.xla_linear(qp, kp, v, selection_mask(l, nk), block_q=bq, block_k=bk, eps=1e-6)
    )
    return [rel(o_s, xs(q, k, v, lut)), rel(o_l, xl(qp, kp, v, lut))]


def compare_variants(names, sparsity, b=1, h=12, n=32760, d=128, bq=128, bk=64, runs=20, check_xla=True, out_dir="."):
    """Correctness (vs the first variant and the xla backend) and per-stage medians of each variant, one process."""
    q, k, v, do, qp, kp, lut, alpha, cfg0 = wan_setup(sparsity, 17, b, h, n, d, bq, bk)
    topk, nk = cfg0.topk, cfg0.nk
    out = dict(sparsity=sparsity, topk=topk, nk=nk, variants={})
    t0 = {}
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"  # xla: CPU smoke runs of this script
    t0["cudnn_fwd"] = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl), q, k, v)

    def cudnn_fb(q, k, v, do):
        f = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32) * do)
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    t0["cudnn_fwd_bwd"] = bench(cudnn_fb, q, k, v, do)
    out["cudnn"] = t0
    print("cudnn", t0, flush=True)

    # the per-block linear states, piece by piece (the base config)
    cfg = cfg0._replace(config=base_config(n, d, q.dtype, bq, bk))
    w = jax.random.uniform(jax.random.PRNGKey(3), (b, h, cfg.npad), jnp.float32)  # row weights, timing only
    t0["states_outer_sum_key_blocks"] = bench(lambda kp, v: linear_states.outer_sum(kp, v, cfg, block_rows=bk), kp, v)
    t0["states_outer_sum_query_blocks"] = bench(
        lambda qp, do, w: linear_states.outer_sum(qp, do, cfg, w, w, block_rows=bq), qp, do, w
    )
    t0["states_complement_fwd"] = bench(
        lambda kp, v, lut: linear_states.complement_states(kp, v, lut, cfg), kp, v, lut
    )
    t0["states_masked_matmul_fwd_derived"] = t0["states_complement_fwd"] - t0["states_outer_sum_key_blocks"]
    print("states", t0, flush=True)

    first = None
    for name in names:
        row, t = {}, {}
        try:
            kc = variant_config(VARIANTS[name], n, d, bq, bk)
            row["config"] = config_dict(kc)
            cfg = cfg0._replace(config=kc)
            kw = dict(block_q=bq, block_k=bk, config=kc)

            def kernel_fb(q, k, v, qp, kp, a, do, kw=kw):
                f = lambda *x: jnp.sum(pk.sla2_fused_attention(*x[:5], lut, x[5], **kw).astype(jnp.float32) * do)
                return jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, qp, kp, a)

            o = jax.jit(lambda *a: pk.sla2_fused_attention(*a, **kw))(q, k, v, qp, kp, lut, alpha)
            g = jax.jit(kernel_fb)(q, k, v, qp, kp, alpha, do)
            row["finite"] = bool(jnp.all(jnp.isfinite(o))) and all(bool(jnp.all(jnp.isfinite(x))) for x in g)
            if first is None:
                first = (o, g)
            else:
                row["rel_fwd_vs_first"] = rel(o, first[0])
                row["rel_grads_vs_first"] = [rel(a, bb) for a, bb in zip(g, first[1])]
            del o, g
            if check_xla and "launch" not in VARIANTS[name]:  # the launch-only variants compute the same function
                rel_grads, _ = xla_grads_check(q, k, v, qp, kp, lut, do, jnp.flip(do, axis=1), nk, bq, bk, d, kc)
                row["rel_xla_branches"] = rel_grads
            t["kernel_fwd_fused"] = bench(lambda *a: pk.sla2_fused_attention(*a, **kw), q, k, v, qp, kp, lut, alpha)
            t["kernel_fwd_bwd_fused"] = bench(kernel_fb, q, k, v, qp, kp, alpha, do, runs=runs)
            fwd = lambda *a: attention.forward(*a, cfg, fused=True, residuals=True)
            res = attention.residuals(q, k, v, qp, kp, lut, alpha, jax.jit(fwd)(q, k, v, qp, kp, lut, alpha))
            t["stage_fwd_residuals"] = bench(lambda *a: fwd(*a)["o"], q, k, v, qp, kp, lut, alpha)
            t["stage_bwd_kernels"] = bench(lambda res, do: attention.backward(res, cfg, fused=True, do=do), res, do)
            dq_fn = lambda res, do: attention.backward_dq(res, cfg, fused=True, do=do)
            t["stage_bwd_dq"] = bench(dq_fn, res, do)
            rdq = jax.jit(dq_fn)(res, do)
            tot_fn = lambda res, rdq, do: attention.backward_states(res, rdq, cfg, fused=True, do=do)
            t["stage_bwd_totals"] = bench(tot_fn, res, rdq, do)
            tot = jax.jit(tot_fn)(res, rdq, do)
            dkv_fn = lambda res, rdq, tot, do: attention.backward_dkv(res, rdq, tot, cfg, fused=True, do=do)
            t["stage_bwd_dkv_incl_transpose"] = bench(dkv_fn, res, rdq, tot, do)
            del res, rdq, tot
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        row["times_ms"] = t
        label = name if name not in out["variants"] else f"{name} (again)"
        out["variants"][label] = row
        print("variant", label, json.dumps(row), flush=True)
        RESULTS["variants"] = out
        with open(os.path.join(out_dir, "check_kernels_gpu.json"), "w") as f:  # each variant: a timeout keeps them
            json.dump(RESULTS, f, indent=1)
    RESULTS["variants"] = out
    cols = [
        "kernel_fwd_fused",
        "kernel_fwd_bwd_fused",
        "stage_fwd_residuals",
        "stage_bwd_kernels",
        "stage_bwd_dq",
        "stage_bwd_totals",
        "stage_bwd_dkv_incl_transpose",
    ]
    print(f"\ncuDNN fwd {t0['cudnn_fwd']:.3f} ms, fwd+bwd {t0['cudnn_fwd_bwd']:.3f} ms; sparsity {sparsity}")
    print("| variant | " + " | ".join(cols) + " | max grad rel vs first | xla rel (branches) |")
    print("|---" * (len(cols) + 3) + "|")
    for name, row in out["variants"].items():
        tt = row["times_ms"]
        cells = [f"{tt[c]:.3f}" if tt.get(c) else "-" for c in cols]
        gr = max(row.get("rel_grads_vs_first", [0.0]))
        xr = row.get("rel_xla_branches")
        xr = f"{max(xr):.2e}" if xr else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {gr:.2e} | {xr} |")


def xla_grads_check(q, k, v, qp, kp, lut, do, w2, nk, bq, bk, d, config=None):
    """Gradients of sum(o_s * do) + sum(o_l * w2) w.r.t. q, k, v, phi(q), phi(k): (relative errors of the branches
    kernel (KernelConfig config) vs the xla backend, the kernel's gradients)."""
    from sla2_jax import xla_backend
    from sla2_jax.routing import selection_mask

    kw = dict(block_q=bq, block_k=bk, config=config)

    def lp(q, k, v, qp, kp):
        a, bb = pk.sparse_linear_attention(q, k, v, qp, kp, lut, **kw)
        return jnp.sum(a.astype(jnp.float32) * do) + jnp.sum(bb.astype(jnp.float32) * w2)

    def lx(q, k, v, qp, kp):
        a = xla_backend.xla_sparse(q, k, v, lut, block_q=bq, block_k=bk, scale=d**-0.5)
        bb = xla_backend.xla_linear(qp, kp, v, selection_mask(lut, nk), block_q=bq, block_k=bk, eps=1e-6)
        return jnp.sum(a.astype(jnp.float32) * do) + jnp.sum(bb.astype(jnp.float32) * w2)

    gp = jax.jit(jax.grad(lp, argnums=(0, 1, 2, 3, 4)))(q, k, v, qp, kp)
    gx = jax.jit(jax.grad(lx, argnums=(0, 1, 2, 3, 4)))(q, k, v, qp, kp)
    return [rel(a, bb) for a, bb in zip(gp, gx)], gp


def pallas_mha_reference(n=32768, h=12, d=128, runs=10):
    """Dense flash attention of jax.experimental.pallas.ops.gpu (the same Triton backend) vs cuDNN, for scale."""
    try:
        from jax.experimental.pallas.ops.gpu import attention

        q, k, v = inputs(jax.random.PRNGKey(7), 1, n, h, d, jnp.bfloat16)
        tp = bench(lambda q, k, v: attention.mha(q, k, v, None, sm_scale=d**-0.5), q, k, v, runs=runs)
        tc = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, k, v, runs=runs)
        row = dict(
            n=n,
            h=h,
            d=d,
            pallas_mha_fwd_ms=tp,
            cudnn_fwd_ms=tc,
            pallas_mha_tflops=4 * h * n * n * d / tp / 1e9,
            cudnn_tflops=4 * h * n * n * d / tc / 1e9,
        )
    except Exception as e:
        row = dict(error=f"{type(e).__name__}: {e}"[:1000])
    print("pallas_mha", json.dumps(row), flush=True)
    RESULTS["pallas_mha"] = row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    for field in ("forward", "backward"):
        ap.add_argument(f"--{field}", choices=("mosaic", "triton"), help=f"KernelConfig.{field} of every part")
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.90, 0.95, 0.97])
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-xla", action="store_true")
    ap.add_argument("--d64", action="store_true", help="also the d64 workload (H=24, D=64) at 95%%")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pallas-mha", action="store_true", help="also time dense Pallas (Triton) flash attention")
    ap.add_argument(
        "--variants", nargs="*", default=None, choices=list(VARIANTS), help="compare variants (first = reference)"
    )
    ap.add_argument(
        "--fwd-variants", nargs="*", default=None, choices=list(FWD_VARIANTS), help="forward variants (first: the ref.)"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    FAMILIES.update(forward=args.forward, backward=args.backward)
    dev = jax.devices()[0]
    RESULTS["meta"] = dict(
        device=dev.device_kind,
        jax=jax.__version__,
        backend=jax.default_backend(),
        generation=pk.gpu_generation(),
        command=" ".join(sys.argv),
        families=dict(FAMILIES),
    )
    print(RESULTS["meta"], flush=True)
    if args.fwd_variants:
        compare_fwd_variants(args.fwd_variants, args.sparsity, runs=args.runs, out_dir=args.out)
        return
    if args.variants:  # variants (each checked against the first and the xla backend), then the small checks
        compare_variants(args.variants, args.sparsity[0], runs=args.runs, check_xla=not args.skip_xla, out_dir=args.out)
        if not args.skip_small:
            check_small()
            bad = [r for r in RESULTS["small"] if "error" in r or max(r["grad"] + r["fused_grad"]) > 3e-2]
            print("small checks:", "FAILED " + json.dumps(bad) if bad else "all within 3e-2", flush=True)
        with open(os.path.join(args.out, "check_kernels_gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)
        return
    if not args.skip_small:
        check_small()
    if args.pallas_mha:
        pallas_mha_reference()
    for s in args.sparsity:
        wan(s, check_xla=not args.skip_xla, runs=args.runs)
    if args.d64:
        wan(0.95, h=24, d=64, check_xla=False, runs=args.runs)
    with open(os.path.join(args.out, "check_kernels_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    print(
        "\n| workload | sparsity | cuDNN fwd ms | kernel fwd ms (x) | module fwd ms (x) | cuDNN f+b ms | "
        "kernel f+b ms (x) | module f+b ms (x) | xla rel err fwd s/l |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in RESULTS["wan"]:
        t, sp = r["times_ms"], r["speedup_vs_cudnn"]
        f = lambda name: f"{t[name]:.3f}" if t.get(name) else "-"
        x = lambda name: f" ({sp[name]:.1f}x)" if name in sp else ""
        print(
            f"| {r['workload']} | {r['sparsity']} | {f('cudnn_fwd')} | {f('kernel_fwd_fused')}{x('kernel_fwd_fused')} | "
            f"{f('module_fwd')}{x('module_fwd')} | {f('cudnn_fwd_bwd')} | "
            f"{f('kernel_fwd_bwd_fused')}{x('kernel_fwd_bwd_fused')} | {f('module_fwd_bwd')}{x('module_fwd_bwd')} | "
            f"{r.get('xla_rel_fwd_o_s', '-')}/{r.get('xla_rel_fwd_o_l', '-')} |"
        )
    for r in RESULTS["wan"]:
        print(r["workload"], r["sparsity"], {k: (round(v, 3) if v else v) for k, v in r["times_ms"].items()})
        print(
            "  mem GiB",
            r.get("mem_gib"),
            "eff TFLOP/s",
            r.get("kernel_fwd_eff_tflops"),
            "cudnn TFLOP/s",
            r.get("cudnn_fwd_tflops"),
            "xla grad rel",
            r.get("xla_rel_grad_q_k_v_qphi_kphi"),
        )


if __name__ == "__main__":
    main()
