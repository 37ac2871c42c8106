"""End-to-end Wan2.1-T2V-1.3B benchmark: whole guided videos, dense (cuDNN) vs SLA2 self-attention.

    python -m experiments.wan.benchmark --out wan_e2e               # GPU: 1.3B, 480p / 81 frames, 50 steps
    python -m experiments.wan.benchmark --tiny --out /tmp/wan_tiny  # CPU smoke run of the same code path

Each configuration (dense; SLA2 at each of --sparsities, in each --quant mode) samples one whole video the way
Wan does: latent 16 x 21 x 60 x 104 (81 frames at 480 x 832) = 32,760 tokens, --steps (50) steps of Wan's
UniPC solver on the flow-matching schedule shifted by 3.0 (480p), classifier-free guidance 5.0 with two
transformer calls per step (prompt and negative prompt: random text embeddings of Wan's 512 tokens x 4096).
1.3B shape, random weights (speed does not depend on them), bf16 weights and matmuls with the float32 residual
stream of the reference; SLA2's router is untrained (identity W_q, W_k). The 30 blocks run under one lax.scan;
one jitted step holds both transformer calls, the guidance and the solver update.

Reported per configuration (JSON and a Markdown summary in --out, rewritten after each configuration):
  video_s            wall seconds of the whole --steps loop with the compiled step (each step synchronised);
  step_s_median, step_s_min, step_s_max, step_s (all steps' seconds): one step = two transformer calls;
  compile_s          ahead-of-time compilation of the step (not in video_s), and warmup_step_s, one untimed step;
  peak_gib           the process's peak_bytes_in_use: per configuration when each runs in its own process
                     (--isolate, the default on GPU), else cumulative over the configurations run so far;
  step_temp_gib      the compiled step's temporary buffers (XLA memory analysis);
  self_attn_ms       (unless --no-attention-breakdown) the self-attention core alone (routing, kernels and
                     combine; or cuDNN) on random (1, N, H, D) bf16 q, k, v, median of 5 calls; self_attn_share_est
                     = self_attn_ms x layers x calls per step / step_s_median: an estimate from the core
                     timed alone, not a profile of the step;
  k_of_nk            key blocks each query block selects (SLA2), so collapsed sparsities are visible;
  final_finite       the sampled latents are finite.
video_speedup (dense video_s / video_s) is reported only for a full run on a GPU; --tiny is a smoke run whose
times mean nothing (it checks that every configuration compiles, samples and stays finite).
Expected wall time on one H100 for the 7 default configurations: about 6-7 minutes (per configuration ~25 s of
process start, random weights and compilation, plus its video: ~1 s per step for dense, less for SLA2);
--only picks configurations, --no-isolate saves the per-process start, --resume adds to an earlier run in
--out (e.g. a second call for the int8 rows when one call must stay under a time limit). --model 14b --resolution 720p (75,600
tokens, shift 5.0) is the 14B shape; it needs a large GPU and takes far longer per step (use --steps to bound it,
the per-video time then covers those steps only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.wan.sampling import DEFAULT_SHIFT   # imports jax but touches no device

LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160)}   # 81 frames at 480x832 / 720x1280 through the Wan VAE
TINY_LATENT = (4, 16, 16)
PAPER_VIDEO_SPEEDUP_97 = 2.30
RESULTS_JSON, RESULTS_MD = "wan_e2e.json", "wan_e2e.md"


# --------------------------------------------------------------------------------------------------
# Configurations (no jax device is touched here: an isolating parent process must leave the GPU to its children)
# --------------------------------------------------------------------------------------------------
def _shapes(args):
    """(base WanConfig, latent (F, H, W), block_q, block_k)."""
    import jax.numpy as jnp
    from experiments.wan.model import WanConfig, latent_tokens, wan_1_3b, wan_14b

    if args.tiny:
        cfg = WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, freq_dim=32, text_len=16,
                        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        latent, block_q, block_k = TINY_LATENT, 32, 16
    else:
        preset = wan_14b if args.model == "14b" else wan_1_3b
        cfg = preset(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        latent, block_q, block_k = LATENTS[args.resolution], 128, 64
    return cfg.replace(seq_len=latent_tokens(cfg, latent)), latent, block_q, block_k


def configurations(args) -> list[tuple[str, object]]:
    """[(name, WanConfig)]: dense, then SLA2 at each sparsity for each quant mode; filtered by --only."""
    import sla2_jax as sla

    base, _, block_q, block_k = _shapes(args)
    configs = [("dense", base)]
    for quant in args.quant:
        for sparsity in args.sparsities:
            sla_cfg = sla.SLA2Config(block_q=block_q, block_k=block_k, topk_ratio=round(1 - sparsity, 6),
                                     alpha=args.alpha, quant=quant, backend=args.backend)
            name = f"sla2-{round(sparsity * 100)}" + ("" if quant == "none" else f"-{quant}")
            configs.append((name, base.replace(attention="sla2", sla_config=sla_cfg)))
    if args.only:
        unknown = sorted(set(args.only) - {n for n, _ in configs})
        if unknown:
            raise SystemExit(f"--only: unknown configurations {unknown}; known: {[n for n, _ in configs]}")
        configs = [(n, c) for n, c in configs if n in args.only]
    return configs


def _selection(cfg, n_tokens: int):
    """(k, Nk) key blocks per query block of an SLA2 config; None for dense."""
    if cfg.sla_config is None:
        return None
    nk = math.ceil(n_tokens / cfg.sla_config.block_k)
    return min(nk, max(1, math.floor(cfg.sla_config.topk_ratio * nk + 1e-9))), nk   # SPEC: max(1, floor(r Nk))


# --------------------------------------------------------------------------------------------------
# Measurement (in the process that owns the device)
# --------------------------------------------------------------------------------------------------
def _versions() -> dict:
    import flax
    import jax

    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    device = jax.devices()[0]
    return {"jax": jax.__version__, "jaxlib": jaxlib_version, "flax": flax.__version__, "python": platform.python_version(),
            "platform": jax.default_backend(), "device": device.device_kind}


def _peak_bytes():
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


class Workload:
    """Random weights, noise and text embeddings, built once per process (the same seed gives the same values)."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from experiments.wan.model import WanModel, init_stacked_blocks

        self.args = args
        self.base, self.latent, _, _ = _shapes(args)
        cfg = self.base
        start = time.perf_counter()
        key = jax.random.key(args.seed)
        k_rest, k_blocks, k_x, k_ctx, k_neg, self.k_attn, self.k_qkv = jax.random.split(key, 7)
        self.rest_graphdef, self.rest_state = nnx.split(WanModel(cfg.replace(num_layers=0), rngs=nnx.Rngs(k_rest)))
        self.block_graphdef, self.block_states = init_stacked_blocks(cfg, k_blocks)
        n_latent = cfg.in_dim * math.prod(self.latent)
        self.noise = jax.random.normal(k_x, (n_latent,), jnp.float32).reshape(1, cfg.in_dim, *self.latent)
        text = (1, cfg.text_len, cfg.text_dim)
        self.context = jax.random.normal(k_ctx, text, jnp.float32).astype(jnp.bfloat16)
        self.negative = jax.random.normal(k_neg, text, jnp.float32).astype(jnp.bfloat16)
        jax.block_until_ready((self.rest_state, self.block_states, self.noise))
        self.params_b = sum(x.size for x in jax.tree.leaves((self.rest_state, self.block_states))) / 1e9
        self.init_s = time.perf_counter() - start


