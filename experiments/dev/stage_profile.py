"""Per-kernel time of one SLA2 module call on the GPU, from JAX's profiler: where the forward and backward go.

    python -m experiments.dev.stage_profile --what fwd fwd+bwd --sparsity 0.95 --out DIR [--kernel loop=pipelined]

For each call: compile and warm it, print its median wall time (experiments.timing), then run it once inside
jax.profiler.trace and read the device plane of the trace (jax.profiler.ProfileData): every kernel with its
duration, in launch order. Kernels are grouped into stages by name (STAGES: Triton kernels by their Python
function, Mosaic GPU kernels, cuBLAS / cuDNN, XLA fusions); the sum of kernel times is compared with the wall time
(the difference is launch gaps and host work). Writes <what>_s<sparsity>_stages.{md,json} under --out. --kernel
FIELD=VALUE (repeatable) changes a field of the call's KernelConfig (heuristic_config for the shape), passed as
SLA2Config(kernel=...); the record names the KernelConfig used.
(Nsight Compute was tried first and hung or crashed on these JAX programs on the device; the profiler needs nothing
beyond jax.)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import tempfile
from collections import defaultdict

# (stage, pattern on the kernel name), first match wins; kernels matching none are "other XLA fusions / copies".
STAGES = [
    ("mosaic sparse forward", r"sla_sparse(_linear)?_fwd"),
    ("mosaic dq + dk/dv (both named entry_mosaic_gpu_kernel)", r"entry_mosaic"),
    ("triton forward / linear epilogue (sla_fwd)", r"sla_fwd"),
    ("triton dq rows + dphi(Q) (sla_dq)", r"sla_dq"),
    ("triton dk/dv linear part (sla_dkv)", r"sla_dkv"),
    ("per-block outer sums h_j, dH_j (sla_sum)", r"sla_sum"),
    ("router front end (sla_prep, sla_select)", r"sla_prep|sla_select"),
    ("other Pallas kernels", r"sla_|mosaic"),
    ("masked state matmuls (XLA GEMM fusions)", r"gemm_fusion|cublas|nvjet|sm90_xmma"),
]


def stage_of(kernel_name: str) -> str:
    """Stage label of one kernel name (STAGES, first match)."""
    for stage, pattern in STAGES:
        if re.search(pattern, kernel_name, flags=re.IGNORECASE):
            return stage
    return "XLA fusions / copies"


def device_kernels(trace_dir: str) -> tuple[list[tuple[str, float, float]], list[str]]:
    """(kernel name, microseconds, idle microseconds before it) in start order from the trace under trace_dir
    (device 0's stream lines; the idle time is since the previous kernel ended), and the names of the trace's
    lines (for the record)."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
    plane = data.find_plane_with_name("/device:GPU:0")
    if plane is None:
        raise RuntimeError(f"no /device:GPU:0 plane in the trace; planes: {[p.name for p in data.planes]}")
    line_names = [line.name for line in plane.lines]
    events = []
    for line in plane.lines:
        if line.name.startswith("Stream"):
            events += [(e.start_ns, e.name, e.duration_ns) for e in line.events]
    kernels, end = [], None
    for start, name, duration in sorted(events):
        idle = 0.0 if end is None else max(0.0, start - end) / 1e3
        kernels.append((name, duration / 1e3, idle))
        end = start + duration if end is None else max(end, start + duration)
    return kernels, line_names


CALL_ANNOTATION = "stage_profile_call"


def host_timeline(trace_dir: str, top: int = 25) -> dict:
    """Where the wall time of the traced call goes outside the kernels: the host span of the call (the
    CALL_ANNOTATION TraceMe around it), the first kernel's start and the last kernel's end on the device (both
    planes on the profiler's one clock), and the host events (summed per name, clipped to the window) before the
    first kernel and after the last one: dispatch and synchronisation."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
    device = data.find_plane_with_name("/device:GPU:0")
    host = data.find_plane_with_name("/host:CPU")
    if device is None or host is None:
        return {"error": f"planes {[p.name for p in data.planes]}"}
    calls = [e for line in host.lines for e in line.events if e.name == CALL_ANNOTATION]
    if not calls:
        return {"error": "no call annotation in the host plane"}
    call = max(calls, key=lambda e: e.start_ns)  # the last traced call (the others warm the profiler)
    c0, c1 = call.start_ns, call.start_ns + call.duration_ns
    spans = [
        (e.start_ns, e.start_ns + e.duration_ns)
        for line in device.lines
        if line.name.startswith("Stream")
        for e in line.events
        if c0 <= e.start_ns <= c1
    ]
    if not spans:
        return {"error": "no kernel inside the call's span"}
    k0, k1 = min(s for s, _ in spans), max(e for _, e in spans)

    def events_in(lo, hi):
        totals = defaultdict(float)
        for line in host.lines:
            for e in line.events:
                overlap = min(hi, e.start_ns + e.duration_ns) - max(lo, e.start_ns)
                if overlap > 0 and e.name != CALL_ANNOTATION:
                    totals[f"{line.name[:30]}: {e.name[:90]}"] += overlap / 1e3
        return dict(sorted(totals.items(), key=lambda x: -x[1])[:top])

    return {
        "call_us": (c1 - c0) / 1e3,
        "before_first_kernel_us": (k0 - c0) / 1e3,
        "kernels_span_us": (k1 - k0) / 1e3,
        "after_last_kernel_us": (c1 - k1) / 1e3,
        "host_events_before_first_kernel_us": events_in(c0, k0),
        "host_events_after_last_kernel_us": events_in(k1, c1),
    }


def host_text(timeline: dict) -> str:
    """Markdown lines of host_timeline's record."""
    if "error" in timeline:
        return f"host timeline: {timeline['error']}"
    lines = [
        f"traced call {timeline['call_us']:.0f} us = {timeline['before_first_kernel_us']:.0f} before the first kernel "
        f"+ {timeline['kernels_span_us']:.0f} kernels + {timeline['after_last_kernel_us']:.0f} after the last",
        "",
        "| host event (thread: name), before the first kernel | us |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v:.1f} |" for k, v in timeline["host_events_before_first_kernel_us"].items()]
    lines += ["", "| host event, after the last kernel | us |", "|---|---|"]
    lines += [f"| `{k}` | {v:.1f} |" for k, v in timeline["host_events_after_last_kernel_us"].items()]
    return "\n".join(lines)


def summarise(kernels: list[tuple[str, float, float]], wall_ms: float, label: str) -> tuple[str, dict]:
    """Markdown table (by stage, the 40 costliest kernels, the longest idle gaps) and a JSON-ready dict of one
    profiled call."""
    by_stage, by_kernel, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, us, _ in kernels:
        by_stage[stage_of(name)] += us
        by_kernel[name[:100]] += us
        count[name[:100]] += 1
    total = sum(by_stage.values())
    idle = sum(gap for _, _, gap in kernels)
    lines = [
        f"{label}: {len(kernels)} kernels, {total / 1e3:.3f} ms of kernel time, {idle / 1e3:.3f} ms idle between "
        f"the first and last kernel (traced call); median wall time {wall_ms:.3f} ms (untraced calls)",
        "",
        "| stage | ms | share |",
        "|---|---|---|",
    ]
    for stage, us in sorted(by_stage.items(), key=lambda x: -x[1]):
        lines.append(f"| {stage} | {us / 1e3:.3f} | {us / total:.0%} |")
    lines += ["", "| kernel | launches | ms |", "|---|---|---|"]
    for name, us in sorted(by_kernel.items(), key=lambda x: -x[1])[:40]:
        lines.append(f"| `{name}` | {count[name]} | {us / 1e3:.3f} |")
    lines += ["", "| idle before kernel | us |", "|---|---|"]
    for name, _, gap in sorted(kernels, key=lambda x: -x[2])[:8]:
        lines.append(f"| `{name[:100]}` | {gap:.1f} |")
    record = {
        "label": label,
        "wall_ms": wall_ms,
        "kernel_ms": total / 1e3,
        "stages_ms": {k: v / 1e3 for k, v in by_stage.items()},
        "idle_ms": idle / 1e3,
        "kernels": [{"name": n, "us": t, "idle_before_us": g, "stage": stage_of(n)} for n, t, g in kernels],
    }
    return "\n".join(lines), record


def profile_call(
    what: str,
    sparsity: float,
    shape: tuple[int, int, int, int],
    iters: int,
    out_dir: str | None,
    hlo: bool = False,
    quant: str = "none",
    kernel_changes: dict | None = None,
):
    """Compiles and warms the module call, measures its median wall time, then traces one call and writes the
    per-stage summary (what: "fwd" = sla2_attention, "fwd+bwd" = grad of sum(o * do) w.r.t. q, k, v)."""
    import jax

    import sla2_jax as sla
    from experiments.benchmark import fwd_bwd
    from experiments.inputs import random_qkv
    from experiments.timing import time_fn

    if jax.default_backend() != "gpu":
        raise SystemExit("stage_profile reads the GPU's kernels from a trace: run it on a GPU machine")
    batch, heads, seq_len, dim = shape
    q, k, v = random_qkv(0, batch, seq_len, heads, dim)
    do = random_qkv(1, batch, seq_len, heads, dim)[0]
    kernel = kernel_config(shape, q.dtype, kernel_changes or {})
    cfg = sla.SLA2Config(topk_ratio=round(1 - sparsity, 6), backend="pallas", alpha="mass", quant=quant, kernel=kernel)
    module = lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg)  # noqa: E731
    fn, args = (jax.jit(module), (q, k, v)) if what == "fwd" else (fwd_bwd(module), (q, k, v, do))
    wall_ms = 1e3 * time_fn(fn, *args, iters=iters)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(3):  # the host timeline reads the last call; the kernel table the whole trace of one
                with jax.profiler.TraceAnnotation(CALL_ANNOTATION):
                    jax.block_until_ready(fn(*args))
        kernels, line_names = device_kernels(trace_dir)
        timeline = host_timeline(trace_dir)
    # one call's kernels: the last of the three (its first kernel's idle time is the gap between calls)
    kernels = [(name, us, idle if i else 0.0) for i, (name, us, idle) in enumerate(kernels[-len(kernels) // 3 :])]
    device = jax.devices()[0].device_kind
    label = (
        f"module {what}, quant {quant}, sparsity {sparsity}, (B, H, N, D) = {shape}, {device}, jax {jax.__version__}"
    )
    text, record = summarise(kernels, wall_ms, label)
    text += "\n\n" + host_text(timeline)
    record["trace_lines"] = line_names
    record["kernel_config"] = {**dataclasses.asdict(kernel), "launch": {n: list(v) for n, v in kernel.launch}}
    record["host_timeline"] = timeline
    print(text, flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        stem = f"{what.replace('+', '_')}_s{sparsity:g}"
        if hlo:  # the optimised HLO names the XLA fusions of the table (what each one reads and writes)
            with open(os.path.join(out_dir, f"{stem}_hlo.txt"), "w") as f:
                f.write(fn.lower(*args).compile().as_text())
        with open(os.path.join(out_dir, f"{stem}_stages.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out_dir, f"{stem}_stages.json"), "w") as f:
            json.dump(record, f, indent=1)


def parse_kernel_changes(assignments: list[str]) -> dict:
    """['FIELD=VALUE', ...] -> KernelConfig changes, parsed and validated as the benchmark's --kernel
    (experiments.benchmark.kernel_changes; 'launch.KERNEL=W/S/R' sets one Triton kernel's launch: warps, stages,
    rows). SystemExit naming a bad item."""
    from experiments.benchmark import kernel_changes

    try:
        return kernel_changes(",".join(assignments), reserved=())
    except ValueError as error:
        raise SystemExit(f"--kernel: {error}") from None


def kernel_config(shape, dtype, changes: dict):
    """heuristic_config for a (B, H, N, D) call with `changes` (parse_kernel_changes; launch entries merged into
    the heuristic's table); validated by KernelConfig."""
    from experiments.benchmark import with_kernel_changes
    from pallas_kernels import heuristic_config

    _, _, seq_len, dim = shape
    return with_kernel_changes(heuristic_config(seq_len, dim, dtype), changes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.95])
    p.add_argument("--shape", type=int, nargs=4, default=[1, 12, 32760, 128], metavar=("B", "H", "N", "D"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="folder for the JSON and markdown summaries")
    p.add_argument("--quant", choices=["none", "int8", "int8_fp8"], default="none", help="SLA2Config.quant")
    p.add_argument("--hlo", action="store_true", help="also write the compiled HLO text of each call under --out")
    p.add_argument(
        "--kernel",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a field of the call's KernelConfig, e.g. outputs_in_ring=false, loop=pipelined, forward=triton, "
        "launch.dq=8/2/128 (VALUE: true / false, an integer, or a string); repeatable",
    )
    args = p.parse_args(argv)
    changes = parse_kernel_changes(args.kernel)
    for sparsity in args.sparsity:
        for what in args.what:
            profile_call(what, sparsity, tuple(args.shape), args.iters, args.out, args.hlo, args.quant, changes)


if __name__ == "__main__":
    main()
