"""GPU profile driver: where the fixed per-program cost of the Mosaic backward kernels (dQ, dK/dV) goes.

    python -m experiments.dev.profile_mosaic --mode timing trace --out DIR    # CUPTI kernel times, on-device traces
    python -m experiments.dev.profile_mosaic --mode run --kernel dq --case wan95   # a few launches for ncu to wrap
    python -m experiments.dev.profile_mosaic --mode trim --csv FILE                # top SASS lines of an ncu source CSV

Inputs: wan-1.3b (B=1, H=12, N=32760, D=128, bf16) with the SLA router LUT at 95% (topk 25 of 512 key blocks), alpha
random, lse / delta random (their values do not change the work). Cases: "wan95" (the router LUT; dK/dV over its
transposed LUT), "fixed" (dQ: a random LUT of length 1; dK/dV: all counts 0), "topkT" (dQ: random LUTs of length T,
for the slope / intercept of kernel time against the LUT length without host overhead).
* timing: kernel-only times by CUPTI (jax.experimental.mosaic.gpu.profiler.measure), median of --runs launches, and
  the synchronised wall clock of one call, per kernel and case. Each kernel has one build (the dQ kernel with the
  library's ring of 4 K/V slots); the variants that were measured and deleted, and the commits that still have them:
  docs/dev/backward_kernels.md.
* trace: Mosaic's on-device profiler (CompilerParams profile_space / profile_dir, the kernels' jax.named_scope
  regions): per program and warpgroup the SM clock at entry / exit of each region and the global timer at program
  start. Summarised here: region lengths in cycles, where in the program's life each starts, the gap between
  consecutive programs on one SM (launch and teardown, invisible to the regions) and the tail of the grid.
JSON to DIR/profile_mosaic.json; a short table at the end of the output.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.dev.common import kernel_ms, record_error, uniform_lut, wan_setup
from experiments.timing import pipelined_seconds, time_fn

RESULTS: dict = {}
SAVE_PATH: list = []  # where save() writes RESULTS (set by main)


def save():
    """Writes RESULTS as JSON (after every case: a run cut off by its time limit keeps what it measured)."""
    if SAVE_PATH:
        with open(SAVE_PATH[0], "w") as f:
            json.dump(RESULTS, f, indent=1)


DQ_STAGES = 4  # the library's choice (attention.backward_dq calls the dQ kernel with a ring of 4 K/V slots)


def wan_inputs(seed=29):
    """wan-1.3b inputs at 95%: dict of q, k, v, do (B, N, H, D) bf16, lut (B, H, Nq, topk), lut_t, count, alpha,
    lse, delta (B, H, Npad) float32 and the sizes."""
    from pallas_kernels.linear_states import transpose_lut

    q, k, v, do, _, _, lut, alpha, cfg = wan_setup(0.95, seed, 1, 12, 32760, 128, 128, 64)
    rng = np.random.default_rng(seed)
    lse = jnp.asarray(rng.uniform(5.0, 8.0, (1, 12, cfg.npad)), jnp.float32)
    delta = jnp.asarray(rng.standard_normal((1, 12, cfg.npad)) * 0.1, jnp.float32)
    lut_t, count = jax.jit(transpose_lut, static_argnums=1)(lut, cfg.nk)
    arrays = {"q": q, "k": k, "v": v, "do": do, "lut": lut, "lut_t": lut_t, "count": count, "alpha": alpha}
    return {**arrays, "lse": lse, "delta": delta, "nq": cfg.nq, "nk": cfg.nk, "rng": rng}


def dq_case(x, case):
    """(builder of (jitted dq function, its arguments), description) for one dQ case; the builder's profile_dir turns
    on Mosaic's on-device profiler (KernelConfig.profile_dir)."""
    from pallas_kernels import KernelConfig
    from pallas_kernels.mosaic_dq import sparse_attention_dq_mosaic

    lut = x["lut"]
    if case == "fixed":
        lut = uniform_lut(x["rng"], 1, 12, x["nq"], x["nk"], 1)
    elif case.startswith("topk"):
        lut = uniform_lut(x["rng"], 1, 12, x["nq"], x["nk"], int(case[4:]))
    args = (x["q"], x["k"], x["v"], x["do"], x["lse"], x["delta"], lut, x["alpha"])

    def build(profile_dir=None):
        config = KernelConfig(profile_dir=profile_dir)
        return jax.jit(lambda *a: sparse_attention_dq_mosaic(*a, block_k=64, stages=DQ_STAGES, config=config)), args

    return build, {"topk": int(lut.shape[-1]), "programs": int(12 * x["nq"])}