def _blocks_for(work: Workload, cfg):
    """Stacked block state for `cfg`: the shared dense blocks' weights plus the attention core's own parameters
    (SLA2's router and alpha), initialised once and broadcast over the layers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from experiments.wan.model import WanBlock

    if cfg.attention == "dense":
        return work.block_graphdef, work.block_states
    graphdef, state = nnx.split(WanBlock(cfg, nnx.Rngs(work.k_attn)))
    base = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(work.block_states)[0]}

    def pick(path, leaf):
        name = jax.tree_util.keystr(path)
        return base[name] if name in base else jnp.broadcast_to(leaf, (cfg.num_layers, *leaf.shape))

    return graphdef, jax.tree_util.tree_map_with_path(pick, state)


def _median_ms(fn, *args, reps: int = 5) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _self_attention_ms(work: Workload, cfg) -> float:
    """The self-attention core alone on random (1, N, H, D) bf16 q, k, v: median ms of 5 synchronised calls."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from experiments.wan.model import dense_attention, make_self_attention

    shape = (1, cfg.seq_len, cfg.num_heads, cfg.head_dim)
    q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16)
               for kk in jax.random.split(work.k_qkv, 3))
    if cfg.attention == "dense":
        return _median_ms(jax.jit(dense_attention), q, k, v)
    graphdef, state = nnx.split(make_self_attention(cfg, nnx.Rngs(0)))
    return _median_ms(jax.jit(lambda s, q, k, v: nnx.merge(graphdef, s)(q, k, v)), state, q, k, v)


