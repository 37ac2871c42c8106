"""Check and time the Pallas SLA kernels on a GPU (one process, side by side with cuDNN).

  python experiments/check_kernels_gpu.py [--out DIR] [--sparsity 0.9 0.95 0.97] [--skip-small] [--skip-xla]

1. Small shapes (ragged N, D 64/128, both scopes, fused and not): forward and gradients vs the dense float32
   reference of pallas_kernels.reference (relative error, norm-wise).
2. wan-1.3b (B=1, H=12, N=32760, D=128, bf16) at each sparsity, LUT from the SLA router on random inputs:
   - relative error of forward and gradients vs the "xla" backend of sla2_jax (if importable),
   - median times (>= 20 runs after warm-up, block_until_ready) of: cuDNN forward and forward+backward, the
     kernel forward (branches / fused), kernel forward+backward (fused, grads w.r.t. q, k, v, phi(q), phi(k),
     alpha), the module (phi + router + fused kernel) forward and forward+backward (grads w.r.t. q, k, v), and
     the stages (router, pre-pass, forward kernel with residuals, backward kernels).
3. --variants A B ...: backward / forward variants (sparse_linear.OPTIONS and launch overrides, VARIANTS below)
   on wan-1.3b at the first --sparsity: relative error of the fused forward and of all six gradients vs the first
   variant listed and (branches path) vs the xla backend, then per-stage medians of each, side by side.
Writes JSON to DIR/check_kernels_gpu.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from pallas_kernels import launch_config as lc  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402
from pallas_kernels import sparse_linear as sl  # noqa: E402
from experiments.timing import time_samples  # noqa: E402

RESULTS: dict = {"meta": {}, "small": [], "wan": []}


def rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(b) + 1e-30))


def bench(fn, *args, runs=20, warmup=3):
    return 1e3 * statistics.median(time_samples(jax.jit(fn), *args, warmup=warmup + 1, iters=runs))


def phi(x):
    return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def router_lut(q, k, topk, block_q, block_k):
    """SLA router: mean-pooled Q and smoothed K per block, top-k, ascending (partial last blocks averaged)."""
    b, n, h, d = q.shape
    nq, nk = -(-n // block_q), -(-n // block_k)

    def pool(x, bs, nb):
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * bs - n), (0, 0), (0, 0)))
        cnt = jnp.minimum(bs, n - jnp.arange(nb) * bs).astype(jnp.float32)
        return x.reshape(b, nb, bs, h, d).sum(2) / cnt[None, :, None, None]

    ks = k.astype(jnp.float32) - jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True)
    s = jnp.einsum("bihd,bjhd->bhij", pool(q, block_q, nq), pool(ks, block_k, nk))
    _, idx = jax.lax.top_k(s, topk)
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def random_lut(key, b, h, nq, nk, topk):
    keys = jax.random.split(key, b * h * nq)
    idx = jax.vmap(lambda kk: jax.random.permutation(kk, nk)[:topk])(keys)
    return jnp.sort(idx.reshape(b, h, nq, topk), axis=-1).astype(jnp.int32)


def inputs(key, b, n, h, d, dtype):
    ks = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(ks[i], (b, n, h, d), jnp.float32).astype(dtype) for i in range(3))
    return q, k, v


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

        def loss_br(fn):
            def f(q, k, v, qp, kp):
                o_s, o_l = fn(q, k, v, qp, kp, lut, **kw)
                return jnp.sum(o_s.astype(jnp.float32) * w1) + jnp.sum(o_l.astype(jnp.float32) * w2)

            return f

        def loss_fu(fn):
            def f(q, k, v, qp, kp, a):
                return jnp.sum(fn(q, k, v, qp, kp, lut, a, **kw).astype(jnp.float32) * w1)

            return f

        row = dict(n=n, d=d, dtype=jnp.dtype(dtype).name, scope=scope, topk=topk, nk=nk)
        try:
            o = jax.jit(lambda *a: pk.sparse_linear_attention(*a, **kw))(q, k, v, qp, kp, lut)
            r = ref.reference_branches(q, k, v, qp, kp, lut, **kw)
            row["fwd_o_s"], row["fwd_o_l"] = (
                rel(o[0], r[0]),
                rel(o[1], r[1]) if topk < nk else float(jnp.abs(o[1]).max()),
            )
            g = jax.jit(jax.grad(loss_br(pk.sparse_linear_attention), argnums=(0, 1, 2, 3, 4)))(q, k, v, qp, kp)
            gr = jax.grad(loss_br(ref.reference_branches), argnums=(0, 1, 2, 3, 4))(q, k, v, qp, kp)
            row["grad"] = [rel(a, bb) for a, bb in zip(g, gr)]
            of = jax.jit(lambda *a: pk.sla2_fused_attention(*a, **kw))(q, k, v, qp, kp, lut, alpha)
            row["fused_fwd"] = rel(of, ref.reference_fused(q, k, v, qp, kp, lut, alpha, **kw))
            g = jax.jit(jax.grad(loss_fu(pk.sla2_fused_attention), argnums=(0, 1, 2, 3, 4, 5)))(q, k, v, qp, kp, alpha)
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
    kw = dict(block_q=bq, block_k=bk)
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
    cfg = sl._validate(q, k, v, qp, kp, lut, bq, bk, "complement", None, 1e-6, None)
    timed("stage_prepass", lambda kp, v: sl._prepass(kp, v, cfg), kp, v)
    timed("stage_complement_states", lambda kp, v, lut: sl._complement_states(kp, v, lut, cfg), kp, v, lut)
    timed(
        "stage_fwd_kernel_residuals",
        lambda *a: sl._forward(*a, cfg, fused=True, residuals=True),
        q,
        k,
        v,
        qp,
        kp,
        lut,
        alpha,
    )
    timed("stage_transpose_lut", lambda l: sl._transpose_lut(l, nk), lut)
    try:
        out = jax.jit(lambda *a: sl._forward(*a, cfg, fused=True, residuals=True))(q, k, v, qp, kp, lut, alpha)
        res = sl._residuals(q, k, v, qp, kp, lut, alpha, out)
        timed("stage_bwd_kernels", lambda res, do: sl._backward(res, cfg, fused=True, do=do), res, do)
        timed("stage_bwd_dq", lambda res, do: sl._backward_dq(res, cfg, fused=True, do=do), res, do)
        res_dq = jax.jit(lambda res, do: sl._backward_dq(res, cfg, fused=True, do=do))(res, do)
        timed(
            "stage_bwd_totals",
            lambda res, rdq, do: sl._backward_totals(res, rdq, cfg, fused=True, do=do),
            res,
            res_dq,
            do,
        )
        tot = jax.jit(lambda res, rdq, do: sl._backward_totals(res, rdq, cfg, fused=True, do=do))(res, res_dq, do)
        timed(
            "stage_bwd_dkv_incl_transpose",
            lambda res, rdq, tot, do: sl._backward_dkv(res, rdq, tot, cfg, fused=True, do=do),
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
            row["xla_rel_grad_q_k_v_qphi_kphi"], gp = xla_grads_check(q, k, v, qp, kp, lut, do, w2, nk, bq, bk, d)
            row["nan_free"] = bool(all(jnp.all(jnp.isfinite(x)) for x in gp))
        except Exception as e:
            row["xla_check_error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
    print("wan", json.dumps(row), flush=True)
    RESULTS["wan"].append(row)


# name -> (sparse_linear.OPTIONS, launch overrides); "old" = the session-1 kernels (selected part in the loops).
_LOOP = dict(fwd_linear="loop", dq_linear="loop", dkv_linear="loop")
_BLOCKS = dict(fwd_linear="loop", dq_linear="blocks", dkv_linear="blocks")
_FWD_BLOCKS = dict(fwd_linear="blocks", dq_linear="blocks", dkv_linear="blocks")
VARIANTS = {
    "old": (_LOOP, dict(dkv=(4, 2, 32))),
    "old_dq4164": (_LOOP, dict(dq=(4, 1, 64), dkv=(4, 2, 32))),
    "blocks": (_BLOCKS, {}),
    "blocks_dkv4232": (_BLOCKS, dict(dkv=(4, 2, 32))),
    "blocks_dkv4364": (_BLOCKS, dict(dkv=(4, 3, 64))),
    "blocks_dkv42128": (_BLOCKS, dict(dkv=(4, 2, 128))),
    "blocks_dkv41128": (_BLOCKS, dict(dkv=(4, 1, 128))),
    "blocks_dkv8264": (_BLOCKS, dict(dkv=(8, 2, 64))),
    "blocks_dq4264": (_BLOCKS, dict(dq=(4, 2, 64))),
    "fwdblocks": (_FWD_BLOCKS, {}),
    "fwdblocks_fwd4364": (_FWD_BLOCKS, dict(fwd=(4, 3, 64))),
}


# Forward variants (--fwd-variants): name -> (sparse_linear.OPTIONS, launch overrides); the first is the reference.
# The "primal_*" ones run at every --sparsity (the others at the first only). The schedule options measured in
# session 2 (key mask on the last entry only, scale inside exp2, 64-row programs, G after the loop, several blocks per
# outer-sum program) were no faster and were removed; perf_notes.md "Session 2: forward" has their numbers.
FWD_VARIANTS = {
    "fwd_s2": ({}, {}),
    "fwd_s2_keys128": ({}, dict(fwd=(8, 2, 128))),
    "fwd_s2_w8s4": ({}, dict(fwd=(8, 4, 64))),
    "fwd_s2_w8s2": ({}, dict(fwd=(8, 2, 64))),
    "primal_loop": (dict(fwd_linear="loop"), {}),
}


def wan_setup(sparsity, seed, b, h, n, d, bq, bk):
    """Inputs of one comparison: bf16 q, k, v, do (B, N, H, D), phi(q), phi(k), the router's LUT at this sparsity,
    alpha (B, H, Nq) in [0.3, 0.9] and the kernels' validated config."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(int(sparsity * 1000) + seed), 3)
    q, k, v = inputs(k1, b, n, h, d, jnp.bfloat16)
    do = jax.random.normal(k2, q.shape, jnp.float32).astype(jnp.bfloat16)
    nq, nk = -(-n // bq), -(-n // bk)
    topk = max(1, int(nk * (1 - sparsity) + 1e-6))
    lut = jax.jit(router_lut, static_argnums=(2, 3, 4))(q, k, topk, bq, bk)
    qp, kp = jax.jit(phi)(q), jax.jit(phi)(k)
    alpha = jax.random.uniform(k3, (b, h, nq), jnp.float32, 0.3, 0.9)
    cfg = sl._validate(q, k, v, qp, kp, lut, bq, bk, "complement", None, 1e-6, None)
    return q, k, v, do, qp, kp, lut, alpha, cfg


def compare_fwd_variants(names, sparsities, b=1, h=12, n=32760, d=128, bq=128, bk=64, runs=20, out_dir="."):
    """Forward only: per sparsity, the fused forward of each variant vs the first (and the first's branches vs the
    xla backend), then medians of the forward-only call (primal), the VJP forward (residuals) and the states."""
    out = RESULTS.setdefault("fwd_variants", {})
    for si, sparsity in enumerate(sparsities):
        q, k, v, _, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 29, b, h, n, d, bq, bk)
        topk, nk = cfg.topk, cfg.nk
        kw = dict(block_q=bq, block_k=bk)
        row = dict(topk=topk, nk=nk, variants={})
        impl = "cudnn" if jax.default_backend() == "gpu" else "xla"  # xla: CPU smoke runs of this script
        row["cudnn_fwd"] = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl), q, k, v)
        first = None
        for name in names if si == 0 else [nm for nm in names if nm == names[0] or nm.startswith("primal")]:
            opts, launch = FWD_VARIANTS[name]
            jax.clear_caches()
            old_opts = dict(sl.OPTIONS)
            sl.OPTIONS.update(opts)
            r, t = {}, {}
            try:
                with lc.override_launch_config(**launch):
                    fused = lambda *a: pk.sla2_fused_attention(*a, **kw)
                    o = jax.jit(fused)(q, k, v, qp, kp, lut, alpha)
                    o_vjp = jax.jit(lambda *a: sl._forward(*a, cfg, fused=True, residuals=True)["o"])(
                        q, k, v, qp, kp, lut, alpha
                    )
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
                    t["vjp_fwd"] = bench(
                        lambda *a: sl._forward(*a, cfg, fused=True, residuals=True)["o"],
                        q,
                        k,
                        v,
                        qp,
                        kp,
                        lut,
                        alpha,
                        runs=runs,
                    )
                    if si == 0 or name == names[0]:
                        t["states"] = bench(lambda kp, v, l: sl._complement_states(kp, v, l, cfg), kp, v, lut)
                        t["outer_sum_key_blocks"] = bench(lambda kp, v: sl._outer_sum(kp, v, cfg, block_rows=bk), kp, v)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"[:1500]
                traceback.print_exc()
            finally:
                sl.OPTIONS.clear()
                sl.OPTIONS.update(old_opts)
            r["times_ms"], r["options"], r["launch"] = (t, opts, {kk: list(vv) for kk, vv in launch.items()})
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
    q, k, v, do, qp, kp, lut, alpha, cfg = wan_setup(sparsity, 17, b, h, n, d, bq, bk)
    topk, nk = cfg.topk, cfg.nk
    kw = dict(block_q=bq, block_k=bk)
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

    # the per-block linear states (option "blocks"), piece by piece
    w = jax.random.uniform(jax.random.PRNGKey(3), (b, h, cfg.npad), jnp.float32)  # row weights, timing only
    t0["states_outer_sum_key_blocks"] = bench(lambda kp, v: sl._outer_sum(kp, v, cfg, block_rows=bk), kp, v)
    t0["states_outer_sum_query_blocks"] = bench(
        lambda qp, do, w: sl._outer_sum(qp, do, cfg, w, w, block_rows=bq), qp, do, w
    )
    sums = jax.jit(lambda kp, v: sl._outer_sum(kp, v, cfg, block_rows=bk))(kp, v)
    unsel = jnp.logical_not(jnp.swapaxes(sl._selection(lut, nk), 2, 3))
    t0["states_masked_matmul_fwd"] = bench(sl._sum_over_blocks, unsel, sums)
    t0["states_complement_fwd"] = bench(lambda kp, v, lut: sl._complement_states(kp, v, lut, cfg), kp, v, lut)
    del sums
    print("states", t0, flush=True)

    first = None
    for name in names:
        opts, launch = VARIANTS[name]
        jax.clear_caches()  # options and launch overrides are read at trace time: no cached traces across variants

        def kernel_fb(q, k, v, qp, kp, a, do):
            f = lambda *x: jnp.sum(pk.sla2_fused_attention(*x[:5], lut, x[5], **kw).astype(jnp.float32) * do)
            return jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, qp, kp, a)

        old_opts = dict(sl.OPTIONS)
        sl.OPTIONS.update(opts)
        row, t = {}, {}
        try:
            with lc.override_launch_config(**launch):
                o = jax.jit(lambda *a: pk.sla2_fused_attention(*a, **kw))(q, k, v, qp, kp, lut, alpha)
                g = jax.jit(kernel_fb)(q, k, v, qp, kp, alpha, do)
                row["finite"] = bool(jnp.all(jnp.isfinite(o))) and all(bool(jnp.all(jnp.isfinite(x))) for x in g)
                if first is None:
                    first = (o, g)
                else:
                    row["rel_fwd_vs_first"] = rel(o, first[0])
                    row["rel_grads_vs_first"] = [rel(a, bb) for a, bb in zip(g, first[1])]
                del o, g
                if check_xla and not launch:  # the launch-only variants compute the same function
                    rel_grads, _ = xla_grads_check(q, k, v, qp, kp, lut, do, jnp.flip(do, axis=1), nk, bq, bk, d)
                    row["rel_xla_branches"] = rel_grads
                t["kernel_fwd_fused"] = bench(lambda *a: pk.sla2_fused_attention(*a, **kw), q, k, v, qp, kp, lut, alpha)
                t["kernel_fwd_bwd_fused"] = bench(kernel_fb, q, k, v, qp, kp, alpha, do, runs=runs)
                fwd = jax.jit(lambda *a: sl._forward(*a, cfg, fused=True, residuals=True))
                res = sl._residuals(q, k, v, qp, kp, lut, alpha, fwd(q, k, v, qp, kp, lut, alpha))
                t["stage_fwd_residuals"] = bench(
                    lambda *a: sl._forward(*a, cfg, fused=True, residuals=True)["o"], q, k, v, qp, kp, lut, alpha
                )
                t["stage_bwd_kernels"] = bench(lambda res, do: sl._backward(res, cfg, fused=True, do=do), res, do)
                t["stage_bwd_dq"] = bench(lambda res, do: sl._backward_dq(res, cfg, fused=True, do=do), res, do)
                rdq = jax.jit(lambda res, do: sl._backward_dq(res, cfg, fused=True, do=do))(res, do)
                tot_fn = lambda res, rdq, do: sl._backward_totals(res, rdq, cfg, fused=True, do=do)
                t["stage_bwd_totals"] = bench(tot_fn, res, rdq, do)
                tot = jax.jit(tot_fn)(res, rdq, do)
                dkv_fn = lambda res, rdq, tot, do: sl._backward_dkv(res, rdq, tot, cfg, fused=True, do=do)
                t["stage_bwd_dkv_incl_transpose"] = bench(dkv_fn, res, rdq, tot, do)
                del res, rdq, tot
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc()
        finally:
            sl.OPTIONS.clear()
            sl.OPTIONS.update(old_opts)
        row["times_ms"] = t
        row["options"], row["launch"] = (opts, {kk: list(vv) for kk, vv in launch.items()})
        label = name if name not in out["variants"] else f"{name} (again)"
        out["variants"][label] = row
        print("variant", label, json.dumps(row), flush=True)
        RESULTS["variants"] = out
        with open(
            os.path.join(out_dir, "check_kernels_gpu.json"), "w"
        ) as f:  # after each variant: a timeout keeps them
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


def xla_grads_check(q, k, v, qp, kp, lut, do, w2, nk, bq, bk, d):
    """Gradients of sum(o_s * do) + sum(o_l * w2) w.r.t. q, k, v, phi(q), phi(k): (relative errors of the branches
    kernel vs the xla backend, the kernel's gradients)."""
    from sla2_jax import xla_backend
    from sla2_jax.routing import selection_mask

    kw = dict(block_q=bq, block_k=bk)

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
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.90, 0.95, 0.97])
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--skip-xla", action="store_true")
    ap.add_argument("--d64", action="store_true", help="also the d64 workload (H=24, D=64) at 95%%")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pallas-mha", action="store_true", help="also time dense Pallas (Triton) flash attention")
    ap.add_argument(
        "--variants", nargs="*", default=None, help=f"compare variants (first = reference): {list(VARIANTS)}"
    )
    ap.add_argument(
        "--fwd-variants", nargs="*", default=None, help=f"forward variants (first = reference): {list(FWD_VARIANTS)}"
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0]
    RESULTS["meta"] = dict(
        device=dev.device_kind,
        jax=jax.__version__,
        backend=jax.default_backend(),
        generation=pk.gpu_generation(),
        command=" ".join(sys.argv),
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