def dkv_case(x, case):
    """(builder of (jitted dk, dv function, its arguments), description) for one dK/dV case; the builder's
    profile_dir turns on Mosaic's on-device profiler (KernelConfig.profile_dir)."""
    from pallas_kernels import KernelConfig
    from pallas_kernels.mosaic_dkv import sparse_attention_dkv_mosaic

    count = jnp.zeros_like(x["count"]) if case == "fixed" else x["count"]
    args = (x["q"], x["k"], x["v"], x["do"], x["lse"], x["delta"], x["lut_t"], count, x["alpha"])

    def build(profile_dir=None):
        config = KernelConfig(profile_dir=profile_dir)
        return jax.jit(lambda *a: sparse_attention_dkv_mosaic(*a, config=config)), args

    return build, {"sum_count": int(jnp.sum(count)), "programs": int(12 * x["nk"])}


def cupti_ms(fn, args, runs):
    """Median and min kernel-only milliseconds over `runs` launches (CUPTI), and the kernel names seen."""
    median, per_iter = kernel_ms(fn, args, iterations=runs)
    return median, min(sum(ms for _, ms in it) for it in per_iter), sorted({name for name, _ in per_iter[0]})


def timing(x, runs, cases, names_path):
    """CUPTI kernel times and the synchronised wall clock of one call (as the earlier probes timed), per case."""
    out, names = {}, set()
    for kernel, make in (("dq", dq_case), ("dkv", dkv_case)):
        for case in cases[kernel]:
            build, desc = make(x, case)
            key = f"{kernel}_{case}"
            row = dict(desc)
            try:
                fn, args = build()
                jax.block_until_ready(fn(*args))
                row["ms_median"], row["ms_min"], kn = cupti_ms(fn, args, runs)
                row["kernels"] = kn
                names.update(kn)
                row["wall_ms_median"] = 1e3 * time_fn(fn, *args, warmup=3, iters=runs)
            except Exception as e:  # noqa: BLE001 - record and go on
                record_error(row, "error", e)
            print("timing", key, json.dumps(row), flush=True)
            out[key] = row
            RESULTS["timing"] = out
            save()
            if names_path:
                with open(names_path, "w") as f:
                    f.write("\n".join(sorted(names)))


CAPTURED: list = []


def capture_profiler_buffers():
    """Make Mosaic's profiler keep its raw buffer (the trace JSON it writes mixes ns and SM cycles)."""
    from jax.experimental.mosaic.gpu import profiler as mgpu_profiler

    def dump(self, buffer, f, grid, block):
        CAPTURED.append((np.asarray(buffer).astype(np.int64), dict(self.interned_names), self.entries_per_warpgroup))
        f.write("{}")

    mgpu_profiler.ProfilerSpec.dump = dump


def region_times(tags, clocks, names):
    """{region: (start, length)} in cycles from one warpgroup's (tag, clock) events; nested repeats of one name
    count once (outermost); starts relative to the warpgroup's first event."""
    exit_bit = 1 << 31
    depth, opened, out = {}, {}, {}
    for tag, clk in zip(tags, clocks):
        name = names[int(tag) & (exit_bit - 1)]
        if int(tag) & exit_bit:
            depth[name] -= 1
            if depth[name] == 0:
                start, length = out.get(name, (opened[name], 0))
                out[name] = (start, length + clk - opened[name])
        else:
            if depth.get(name, 0) == 0:
                opened[name] = clk
            depth[name] = depth.get(name, 0) + 1
    return out


