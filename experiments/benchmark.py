"""Attention benchmark: SLA2 backends vs cuDNN dense attention, side by side in one process (docs/benchmarks.md).

    python -m experiments.benchmark --workloads wan-1.3b --backends xla,pallas --out runs/bench
    python -m experiments.benchmark --workloads all --backends pallas        # every workload
    python -m experiments.benchmark --tiny                                   # CPU smoke run
    python -m experiments.benchmark --backends pallas --quant none,int8 --passes fwd   # low-bit vs bf16 forward
    python -m experiments.benchmark --backends pallas --linear-scope complement,all    # both linear scopes
    python -m experiments.benchmark --backends pallas --fwd-kernel triton    # another kernel choice (KernelConfig)
    python -m experiments.benchmark --backends pallas --kernel block_sum_dtype=float16   # any other KernelConfig field

For each workload and sparsity it times the module forward (routing + branches + combine) and forward+backward
(grad of sum(o * do) w.r.t. q, k, v) three ways: in-model (the headline: --layers calls on distinct inputs inside
one jitted function, as the attention layers of a DiT step issue them, per call; the host's dispatch is paid once
per step), a single synchronised call (median of --iters) and calls issued back to back (pipelined); plus the
router alone and the kernel-only forward / forward+backward of `sparse_linear_branches` with a precomputed LUT.
Baselines in the same run, timed the same ways: jax.nn.dot_product_attention with implementation="cudnn" (GPU) or
XLA. It reports speedup over the dense baseline, effective TFLOP/s (4 B H N^2 D (1 - sparsity) / t; in the table on
a GPU only), compiled peak memory, and the relative error of the module forward vs chunked float32 dense attention.
Sparsities that select the same number of key blocks at a shape (small N) are measured once, and the output says
so. Writes JSON and a PNG.
The pallas backend runs with the KernelConfig of --fwd-kernel / --bwd-kernel / --kernel (SLA2Config(kernel=...); all
at their defaults: the library's heuristic_config); the JSON records the KernelConfig of each shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from tqdm import tqdm

import sla2_jax as sla
from experiments.inputs import random_qkv
from experiments.timing import compiled_memory_bytes, in_model_seconds, pipelined_seconds, time_fn

QUANTS, SCOPES, PASSES = ("none", "int8", "int8_fp8"), ("complement", "all"), ("fwd", "fwd+bwd")
WORKLOADS = {  # name: list of (B, H, N, D)
    "wan-1.3b": [(1, 12, 32760, 128)],
    "wan-14b-720p": [(1, 40, 75600, 128)],
    "scale-N": [(1, 12, n, 128) for n in (8192, 16384, 32768, 65536, 131072)],
    "d64": [(1, 24, 32760, 64)],
    "tiny": [(1, 2, 1000, 64)],
}


def dense_baseline(q, k, v):
    """cuDNN flash attention on GPU, XLA's dot_product_attention elsewhere."""
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def fwd_bwd(fn):
    """Jitted grad of sum(fn(q, k, v) * do) w.r.t. q, k, v."""
    def loss(q, k, v, do):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def rel_err(x, ref) -> float:
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def measure(name, fn, args, iters, flops=None, model_sets=None, layers=30):
    """Times fn(*args); returns a dict with ms (median of `iters` synchronised calls), pipelined_ms (per call of
    calls issued back to back, timing.pipelined_seconds), in_model_ms (per call of `layers` calls on the distinct
    argument tuples `model_sets` inside one jitted function, timing.in_model_seconds; the headline), memory and
    effective TFLOP/s (from in_model_ms where measured, else ms)."""
    row = {"what": name, "ms": 1e3 * time_fn(fn, *args, iters=iters), "peak_mem_gib": None}
    row["pipelined_ms"] = 1e3 * pipelined_seconds(fn, *args, repeats=max(3, iters // 2))
    if model_sets:
        row["in_model_ms"] = 1e3 * in_model_seconds(fn, model_sets, layers=layers, iters=max(3, iters // 2))
        row["layers"], row["distinct_inputs"] = layers, len(model_sets)
    mem = compiled_memory_bytes(fn, *args)
    if mem is not None:
        row["peak_mem_gib"] = mem / 2**30
    if flops:
        row["eff_tflops"] = flops / (row.get("in_model_ms", row["ms"]) * 1e-3) / 1e12
    return row


def distinct_inputs(shape, layers, with_do, budget_gib=24.0):
    """Up to `layers` distinct (q, k, v[, do]) bf16 tuples for the in-model timing, as many as fit in budget_gib."""
    batch, heads, seq_len, dim = shape
    per_set = (4 if with_do else 3) * batch * seq_len * heads * dim * 2
    count = max(1, min(layers, int(budget_gib * 2**30 // per_set)))
    sets = []
    for i in range(count):
        q, k, v = random_qkv(100 + i, batch, seq_len, heads, dim)
        sets.append((q, k, v, random_qkv(1000 + i, batch, seq_len, heads, dim)[0]) if with_do else (q, k, v))
    return sets


def kernel_config(shape, fwd_kernel="auto", bwd_kernel="auto", block_q=128, block_k=64, changes=None):
    """(KernelConfig passed as SLA2Config(kernel=...) or None for the library's default, the KernelConfig the pallas
    backend runs with, or None where the kernels package is not available) for a (B, H, N, D) bf16 shape: the
    heuristic_config with the forward / backward kernel family of the flags ("auto": the heuristic's) and the
    other KernelConfig fields in changes ({field: value}, e.g. from --kernel)."""
    try:
        from pallas_kernels import heuristic_config
    except ImportError:  # no Pallas Triton backend in this jax: the pallas backend is unavailable anyway
        return None, None
    _, _, seq_len, dim = shape
    default = heuristic_config(seq_len, dim, jnp.bfloat16, block_q, block_k,
                               interpret=jax.default_backend() != "gpu")
    if fwd_kernel == "auto" and bwd_kernel == "auto" and not changes:
        return None, default
    families = {field: family for field, family in (("forward", fwd_kernel), ("backward", bwd_kernel))
                if family != "auto"}
    chosen = with_kernel_changes(default, {**families, **(changes or {})})
    return chosen, chosen


def kernel_changes(text: str | None, reserved=("forward", "backward")) -> dict:
    """{field: value} of --kernel "FIELD=VALUE[,FIELD=VALUE...]" ("true" / "false" are bools, digits ints), with
    items "launch.KERNEL=WARPS/STAGES/ROWS" gathered as {"launch": {kernel: Launch}} (one Triton kernel's launch
    entry each; with_kernel_changes merges them into a config's table). ValueError for a bad item, a field
    KernelConfig does not have, one of `reserved` (here: those with their own flags), a kernel name without a launch
    entry, or a value KernelConfig refuses."""
    if not text:
        return {}
    from pallas_kernels import KernelConfig
    from pallas_kernels.config import DEFAULT_LAUNCH, Launch

    changes, launch = {}, {}
    for item in text.split(","):
        field, sep, value = item.partition("=")
        if field.startswith("launch."):
            kernel, parts = field[len("launch."):], value.split("/")
            if kernel not in (*DEFAULT_LAUNCH, "lowbit") or len(parts) != 3 or not all(x.isdigit() for x in parts):
                raise ValueError(f"{item!r}: give launch.KERNEL=WARPS/STAGES/ROWS with KERNEL one of "
                                 f"{(*DEFAULT_LAUNCH, 'lowbit')}")
            launch[kernel] = Launch(*(int(x) for x in parts))
            continue
        if not sep or field not in KernelConfig.__dataclass_fields__ or field in (*reserved, "launch"):
            raise ValueError(f"{item!r}: give FIELD=VALUE with a KernelConfig field other than "
                             f"{', '.join(reserved)}, or launch.KERNEL=WARPS/STAGES/ROWS")
        changes[field] = {"true": True, "false": False}.get(value, int(value) if value.isdigit() else value)
    KernelConfig(**changes, launch=tuple(launch.items()))  # validated (ValueError naming the field)
    return {**changes, "launch": launch} if launch else changes


def with_kernel_changes(config, changes: dict):
    """config.replace(**changes), where changes["launch"] (if present) is {kernel: Launch or (warps, stages, rows)}
    merged into config's own launch table (the other kernels' entries kept)."""
    changes = dict(changes)
    if "launch" in changes:
        changes["launch"] = tuple({**dict(config.launch), **changes["launch"]}.items())
    return config.replace(**changes)


def distinct_sparsities(seq_len: int, sparsities, block_k: int = 64):
    """(the sparsities to measure, notes): sparsities whose top-k selects the same number of the N / block_k key
    blocks run the same computation, so only the first of each group is measured (under its own label); each note
    names a group that collapsed, e.g. at N = 1000 90%, 95% and 97% all select 1 of 16 key blocks."""
    num_k = -(-seq_len // block_k)
    groups = {}
    for s in sparsities:
        groups.setdefault(sla.SLA2Config(topk_ratio=round(1 - s, 6), block_k=block_k).num_selected(num_k), []).append(s)
    notes = [f"N={seq_len}: sparsities {', '.join(f'{s:.0%}' for s in group)} all select {k} of {num_k} key blocks "
             f"(block sparsity {1 - k / num_k:.1%}): one computation, measured once as {group[0]:.0%}"
             for k, group in groups.items() if len(group) > 1]
    return [group[0] for group in groups.values()], notes


def config_json(kernel) -> dict | None:
    """A KernelConfig as JSON (launch as {kernel: [num_warps, num_stages, rows]})."""
    if kernel is None:
        return None
    import dataclasses

    out = dataclasses.asdict(kernel)
    out["launch"] = {name: list(params) for name, params in kernel.launch}
    return out


def bench_shape(shape, sparsities, backends, iters, kernel_only, check_error, progress, quants=("none",),
                kernel=None, layers=30, linear_scopes=("complement",), passes=("fwd", "fwd+bwd"), on_rows=None):
    """Rows of one (B, H, N, D) shape: the dense baseline, then each sparsity x linear scope x quantisation x backend
    on the same inputs. kernel: the pallas backend's KernelConfig (None: the library's default); layers: calls per
    jitted step of the in-model timing (0: skip it); passes: which of "fwd" and "fwd+bwd" to time (the baseline's
    too); on_rows(rows): called with the rows so far after each variant (a run cut short keeps them)."""
    batch, heads, seq_len, dim = shape
    q, k, v = random_qkv(0, batch, seq_len, heads, dim)
    do = random_qkv(1, batch, seq_len, heads, dim)[0]
    rows = []
    dense_flops = 4 * batch * heads * seq_len**2 * dim
    base_fwd, base_bwd = jax.jit(dense_baseline), fwd_bwd(dense_baseline)
    progress.set_postfix_str(f"N={seq_len} dense")
    fwd_sets = distinct_inputs(shape, layers, False) if layers and "fwd" in passes else None
    bwd_sets = distinct_inputs(shape, layers, True, budget_gib=16.0) if layers and "fwd+bwd" in passes else None
    if "fwd" in passes:
        rows.append(measure("dense fwd", base_fwd, (q, k, v), iters, dense_flops, fwd_sets, layers))
    if "fwd+bwd" in passes:
        rows.append(measure("dense fwd+bwd", base_bwd, (q, k, v, do), iters, 3.5 * dense_flops, bwd_sets, layers))
    ref = sla.dense_attention(q, k, v) if check_error and "fwd" in passes else None  # the error of the forward rows
    variants = [(s, scope, quant, backend) for s in sparsities for scope in linear_scopes for quant in quants
                for backend in backends]
    routed = set()  # (sparsity, backend) whose router row is timed: routing depends on neither scope nor quant
    for sparsity, linear_scope, quant, backend in variants:
        cfg = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend=backend, alpha="mass", quant=quant,
                             kernel=kernel, linear_scope=linear_scope)
        flops = dense_flops * (1 - sparsity)
        tag = variant_tag(backend, sparsity, quant, linear_scope)
        progress.set_postfix_str(f"N={seq_len} {tag}")
        module = jax.jit(lambda q, k, v, cfg=cfg: sla.sla2_attention(q, k, v, config=cfg))
        module_grad = fwd_bwd(lambda q, k, v, cfg=cfg: sla.sla2_attention(q, k, v, config=cfg))
        router = jax.jit(lambda q, k, cfg=cfg: sla.route(q, k, cfg)[0])
        todo = [(f"{tag} module fwd", module, (q, k, v), flops, fwd_sets)] if "fwd" in passes else []
        if "fwd+bwd" in passes:
            todo.append((f"{tag} module fwd+bwd", module_grad, (q, k, v, do), 3.5 * flops, bwd_sets))
        if (sparsity, backend) not in routed:
            routed.add((sparsity, backend))
            todo.append((f"{variant_tag(backend, sparsity)} router", router, (q, k), None, None))
        if kernel_only:
            def branches(q, k, v, lut, backend=backend):
                if kernel is None:
                    o_s, o_l = sla.sparse_linear_branches(q, k, v, lut, backend=backend, quant=quant,
                                                          linear_scope=linear_scope)
                    return o_s + o_l
                return kernel_branches(q, k, v, lut, backend, quant, kernel, linear_scope)

            lut = router(q, k)
            if "fwd" in passes:
                todo.append((f"{tag} kernel fwd", jax.jit(branches), (q, k, v, lut), flops, None))
            if "fwd+bwd" in passes:
                todo.append((f"{tag} kernel fwd+bwd", jax.jit(jax.grad(
                    lambda q, k, v, lut, do: jnp.sum(branches(q, k, v, lut).astype(jnp.float32) * do),
                    argnums=(0, 1, 2))), (q, k, v, lut, do), 3.5 * flops, None))
        for name, fn, fn_args, fn_flops, sets in todo:
            try:  # one failure (e.g. out of memory at the largest N) must not hide the other rows
                r = measure(name, fn, fn_args, iters, fn_flops, sets, layers)
                if ref is not None and name.endswith("module fwd"):
                    r["rel_err_vs_dense"] = rel_err(module(q, k, v), ref)
                rows.append(r)
            except Exception as e:
                rows.append({"what": f"{name} FAILED", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        progress.update(1)
        if on_rows is not None:
            on_rows(with_speedups(rows, shape))
    return with_speedups(rows, shape)


def variant_tag(backend: str, sparsity: float, quant: str = "none", linear_scope: str = "complement") -> str:
    """A row's name before its part, e.g. "pallas 95%", "pallas 97% int8 all"."""
    return (f"{backend} {sparsity:.0%}" + ("" if quant == "none" else f" {quant}")
            + ("" if linear_scope == "complement" else f" {linear_scope}"))


def with_speedups(rows, shape):
    """rows with the shape and, for each module/kernel row, its speedups over the dense row of the same pass."""
    batch, heads, seq_len, dim = shape
    dense = {r["what"].split()[-1]: r for r in rows if r["what"] in ("dense fwd", "dense fwd+bwd") and "ms" in r}
    for r in rows:
        r.update(B=batch, H=heads, N=seq_len, D=dim)
        base = dense.get(r["what"].split()[-1])
        if "ms" in r and base is not None and r is not base:
            r["speedup_vs_dense"] = base["ms"] / r["ms"]
            r["pipelined_speedup_vs_dense"] = base["pipelined_ms"] / r["pipelined_ms"]
            if "in_model_ms" in r and "in_model_ms" in base:
                r["in_model_speedup_vs_dense"] = base["in_model_ms"] / r["in_model_ms"]
    return rows


def kernel_branches(q, k, v, lut, backend, quant, kernel, linear_scope="complement"):
    """o_s + o_l of sla.sparse_linear_branches' defaults with the pallas backend's KernelConfig `kernel`."""
    from sla2_jax.backends import resolve_backend
    from sla2_jax.branches import compute_branches

    resolved = resolve_backend(backend, q, k, v, block_q=128, block_k=64)
    o_s, o_l = compute_branches(q, k, v, lut, block_q=128, block_k=64, feature_map="softmax",
                                linear_scope=linear_scope, quant=quant, backend=resolved, kernel=kernel)
    return (o_s + o_l).astype(q.dtype)


def print_table(rows, tflops: bool = True):
    """The rows as a table; tflops=False leaves the effective TFLOP/s column out (it measures the GPU kernels)."""
    print(
        f"\n{'workload':<14}{'N':>7} {'what':<32}{'in-model':>10}{'x dense':>9}{'TFLOP/s' if tflops else '':>9}"
        f"{'mem GiB':>9}{'rel err':>9}{'call ms':>10}{'x dense':>9}{'pipe ms':>10}"
    )
    for r in rows:
        if "ms" not in r:
            print(f"{r.get('workload', ''):<14}{r.get('N', ''):>7} {r['what']:<32} {r.get('error', '')}")
            continue
        fmt = lambda key, f: (f % r[key]) if r.get(key) is not None else "-"  # noqa: E731
        print(f"{r['workload']:<14}{r['N']:>7} {r['what']:<32}{fmt('in_model_ms', '%.3f'):>10}"
              f"{fmt('in_model_speedup_vs_dense', '%.2f'):>9}{fmt('eff_tflops', '%.0f') if tflops else '':>9}"
              f"{fmt('peak_mem_gib', '%.2f'):>9}{fmt('rel_err_vs_dense', '%.4f'):>9}{r['ms']:>10.3f}"
              f"{fmt('speedup_vs_dense', '%.2f'):>9}{fmt('pipelined_ms', '%.3f'):>10}")


# Targets (in-model speedup over cuDNN measured the same way in the same run): {(workload, what, scope, sparsity): min}
TARGETS = {
    ("wan-1.3b", "module fwd", "complement", 0.90): 8.0,
    ("wan-1.3b", "module fwd", "complement", 0.95): 14.0,
    ("wan-1.3b", "module fwd", "complement", 0.97): 18.6,
    ("wan-1.3b", "module fwd+bwd", "complement", 0.90): 6.0,
    ("wan-1.3b", "module fwd+bwd", "complement", 0.95): 10.0,
    ("wan-1.3b", "module fwd+bwd", "complement", 0.97): 13.0,
    ("wan-14b-720p", "module fwd", "complement", 0.95): 16.0,
    ("wan-14b-720p", "module fwd", "complement", 0.97): 22.0,
    ("wan-1.3b", "module fwd", "all", 0.95): 16.0,
    ("wan-1.3b", "module fwd", "all", 0.97): 20.0,
}
LOW_BIT_RATIO = 1.3  # wan-1.3b module forward in int8 / int8_fp8: >= 1.3x faster than bf16 (in-model, same run)
KERNEL_TFLOPS_SHARE = 0.6  # kernel forward effective TFLOP/s >= 60% of cuDNN's dense forward TFLOP/s
MEMORY_RATIO = 1.5  # module fwd+bwd peak memory <= 1.5x cuDNN's


def target_lines(rows, backend: str = "pallas") -> list[str]:
    """One line per target that the rows of `backend` allow to check: met, or missed and by how much (the factor
    still needed). Speedups over cuDNN are judged in-model where measured, else on the single synchronised call (the
    single-call speedup beside it); the low-bit forward against the bf16 forward of the same sparsity and scope."""
    by_what = {(r.get("workload"), r["what"]): r for r in rows if "ms" in r}
    lines = []
    for (workload, what, scope, sparsity), need in TARGETS.items():
        r = by_what.get((workload, f"{variant_tag(backend, sparsity, 'none', scope)} {what}"))
        if r is None or "speedup_vs_dense" not in r:
            continue
        got = r.get("in_model_speedup_vs_dense", r["speedup_vs_dense"])
        how = "in-model" if "in_model_speedup_vs_dense" in r else "single call"
        verdict = "met" if got >= need else f"MISSED by {need / got:.2f}x"
        lines.append(f"{workload} {what}{'' if scope == 'complement' else ' ' + scope} at {sparsity:.0%}: {how} "
                     f"{got:.2f}x vs >= {need}x: {verdict} (single synchronised call {r['speedup_vs_dense']:.2f}x)")
    low_bit = [(quant, scope, s) for quant in QUANTS[1:] for scope in SCOPES for s in (0.95, 0.97)]
    for quant, scope, sparsity in low_bit:
        r = by_what.get(("wan-1.3b", f"{variant_tag(backend, sparsity, quant, scope)} module fwd"))
        bf16 = by_what.get(("wan-1.3b", f"{variant_tag(backend, sparsity, 'none', scope)} module fwd"))
        if r is None or bf16 is None:
            continue
        key = "in_model_ms" if "in_model_ms" in r and "in_model_ms" in bf16 else "ms"
        got = bf16[key] / r[key]
        verdict = "met" if got >= LOW_BIT_RATIO else f"MISSED by {LOW_BIT_RATIO / got:.2f}x"
        lines.append(f"wan-1.3b module fwd {quant}{'' if scope == 'complement' else ' ' + scope} at {sparsity:.0%}: "
                     f"{'in-model' if key == 'in_model_ms' else 'single call'} {got:.2f}x the bf16 forward vs >= "
                     f"{LOW_BIT_RATIO}x: {verdict}")
    for workload in sorted({w for w, _ in by_what}):
        dense_fwd, dense_bwd = by_what.get((workload, "dense fwd")), by_what.get((workload, "dense fwd+bwd"))
        for sparsity in (0.90, 0.95, 0.97):
            r = by_what.get((workload, f"{backend} {sparsity:.0%} kernel fwd"))
            if r is not None and dense_fwd is not None and r.get("eff_tflops") and dense_fwd.get("eff_tflops"):
                share = r["eff_tflops"] / dense_fwd["eff_tflops"]
                verdict = "met" if share >= KERNEL_TFLOPS_SHARE else f"MISSED by {KERNEL_TFLOPS_SHARE / share:.2f}x"
                lines.append(f"{workload} kernel fwd at {sparsity:.0%}: {r['eff_tflops']:.0f} effective TFLOP/s = "
                             f"{share:.0%} of cuDNN's {dense_fwd['eff_tflops']:.0f} vs >= {KERNEL_TFLOPS_SHARE:.0%}: "
                             f"{verdict}")
            r = by_what.get((workload, f"{backend} {sparsity:.0%} module fwd+bwd"))
            if r is not None and dense_bwd is not None and r.get("peak_mem_gib") and dense_bwd.get("peak_mem_gib"):
                ratio = r["peak_mem_gib"] / dense_bwd["peak_mem_gib"]
                verdict = "met" if ratio <= MEMORY_RATIO else f"MISSED by {ratio / MEMORY_RATIO:.2f}x"
                lines.append(f"{workload} peak memory fwd+bwd at {sparsity:.0%}: {ratio:.2f}x cuDNN's vs <= "
                             f"{MEMORY_RATIO}x: {verdict}")
    return lines


def plot(rows, path):
    """Time and speedup over the dense baseline: against N for scale-N (log-log, forward and forward+backward), and
    per workload and sparsity for the others (bars). Panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "ms" in r and (r["what"].endswith("fwd") or r["what"].endswith("fwd+bwd"))]
    scale = [r for r in timed if r["workload"] == "scale-N"]
    other = [r for r in timed if r["workload"] != "scale-N" and "module" in r["what"]]
    panels = (2 if scale else 0) + (1 if other else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if scale:
        ax_time, ax_speed = axes.pop(0), axes.pop(0)
        series = {}
        for r in scale:
            series.setdefault(r["what"], []).append(r)
        for what, rs in sorted(series.items()):
            style = "s--" if what.startswith("dense") else "o-"
            ax_time.plot([r["N"] for r in rs], [r["ms"] for r in rs], style, label=what)
            if "module" in what:
                ax_speed.plot([r["N"] for r in rs], [r["speedup_vs_dense"] for r in rs], "o-", label=what)
        ax_time.set(xscale="log", yscale="log", xlabel="N (tokens)", ylabel="ms", title="scale-N: time vs N")
        ax_speed.set(xscale="log", xlabel="N (tokens)", ylabel="speedup over dense", title="scale-N: speedup vs N")
        for ax in (ax_time, ax_speed):
            ax.legend(fontsize=7)
    if other:
        ax = axes.pop(0)
        labels = sorted({f"{r['workload']}\n{r['what'].rsplit(' module', 1)[0]}" for r in other})
        for offset, kind in ((-0.2, "module fwd"), (0.2, "module fwd+bwd")):
            kind_rows = {f"{r['workload']}\n{r['what'].rsplit(' module', 1)[0]}": r
                         for r in other if r["what"].endswith(kind)}
            if not kind_rows:
                continue
            xs = [i + offset for i, lab in enumerate(labels) if lab in kind_rows]
            picked = [kind_rows[lab] for lab in labels if lab in kind_rows]
            # the headline (in-model) where measured, else the single synchronised call
            ax.bar(xs, [r.get("in_model_speedup_vs_dense", r["speedup_vs_dense"]) for r in picked], width=0.4,
                   label=f"{kind}, in model")
            ax.plot(xs, [r["speedup_vs_dense"] for r in picked], "k_", markersize=10,
                    label=f"{kind}, single call")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
        ax.set(ylabel="speedup over dense", title="speedup per workload and sparsity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="wan-1.3b", help=f"comma list of {sorted(WORKLOADS)} or 'all'")
    p.add_argument("--sparsities", default="0.9,0.95,0.97")
    p.add_argument("--backends", default="auto", help="comma list of pallas, xla, reference, auto")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--layers", type=int, default=30,
                   help="attention calls per jitted step of the in-model timing (the headline; 0: skip it)")
    p.add_argument("--quant", default="none",
                   help="comma list of none, int8, int8_fp8: the sparse branch in bf16 or low bit (pallas: the INT8 "
                        "kernel forward, bf16 backward; else fake quant); several are timed on the same inputs")
    p.add_argument("--linear-scope", default="complement",
                   help="comma list of complement, all: the linear branch over the unselected blocks (the paper's "
                        "form) or over all keys")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd: which passes to time")
    p.add_argument("--no-kernel-only", action="store_true", help="skip the kernel-only rows")
    p.add_argument("--no-error", action="store_true", help="skip the error check vs dense attention")
    p.add_argument("--max-n", type=int, default=None, help="skip shapes with N above this")
    p.add_argument("--min-n", type=int, default=None, help="skip shapes with N below this")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: the 'tiny' workload, 3 iterations")
    p.add_argument("--out", default="runs/benchmark", help="folder for results.json and speedup.png")
    p.add_argument("--fwd-kernel", default="auto", choices=["auto", "triton", "mosaic"],
                   help="pallas forward's sparse part (KernelConfig.forward): Triton kernel, Mosaic GPU kernel "
                        "(Hopper) or auto (heuristic_config: Mosaic on Hopper where it supports the shape)")
    p.add_argument("--bwd-kernel", default="auto", choices=["auto", "triton", "mosaic"],
                   help="pallas backward's sparse loops (dQ, dK/dV; KernelConfig.backward): as --fwd-kernel")
    p.add_argument("--kernel", default=None, metavar="FIELD=VALUE[,...]",
                   help="other KernelConfig fields of the pallas backend, e.g. block_sum_dtype=float16, and Triton "
                        "launch entries, e.g. launch.dq_linear=8/2/64 (warps/stages/rows)")
    args = p.parse_args(argv)
    try:
        changes = kernel_changes(args.kernel)
    except ValueError as e:
        p.error(f"--kernel {e} (forward, backward: --fwd-kernel, --bwd-kernel)")

    names = ["tiny"] if args.tiny else (
        [n for n in WORKLOADS if n != "tiny"] if args.workloads == "all" else args.workloads.split(","))
    for n in names:
        if n not in WORKLOADS:
            p.error(f"unknown workload {n!r}; choose from {sorted(WORKLOADS)}")
    iters = 3 if args.tiny else args.iters
    layers = 2 if args.tiny else args.layers
    sparsities = [float(s) for s in args.sparsities.split(",")]
    quants, scopes, passes = args.quant.split(","), args.linear_scope.split(","), args.passes.split(",")
    for flag, values, allowed in (("--quant", quants, QUANTS), ("--linear-scope", scopes, SCOPES),
                                  ("--passes", passes, PASSES)):
        if not values or any(x not in allowed for x in values):
            p.error(f"{flag} {','.join(values)!r}: give a comma list of {', '.join(allowed)}")
    backends = args.backends.split(",")
    jobs = [(n, s, *distinct_sparsities(s[2], sparsities)) for n in names for s in WORKLOADS[n]
            if (args.max_n is None or s[2] <= args.max_n) and (args.min_n is None or s[2] >= args.min_n)]
    collapsed = [note for *_, notes in jobs for note in notes]
    device = jax.devices()[0]
    meta = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
            "python": sys.version.split()[0], "dense_baseline": "cudnn" if device.platform == "gpu" else "xla",
            "fwd_kernel": args.fwd_kernel, "bwd_kernel": args.bwd_kernel, "kernel_changes": changes,
            "kernel_config": {},
            "collapsed_sparsities": collapsed}
    print(f"device: {meta['device']} | jax {meta['jax']} | dense baseline: {meta['dense_baseline']}")
    for note in collapsed:
        print(note)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    total = sum(len(kept) for _, _, kept, _ in jobs) * len(backends) * len(quants) * len(scopes)
    with tqdm(total=total, desc="benchmark", file=sys.stderr) as progress:
        for name, shape, kept, _ in jobs:
            kernel, effective = kernel_config(shape, args.fwd_kernel, args.bwd_kernel, changes=changes)
            meta["kernel_config"]["B{} H{} N{} D{}".format(*shape)] = config_json(effective)
            def save(shape_rows, name=name):  # after every variant: a run cut short keeps its rows
                with open(os.path.join(args.out, "results.json"), "w") as f:
                    json.dump({"meta": meta, "rows": rows + [{"workload": name, **r} for r in shape_rows]}, f,
                              indent=1)

            rows += [{"workload": name, **r} for r in bench_shape(
                shape, kept, backends, iters, not args.no_kernel_only, not args.no_error, progress, quants, kernel,
                layers, scopes, passes, on_rows=save)]
    plot(rows, os.path.join(args.out, "speedup.png"))
    print_table(rows, tflops=device.platform == "gpu")
    if device.platform != "gpu":
        print(f"(effective TFLOP/s left out on {device.platform}: it measures the GPU kernels; results.json has it)")
    if collapsed:
        print("\n".join(["Sparsities with the same top-k (not measured twice):", *collapsed]))
    targets = target_lines(rows)
    if targets:
        print("\nTargets (pallas; speedup over cuDNN in the same run, low bit over the bf16 forward; in-model):")
        print("\n".join(f"  {line}" for line in targets))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": targets}, f, indent=1)
    print(f"\nwrote {args.out}/results.json and {args.out}/speedup.png")


if __name__ == "__main__":
    main()