def run_config(work: Workload, name: str, cfg) -> dict:
    """Sample one whole video with `cfg`; the result row (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from experiments.wan.model import forward_stacked
    from experiments.wan.sampling import make_solver, make_step, run_steps

    args = work.args
    selection = _selection(cfg, cfg.seq_len)
    row = {"name": name, "attention": cfg.attention,
           "sparsity": None if cfg.sla_config is None else round(cfg.sla_config.sparsity, 4),
           "quant": None if cfg.sla_config is None else cfg.sla_config.quant,
           "k_of_nk": None if selection is None else f"{selection[0]}/{selection[1]}"}
    try:
        block_graphdef, block_states = _blocks_for(work, cfg)
        rest_graphdef = work.rest_graphdef

        def velocity(params, x, t, context):
            rest_state, blocks = params
            return forward_stacked(nnx.merge(rest_graphdef, rest_state), block_graphdef, blocks, x, t, context)

        solver = make_solver(args.solver, args.steps, args.shift)
        params = (work.rest_state, block_states)
        state = solver.init(work.noise)
        start = time.perf_counter()
        step = make_step(velocity, solver, args.guidance).lower(
            params, state, work.noise, jnp.int32(0), work.context, work.negative).compile()
        row["compile_s"] = round(time.perf_counter() - start, 2)
        temp = getattr(step.memory_analysis(), "temp_size_in_bytes", None)
        row["step_temp_gib"] = None if temp is None else round(temp / 2**30, 3)
        start = time.perf_counter()
        jax.block_until_ready(step(params, state, work.noise, jnp.int32(0), work.context, work.negative))
        row["warmup_step_s"] = round(time.perf_counter() - start, 3)

        times: list[float] = []
        start = time.perf_counter()
        final = run_steps(step, solver, params, work.noise, work.context, work.negative,
                          progress=f"{name:>14s} video", step_times=times)
        final = jax.block_until_ready(final)
        row["video_s"] = round(time.perf_counter() - start, 3)
        row["step_s_median"] = round(statistics.median(times), 4)
        row["step_s_min"], row["step_s_max"] = round(min(times), 4), round(max(times), 4)
        row["step_s"] = [round(t, 4) for t in times]
        row["final_finite"] = bool(jnp.all(jnp.isfinite(final)))
        row["peak_gib"] = None if _peak_bytes() is None else round(_peak_bytes() / 2**30, 3)
        if args.attention_breakdown:
            attn_ms = _self_attention_ms(work, cfg)
            calls = 2 if args.guidance > 1 else 1
            row["self_attn_ms"] = round(attn_ms, 3)
            row["self_attn_share_est"] = round(attn_ms * 1e-3 * cfg.num_layers * calls / row["step_s_median"], 3)
    except Exception as err:  # keep the other configurations' numbers
        row["error"] = f"{type(err).__name__}: {str(err)[:600]}"
    return row


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def _smoke(header) -> bool:
    """--tiny, or a run on something other than a GPU (unknown when every child process died: not a smoke run,
    and without times no speedup is reported either)."""
    return header["tiny"] or header.get("platform", "gpu") != "gpu"


def finish(header: dict, results: list[dict]) -> None:
    """Derived columns (video_speedup on full GPU runs only) and notes: collapsed sparsities, int8 path."""
    dense = next((r for r in results if r["name"] == "dense" and "video_s" in r), None)
    for r in results:
        r.pop("video_speedup", None)
        if dense and "video_s" in r and not _smoke(header):
            r["video_speedup"] = round(dense["video_s"] / r["video_s"], 3)
    notes = []
    if _smoke(header):
        notes.append(f"SMOKE RUN ({'--tiny, ' if header['tiny'] else ''}{header.get('platform')}): the times mean "
                     "nothing and no speedup is reported; it checks that every configuration compiles, samples "
                     f"{header['steps']} guided steps and gives finite latents.")
    by_k: dict[tuple, list[str]] = {}
    for r in results:
        if r.get("k_of_nk"):
            by_k.setdefault((r["k_of_nk"], r["quant"]), []).append(r["name"])
    for (k, _), names in by_k.items():
        if len(names) > 1:
            notes.append(f"{', '.join(names)} select the same {k} key blocks per query block at "
                         f"{header['tokens']} tokens: one computation under several labels.")
    if any(r.get("quant") not in (None, "none") for r in results):
        notes.append(header["int8_note"])
    if not _smoke(header):
        r97 = next((r for r in results if r["name"] == "sla2-97" and "video_speedup" in r), None)
        if r97:
            notes.append(f"sla2-97: {r97['video_speedup']}x per video over dense (paper: {PAPER_VIDEO_SPEEDUP_97}x "
                         f"end to end on an RTX 5090, trained model).")
    header["notes"] = notes


def markdown(header: dict, results: list[dict]) -> str:
    h = header
    lines = [f"# Wan2.1 end to end: {h['workload']}", ""]
    lines += [f"**{n}**\n" for n in h.get("notes", []) if n.startswith("SMOKE")]
    lines += [f"- command: `{h['command']}`",
              f"- device: {h.get('device')} ({h.get('platform')}); jax {h.get('jax')}, jaxlib {h.get('jaxlib')}, "
              f"flax {h.get('flax')}, Python {h.get('python')}",
              f"- model: dim {h['model']['dim']}, {h['model']['layers']} layers, {h['model']['heads']} heads x "
              f"{h['model']['head_dim']}, FFN {h['model']['ffn_dim']}, {h.get('params_b')} B parameters (random), bf16",
              f"- video: latent {h['latent']} -> {h['tokens']} tokens, {h['text_tokens']} text tokens; "
              f"{h['steps']} {h['solver']} steps, shift {h['shift']}, guidance {h['guidance']} "
              f"({h['calls_per_step']} transformer calls per step)",
              f"- SLA2: block_q {h['block_q']}, block_k {h['block_k']}, alpha {h['alpha']}, backend {h.get('sla2_backend')}, "
              "untrained router", f"- peak memory: {h['peak_note']}", ""]
    smoke = _smoke(h)
    cols = [("config", "name"), ("k / Nk", "k_of_nk"), ("video (s)", "video_s")]
    if not smoke:
        cols.append(("speedup", "video_speedup"))
    cols += [("step median (s)", "step_s_median"), ("step min-max (s)", None), ("compile (s)", "compile_s"),
             ("peak (GiB)", "peak_gib"), ("step temp (GiB)", "step_temp_gib"),
             ("self-attn share (est.)", "self_attn_share_est"), ("finite", "final_finite")]
    lines.append("| " + " | ".join(c for c, _ in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in results:
        cells = []
        for title, key in cols:
            if key is None:
                value = f"{r['step_s_min']}-{r['step_s_max']}" if "step_s_min" in r else None
            else:
                value = r.get(key)
            if key == "video_speedup" and value is not None:
                value = f"{value:.2f}x"
            if key == "self_attn_share_est" and value is not None:
                value = f"{value:.0%}"
            cells.append("n/a" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [f"- {r['name']}: ERROR {r['error']}" for r in results if "error" in r]
    lines += ([""] + errors if errors else [])
    rest = [n for n in h.get("notes", []) if not n.startswith("SMOKE")]
    lines += ([""] + [f"- {n}" for n in rest] if rest else [])
    return "\n".join(lines) + "\n"


def write(out: str, header: dict, results: list[dict]) -> None:
    finish(header, results)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RESULTS_JSON), "w") as f:
        json.dump({"header": header, "results": results}, f, indent=1)
    with open(os.path.join(out, RESULTS_MD), "w") as f:
        f.write(markdown(header, results))


def make_header(args, argv) -> dict:
    base, latent, block_q, block_k = _shapes(args)
    return {
        "workload": ("tiny model, CPU smoke run" if args.tiny else
                     f"Wan2.1-T2V-{args.model.upper()} shape, {args.resolution} / 81 frames"),
        "tiny": args.tiny, "command": "python -m experiments.wan.benchmark " + " ".join(argv),
        "model": {"dim": base.dim, "layers": base.num_layers, "heads": base.num_heads, "head_dim": base.head_dim,
                  "ffn_dim": base.ffn_dim},
        "latent": [base.in_dim, *latent], "tokens": base.seq_len, "text_tokens": base.text_len,
        "steps": args.steps, "solver": args.solver, "shift": args.shift, "guidance": args.guidance,
        "calls_per_step": 2 if args.guidance > 1 else 1, "block_q": block_q, "block_k": block_k,
        "alpha": args.alpha, "isolated": args.isolate,
        "peak_note": ("peak_bytes_in_use of each configuration's own process" if args.isolate else
                      "peak_bytes_in_use of one process, cumulative over the configurations in table order"),
    }


def _device_header(args) -> dict:
    try:
        from sla2_jax import resolve_backend
        resolved = resolve_backend(args.backend)
    except ImportError:
        import jax
        resolved = args.backend if args.backend != "auto" else ("pallas" if jax.default_backend() == "gpu" else "xla")
    return {**_versions(), "sla2_backend": f"{args.backend} -> {resolved}",
            "int8_note": ("quant='int8' runs the INT8 Pallas kernel" if resolved == "pallas" else
                          "quant='int8' is fake quantisation on this backend (quantise-dequantise), not an INT8 "
                          "kernel: its times show the overhead, not an INT8 speedup")}


# --------------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------------
_SAME_RUN = ("workload", "tokens", "steps", "solver", "shift", "guidance", "block_q", "block_k", "alpha",
             "isolated")


def _resumed(args, header: dict, configs) -> list[dict]:
    """--resume: the error-free rows of an earlier run in --out with the same workload and settings (the others
    run again). A run that differs in any of `_SAME_RUN` is refused rather than mixed into one table."""
    path = os.path.join(args.out, RESULTS_JSON)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        earlier = json.load(f)
    differ = [k for k in _SAME_RUN if earlier["header"].get(k) != header.get(k)]
    if differ:
        raise SystemExit(f"--resume: {path} is from a different run ({', '.join(differ)} differ); use another --out")
    for key in ("jax", "jaxlib", "flax", "python", "platform", "device", "sla2_backend", "int8_note", "params_b",
                "init_s"):
        if key in earlier["header"]:
            header[key] = earlier["header"][key]
    header["command"] = f"{earlier['header']['command']}; then {header['command']}"
    wanted = [n for n, _ in configs]
    return [r for r in earlier["results"] if "error" not in r and r["name"] in wanted]


def run(args, argv) -> dict:
    header = make_header(args, argv)
    configs = configurations(args)
    results = _resumed(args, header, configs) if args.resume else []
    done = {r["name"] for r in results}
    configs = [(n, c) for n, c in configs if n not in done]
    print(f"{header['workload']}: {len(configs)} configurations to run ({len(done)} kept from {args.out}), "
          f"{args.steps} steps each; writing {args.out}", flush=True)
    if args.isolate:
        for name, _ in configs:
            with tempfile.TemporaryDirectory() as tmp:
                child_out = os.path.join(tmp, "row.json")
                command = [sys.executable, "-m", "experiments.wan.benchmark", *argv, "--child", name,
                           "--child-out", child_out]
                proc = subprocess.run(command)
                if os.path.exists(child_out):
                    with open(child_out) as f:
                        child = json.load(f)
                    header.update(child["header"])
                    results.append(child["row"])
                else:
                    results.append({"name": name, "error": f"child process exited with {proc.returncode}"})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "step_s"}), flush=True)
            write(args.out, header, results)
    else:
        header.update(_device_header(args))
        work = Workload(args)
        header["params_b"], header["init_s"] = round(work.params_b, 4), round(work.init_s, 2)
        for name, cfg in configs:
            results.append(run_config(work, name, cfg))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "step_s"}), flush=True)
            write(args.out, header, results)
    write(args.out, header, results)
    print("\n" + markdown(header, results), flush=True)
    return {"header": header, "results": results}


def run_child(args) -> None:
    """One configuration in this process; writes {"header": device facts, "row": result} to --child-out."""
    name, cfg = next((n, c) for n, c in configurations(args) if n == args.child)
    header = _device_header(args)
    work = Workload(args)
    header["params_b"], header["init_s"] = round(work.params_b, 4), round(work.init_s, 2)
    row = run_config(work, name, cfg)
    with open(args.child_out, "w") as f:
        json.dump({"header": header, "row": row}, f)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and latent, 3 steps (CPU smoke run)")
    parser.add_argument("--out", required=True, help=f"folder for {RESULTS_JSON} and {RESULTS_MD}")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.90, 0.95, 0.97])
    parser.add_argument("--quant", nargs="+", default=["none", "int8"], choices=["none", "int8", "int8_fp8"])
    parser.add_argument("--alpha", default="block", choices=["block", "head", "mass"])
    parser.add_argument("--backend", default="auto", choices=["auto", "pallas", "xla", "reference"])
    parser.add_argument("--only", nargs="+", help="run only these configurations (e.g. dense sla2-97)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per video (default 50; --tiny 3)")
    parser.add_argument("--solver", default="unipc", choices=["unipc", "euler"])
    parser.add_argument("--model", default="1.3b", choices=["1.3b", "14b"], help="transformer shape")
    parser.add_argument("--resolution", default="480p", choices=sorted(LATENTS), help="81 frames at 480p or 720p")
    parser.add_argument("--shift", type=float, default=None,
                        help="schedule shift (default as Wan: 3.0 at 480p, 5.0 at 720p)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each configuration in its own process, for its own peak memory (default: on unless "
                             "--tiny)")
    parser.add_argument("--attention-breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the self-attention core alone (an estimate of its share of the step)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the error-free configurations already in --out (same settings) and run the rest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.tiny else 50
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.shift is None:
        args.shift = DEFAULT_SHIFT[args.resolution]
    if args.isolate is None:
        args.isolate = not args.tiny
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        run_child(args)
        return None
    return run(args, argv)


if __name__ == "__main__":
    main()