def summarise_trace(buf, interned, entries, mhz):
    """Per-region cycles (median over programs, per warpgroup role), program span, inter-program gap on one SM,
    tail of the grid. buf: the profiler's raw uint32 buffer as int64."""
    names = {v: k for k, v in interned.items()}
    per_wg = buf.reshape(-1, 3, entries)
    nblocks = per_wg.shape[0]
    start_ns = per_wg[:, 0, 0]
    start_ns = (start_ns - start_ns[0]) % 2**32
    start_ns = np.where(start_ns > 2**31, start_ns - 2**32, start_ns)
    start_ns -= start_ns.min()
    sm = per_wg[:, 0, 1]
    regions = {"compute": {}, "memory": {}}
    spans, first_clock, last_clock = [], np.zeros(nblocks, np.int64), np.zeros(nblocks, np.int64)
    for blk in range(nblocks):
        clocks_all = []
        for wg in range(3):
            used = int(per_wg[blk, wg, 2])
            ev = per_wg[blk, wg, 3 : 3 + used]
            tags, clocks = ev[0::2], ev[1::2]
            if not len(clocks):
                continue
            clocks_all.append(clocks)
        base = min(int(c[0]) for c in clocks_all)
        for wg in range(3):
            used = int(per_wg[blk, wg, 2])
            ev = per_wg[blk, wg, 3 : 3 + used]
            tags, clocks = ev[0::2], (ev[1::2] - base) % 2**32
            role = "memory" if wg == 2 else "compute"
            for name, (st, ln) in region_times(tags, clocks, names).items():
                regions[role].setdefault(name, {"start": [], "length": []})
                regions[role][name]["start"].append(st)
                regions[role][name]["length"].append(ln)
        first_clock[blk] = base
        last_clock[blk] = max(int((c[-1] - base) % 2**32) for c in clocks_all)
        spans.append(last_clock[blk])
    spans = np.asarray(spans)
    summary = {"programs": nblocks, "sms": len(np.unique(sm))}
    for role, regs in regions.items():
        summary[role] = {
            name: {
                "start_med": float(np.median(r["start"])),
                "length_med": float(np.median(r["length"])),
                "length_mean": float(np.mean(r["length"])),
                "length_p90": float(np.percentile(r["length"], 90)),
            }
            for name, r in sorted(regs.items(), key=lambda kv: np.median(kv[1]["start"]))
        }
    summary["span_cycles_med"] = float(np.median(spans))
    summary["span_cycles_mean"] = float(np.mean(spans))
    periods, ratios = [], []
    for s in np.unique(sm):
        idx = np.where(sm == s)[0]
        idx = idx[np.argsort(start_ns[idx])]
        for a, b in itertools.pairwise(idx):
            periods.append(start_ns[b] - start_ns[a])
            ratios.append(spans[a] / max(start_ns[b] - start_ns[a], 1))
    periods = np.asarray(periods, np.float64)
    summary["period_ns_med"] = float(np.median(periods))
    summary["period_ns_mean"] = float(np.mean(periods))
    summary["cycles_per_ns_p99_of_span_over_period"] = float(np.percentile(ratios, 99))
    if mhz:
        f = mhz / 1e3
        summary["sm_clock_mhz"] = mhz
        gaps = []
        for s in np.unique(sm):
            idx = np.where(sm == s)[0]
            idx = idx[np.argsort(start_ns[idx])]
            for a, b in itertools.pairwise(idx):
                gaps.append(start_ns[b] - start_ns[a] - spans[a] / f)
        summary["gap_ns_med"] = float(np.median(gaps))
        summary["gap_ns_mean"] = float(np.mean(gaps))
        ends = start_ns + spans / f
        summary["grid_ns"] = float(ends.max())
        last_end_per_sm = [ends[sm == s].max() for s in np.unique(sm)]
        summary["tail_ns_med_sm_idle_at_end"] = float(ends.max() - np.median(last_end_per_sm))
        summary["busy_fraction"] = float(np.sum(spans / f) / (len(np.unique(sm)) * ends.max()))
    return summary


def sm_clock_mhz():
    """Current SM clock from nvidia-smi (None if unavailable)."""
    try:
        import subprocess

        txt = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return float(txt.split()[0])
    except Exception:  # noqa: BLE001
        return None


def trace(x, cases):
    """On-device profiler traces of each kernel per case, summarised."""
    capture_profiler_buffers()
    out = {}
    prof_dir = tempfile.mkdtemp()
    for kernel, make in (("dq", dq_case), ("dkv", dkv_case)):
        for case in cases[kernel]:
            key = f"{kernel}_{case}"
            row = {}
            try:
                build, desc = make(x, case)
                row.update(desc)
                fn, args = build(profile_dir=prof_dir)
                for _ in range(4):  # the last of 4 calls (warm clocks, caches)
                    jax.block_until_ready(fn(*args))
                    mhz = sm_clock_mhz()
                    jax.effects_barrier()
                    for name in os.listdir(prof_dir):  # the trace file name is fixed at lowering: free it again
                        os.remove(os.path.join(prof_dir, name))
                buf, interned, entries = CAPTURED[-1]
                row["captured_calls"] = len(CAPTURED)
                row.update(summarise_trace(buf, interned, entries, mhz))
            except Exception as e:  # noqa: BLE001
                record_error(row, "error", e)
            print("trace", key, json.dumps(row), flush=True)
            out[key] = row
            RESULTS["trace"] = out
            save()


def module_breakdown(runs):
    """sla2_attention (pallas backend, the library's KernelConfig: heuristic_config) forward+backward on wan-1.3b
    at 95% and cuDNN's: every kernel's CUPTI time in one call (summed by name), their sum, and the synchronised
    wall-clock median of the same call; wall minus the sum is time the GPU sat idle (host, launches) plus timing
    overhead."""

    import sla2_jax as sla
    from experiments.dev.common import config_dict

    q, k, v, do, *_, cfg = wan_setup(0.95, 41, 1, 12, 32760, 128, 128, 64)
    mcfg = sla.SLA2Config(topk_ratio=0.05, backend="pallas", alpha="mass")
    module = lambda q, k, v: sla.sla2_attention(q, k, v, config=mcfg)
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    out = {"config": config_dict(cfg.config)}
    for name, fwd in (("module", module), ("cudnn", cudnn)):
        grads = jax.jit(
            lambda q, k, v, do, fwd=fwd: jax.grad(
                lambda *x: jnp.sum(fwd(*x).astype(jnp.float32) * do), argnums=(0, 1, 2)
            )(q, k, v)
        )
        row = {"wall_ms_median": 1e3 * time_fn(grads, q, k, v, do, warmup=3, iters=runs)}
        row["wall_ms_pipelined"] = 1e3 * pipelined_seconds(grads, q, k, v, do, calls=runs, repeats=3)
        row["kernel_sum_ms_median"], per_iter = kernel_ms(grads, (q, k, v, do), iterations=runs)
        by_name: dict = {}
        for it in per_iter:
            for kname, ms in it:
                by_name.setdefault(kname, []).append(ms)
        row["kernels"] = sorted(
            ((kname, len(v) // runs, sum(v) / runs) for kname, v in by_name.items()), key=lambda t: -t[2]
        )
        print("module", name, json.dumps(row)[:3000], flush=True)
        out[name] = row
        RESULTS["module"] = out
        save()


def run_for_ncu(x, kernel, case, iters):
    """iters launches of one kernel (ncu wraps this process; --launch-skip 1 skips the first)."""
    build, _ = (dq_case if kernel == "dq" else dkv_case)(x, case)
    fn, args = build()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))


def trim_sass_csv(path, top=40):
    """The `top` SASS lines of an ncu source-page CSV by warp stall samples, with their stall columns."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head_i = next(i for i, r in enumerate(rows) if any("Warp Stall Sampling (All" in c for c in r))
    head, body = rows[head_i], [r for r in rows[head_i + 1 :] if len(r) == len(rows[head_i])]
    col = next(i for i, c in enumerate(head) if c.startswith("Warp Stall Sampling (All"))

    def num(s):
        try:
            return float(s.replace(",", ""))
        except ValueError:
            return 0.0

    total = sum(num(r[col]) for r in body)
    keep = [i for i, c in enumerate(head) if num_col(c)] or list(range(len(head)))
    print(f"# {len(body)} SASS lines, {total:.0f} stall samples; top {top}; columns: {[head[i] for i in keep]}")
    ranked = sorted(range(len(body)), key=lambda i: -num(body[i][col]))[:top]
    for i in sorted(ranked):
        r = body[i]
        share = 100 * num(r[col]) / max(total, 1)
        fields = [r[j] if j < 2 else f"{head[j]}={r[j]}" for j in keep if j < 2 or num(r[j])]
        print(f"{i:5d} {share:5.1f}% | " + " | ".join(fields))


def num_col(name):
    """Columns of the SASS CSV worth keeping: address, source, stall samples and the stall reasons."""
    return name in ("Address", "Source") or "Stall" in name or "stall" in name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = ("timing", "trace", "module", "run", "trim")
    ap.add_argument("--mode", nargs="+", default=["timing", "trace"], choices=modes)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kernel", default="dq")
    ap.add_argument("--case", default="wan95")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--csv")
    ap.add_argument("--names")
    ap.add_argument("--dq-cases", nargs="*", default=["wan95", "fixed", "topk4", "topk12"])
    ap.add_argument("--dkv-cases", nargs="*", default=["wan95", "fixed"])
    ap.add_argument("--trace-dq-cases", nargs="*", default=["wan95", "fixed"])
    ap.add_argument("--trace-dkv-cases", nargs="*", default=["wan95", "fixed"])
    args = ap.parse_args()
    if args.mode == ["trim"]:
        trim_sass_csv(args.csv)
        return
    x = wan_inputs()
    if args.mode == ["run"]:
        run_for_ncu(x, args.kernel, args.case, args.iters)
        return
    RESULTS.update(device=str(jax.devices()[0].device_kind), jax=jax.__version__, started=time.time())
    os.makedirs(args.out, exist_ok=True)
    SAVE_PATH.append(os.path.join(args.out, "profile_mosaic.json"))
    if "trace" in args.mode:
        trace(x, {"dq": args.trace_dq_cases, "dkv": args.trace_dkv_cases})
    if "module" in args.mode:
        module_breakdown(args.runs)
    if "timing" in args.mode:
        timing(x, args.runs, {"dq": args.dq_cases, "dkv": args.dkv_cases}, args.names)
    summary()


def summary():
    """A short table for the end of the output."""
    for name, r in RESULTS.get("module", {}).items():
        if name == "config":
            continue
        print(
            f"{name} fwd+bwd: wall {r['wall_ms_median']:.3f} ms (pipelined {r['wall_ms_pipelined']:.3f}), "
            f"kernels {r['kernel_sum_ms_median']:.3f} ms"
        )
        for kname, n, ms in r["kernels"][:25]:
            print(f"    {ms:7.3f} ms  x{n:<3d} {kname[:100]}")
    print("\nkernel-only ms (CUPTI, median):")
    for key, r in RESULTS.get("timing", {}).items():
        extra = f" wall {r['wall_ms_median']:.3f}" if "wall_ms_median" in r else ""
        print(f"  {key:32s} {r.get('ms_median', float('nan')):7.3f} (min {r.get('ms_min', float('nan')):.3f}){extra}"
              + (" ERROR" if "error" in r else ""))  # fmt: skip
    for key, r in RESULTS.get("trace", {}).items():
        print(f"trace {key}: span {r.get('span_cycles_med')} cyc, period {r.get('period_ns_med')} ns, "
              f"gap {r.get('gap_ns_med')} ns, tail {r.get('tail_ns_med_sm_idle_at_end')} ns, busy "
              f"{r.get('busy_fraction')}, clock {r.get('sm_clock_mhz')}")  # fmt: skip
        for role in ("compute", "memory"):
            for name, st in r.get(role, {}).items():
                print(f"    {role:7s} {name:14s} start {st['start_med']:9.0f} len {st['length_med']:9.0f} "
                      f"(mean {st['length_mean']:.0f}, p90 {st['length_p90']:.0f}) cycles")  # fmt: skip


if __name__ == "__main__":
    main()
