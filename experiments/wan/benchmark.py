"""End-to-end Wan2.1-T2V-1.3B benchmark: one denoising step, dense (cuDNN) vs SLA2 self-attention.

    python -m experiments.wan.benchmark                     # GPU: 1.3B at 480p/81 frames (32,760 tokens), bf16
    python -m experiments.wan.benchmark --tiny              # CPU smoke run of the same code path
    python -m experiments.wan.benchmark --json out.json --sample-steps 50

For each configuration (dense; SLA2 at each --sparsities, with each --quant mode) it reports:
  step_ms            median over --reps of one full transformer forward (embeddings, 30 blocks by lax.scan,
                     head), synchronised with jax.block_until_ready; random weights, dummy text embedding;
  self_attn_ms       the self-attention core alone (routing + kernels + combine, or cuDNN) on the same
                     (1, N, H, D) shapes with random normal q, k, v, times num_layers -> self_attn_share;
  cross_attn_ms      the dense cross-attention core (N x 512 text tokens), times num_layers;
  rest_ms            step_ms minus both: projections, FFN, norms, RoPE, modulation;
  router_ms          (SLA2) the router alone (pooling, scores, top-k), per layer;
  peak memory        the process's peak_bytes_in_use after this configuration ran (cumulative: jax cannot
                     reset it) and the compiled step's own temporary bytes (per configuration);
  sample_s           (optional) a --sample-steps Euler flow-matching loop, one forward per step (Wan's
                     sampler with classifier-free guidance runs two).
Weights are random (speed does not depend on them); the SLA2 router is untrained (identity W_q, W_k).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from experiments.timing import time_samples
from sla2_jax import resolve_backend
from experiments.wan.model import (WanBlock, WanConfig, WanModel, dense_attention, forward_stacked,
                                   init_stacked_blocks, latent_tokens, make_self_attention, wan_1_3b)

LATENT_480P = (21, 60, 104)     # 81 frames at 480x832 through the Wan VAE (4x temporal, 8x spatial)
PAPER_SPEEDUP_97 = 2.30


def _median_ms(fn, *args, reps: int, warmup: int = 1) -> tuple[float, list[float]]:
    times = [1e3 * t for t in time_samples(fn, *args, warmup=warmup, iters=reps)]
    return statistics.median(times), times


def _first_call_s(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _memory() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    return {k: stats.get(k) for k in ("peak_bytes_in_use", "bytes_in_use")}


def _int8_is_real_kernel(backend: str) -> bool:
    """The library runs quant="int8" with the INT8 Pallas kernel on the pallas backend, with fake quantisation
    (quantise-dequantise plus a straight-through pass) on the others."""
    return resolve_backend(backend) == "pallas"


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def _flax_version():
    import flax
    return flax.__version__


def _keyed_leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def blocks_for(cfg: WanConfig, base_graphdef, base_states, key):
    """Stacked block state for `cfg`: the dense blocks' weights (shared, not copied) plus the attention
    core's own parameters (e.g. SLA2's router), initialised once and broadcast over layers."""
    if cfg.attention == "dense":
        return base_graphdef, base_states
    template = WanBlock(cfg, nnx.Rngs(key))
    graphdef, state = nnx.split(template)
    base = _keyed_leaves(base_states)
    layers = cfg.num_layers

    def pick(path, leaf):
        name = jax.tree_util.keystr(path)
        if name in base:
            return base[name]
        return jnp.broadcast_to(leaf, (layers, *leaf.shape))

    return graphdef, jax.tree_util.tree_map_with_path(pick, state)


def run(args) -> dict:
    import sla2_jax as sla

    backend_name = jax.default_backend()
    if args.tiny:
        base_cfg = WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, freq_dim=32,
                             text_len=16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        latent, block_q, block_k = (4, 16, 16), 32, 16
    else:
        base_cfg = wan_1_3b(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        latent, block_q, block_k = LATENT_480P, 128, 64
    n_tokens = latent_tokens(base_cfg, latent)
    base_cfg = base_cfg.replace(seq_len=n_tokens)
    heads, head_dim, layers = base_cfg.num_heads, base_cfg.head_dim, base_cfg.num_layers

    configs = [("dense", base_cfg)]
    for quant in args.quant:
        for sparsity in args.sparsities:
            sla_cfg = sla.SLA2Config(block_q=block_q, block_k=block_k, topk_ratio=round(1 - sparsity, 6),
                                     alpha=args.alpha, quant=quant, backend=args.backend)
            name = f"sla2-{round(sparsity * 100)}" + ("" if quant == "none" else f"-{quant}")
            configs.append((name, base_cfg.replace(attention="sla2", sla_config=sla_cfg)))
    if args.only:
        configs = [(n, c) for n, c in configs if n in args.only]

    int8_real = _int8_is_real_kernel(args.backend)
    header = {
        "workload": "wan-1.3b end to end" if not args.tiny else "tiny (CPU smoke run)",
        "model": {"dim": base_cfg.dim, "layers": layers, "heads": heads, "head_dim": head_dim,
                  "ffn_dim": base_cfg.ffn_dim},
        "latent": list(latent), "tokens": n_tokens, "text_tokens": base_cfg.text_len, "dtype": "bfloat16",
        "block_q": block_q, "block_k": block_k, "alpha": args.alpha,
        "sla2_backend": f"{args.backend} -> {resolve_backend(args.backend)}",
        "int8_note": ("quant='int8' uses the INT8 Pallas kernel" if int8_real else
                      "quant='int8' is FAKE quantisation on this backend (quantise-dequantise plus a "
                      "straight-through pass), not an INT8 kernel: its timings show the overhead, "
                      "not an INT8 speedup"),
        "jax": jax.__version__, "jaxlib": _jaxlib_version(), "flax": _flax_version(),
        "device": jax.devices()[0].device_kind, "platform": backend_name, "python": platform.python_version(),
        "reps": args.reps,
    }
    print(json.dumps(header, indent=1), flush=True)

    key = jax.random.key(args.seed)
    k_rest, k_blocks, k_x, k_ctx, k_q, k_k, k_v, k_attn = jax.random.split(key, 8)
    start = time.perf_counter()
    rest = WanModel(base_cfg.replace(num_layers=0), rngs=nnx.Rngs(k_rest))
    rest_graphdef, rest_state = nnx.split(rest)
    base_graphdef, base_states = init_stacked_blocks(base_cfg, k_blocks)
    jax.block_until_ready(base_states)
    x = jax.random.normal(k_x, (1, base_cfg.in_dim, *latent), jnp.float32)
    context = jax.random.normal(k_ctx, (1, base_cfg.text_len, base_cfg.text_dim), jnp.bfloat16)
    t = jnp.array([999.0], jnp.float32)
    qkv_shape = (1, n_tokens, heads, head_dim)
    q, k, v = (jax.random.normal(kk, qkv_shape, jnp.bfloat16) for kk in (k_q, k_k, k_v))
    ctx_kv = jax.random.normal(k_ctx, (1, base_cfg.text_len, heads, head_dim), jnp.bfloat16)
    params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves((rest_state, base_states)))
    print(f"random weights: {params / 1e9:.3f} B parameters in {time.perf_counter() - start:.1f} s", flush=True)
    header["params_b"] = round(params / 1e9, 4)

    # cross-attention core: the same for every configuration
    cross = jax.jit(dense_attention)
    cross_ms, _ = _median_ms(cross, q, ctx_kv, ctx_kv, reps=args.reps)

    results, samplers = [], {}
    t_begin = time.perf_counter()
    for name, cfg in tqdm(configs, desc="configs", file=sys.stdout):
        block_graphdef, block_states = blocks_for(cfg, base_graphdef, base_states, k_attn)

        @jax.jit
        def step(rest_state, block_states, x, t, context, _gd=block_graphdef):
            model = nnx.merge(rest_graphdef, rest_state)
            return forward_stacked(model, _gd, block_states, x, t, context)

        row = {"name": name, "attention": cfg.attention,
               "sparsity": None if cfg.sla_config is None else round(cfg.sla_config.sparsity, 4),
               "quant": None if cfg.sla_config is None else cfg.sla_config.quant}
        try:
            start = time.perf_counter()
            compiled = step.lower(rest_state, block_states, x, t, context).compile()
            row["compile_s"] = round(time.perf_counter() - start, 2)
            analysis = compiled.memory_analysis()
            row["step_temp_bytes"] = getattr(analysis, "temp_size_in_bytes", None)
            row["first_step_s"] = round(_first_call_s(compiled, rest_state, block_states, x, t, context), 2)
            step_ms, step_all = _median_ms(compiled, rest_state, block_states, x, t, context, reps=args.reps,
                                           warmup=0)
            out = compiled(rest_state, block_states, x, t, context)
            row["output_finite"] = bool(jnp.all(jnp.isfinite(out)))
            row["step_ms"], row["step_ms_all"] = round(step_ms, 2), [round(s, 2) for s in step_all]

            # the self-attention core alone, same shapes
            if cfg.attention == "dense":
                attn_ms, _ = _median_ms(jax.jit(dense_attention), q, k, v, reps=args.reps)
            else:
                attn_graphdef, attn_state = nnx.split(make_self_attention(cfg, nnx.Rngs(0)))
                attn = jax.jit(lambda s, q, k, v: nnx.merge(attn_graphdef, s)(q, k, v))
                attn_ms, _ = _median_ms(attn, attn_state, q, k, v, reps=args.reps)
                from sla2_jax.functional import route
                router = jax.jit(lambda q, k: route(q, k, cfg.sla_config)[0])
                row["router_ms_per_layer"] = round(_median_ms(router, q, k, reps=args.reps)[0], 3)
            row["self_attn_ms_per_layer"] = round(attn_ms, 3)
            row["self_attn_ms"] = round(attn_ms * layers, 2)
            row["cross_attn_ms"] = round(cross_ms * layers, 2)
            row["rest_ms"] = round(step_ms - (attn_ms + cross_ms) * layers, 2)
            row["self_attn_share"] = round(attn_ms * layers / step_ms, 3)
            row.update(_memory())
            if args.sample_steps > 0 and name in args.sample_configs:
                samplers[name] = (lambda latents, tt, _c=compiled, _b=block_states:
                                  _c(rest_state, _b, latents, tt, context))
        except Exception as err:  # keep the other configurations' numbers
            row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        results.append(row)
        print(json.dumps(row), flush=True)
        _write(args, header, results)

    dense = next((r for r in results if r["name"] == "dense" and "step_ms" in r), None)
    if dense:
        for r in results:
            if "step_ms" in r:
                r["step_speedup"] = round(dense["step_ms"] / r["step_ms"], 3)
                r["self_attn_speedup"] = round(dense["self_attn_ms"] / r["self_attn_ms"], 2)
                # Amdahl: the step speedup if self-attention cost nothing
                r["step_speedup_if_attention_free"] = round(dense["step_ms"] / (dense["step_ms"] - dense["self_attn_ms"]), 3)

    if args.sample_steps > 0:
        for name in list(samplers):
            if time.perf_counter() - t_begin > args.budget_s:
                print(f"skipping the sampling loop of {name}: over --budget-s", flush=True)
                continue
            row = next(r for r in results if r["name"] == name)
            step_fn = samplers.pop(name)
            seconds = _sample(args.sample_steps, name, step_fn, x)
            row.update(sample_steps=args.sample_steps, sample_s=round(seconds, 2),
                       sample_ms_per_step=round(seconds * 1e3 / args.sample_steps, 2))
            print(json.dumps({k: row[k] for k in ("name", "sample_steps", "sample_s", "sample_ms_per_step")}),
                  flush=True)
            _write(args, header, results)

    _write(args, header, results)
    _print_table(header, results)
    return {"header": header, "results": results}


def _sample(steps: int, name: str, step_fn, x) -> float:
    """Euler flow-matching sampler over `steps` shifted sigmas (shift 5, as Wan), one forward per step,
    reusing the compiled step `step_fn(x, t) -> velocity`; returns seconds for the whole loop."""
    shift = 5.0
    sigmas = np.linspace(1.0, 0.0, steps + 1)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    update = jax.jit(lambda latents, velocity, ds: latents + ds * velocity)
    latents = x
    start = time.perf_counter()
    for i in tqdm(range(steps), desc=f"sample {name}", file=sys.stdout):
        velocity = step_fn(latents, jnp.array([sigmas[i] * 1000.0], jnp.float32))
        latents = jax.block_until_ready(update(latents, velocity, jnp.float32(sigmas[i + 1] - sigmas[i])))
    return time.perf_counter() - start


def _write(args, header, results):
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)


def _print_table(header, results):
    print(f"\nWan2.1 end to end: {header['workload']}, {header['tokens']} tokens, {header['device']}, "
          f"jax {header['jax']}, SLA2 backend {header['sla2_backend']}")
    cols = ["name", "step_ms", "step_speedup", "self_attn_ms", "self_attn_share", "cross_attn_ms", "rest_ms",
            "router_ms_per_layer", "peak_bytes_in_use", "step_temp_bytes", "sample_s"]
    print(" | ".join(cols))
    for r in results:
        cells = []
        for c in cols:
            value = r.get(c)
            if c in ("peak_bytes_in_use", "step_temp_bytes") and value is not None:
                value = f"{value / 2**30:.2f} GiB"
            cells.append("-" if value is None else str(value))
        print(" | ".join(cells) + (f"   ERROR {r['error']}" if "error" in r else ""))
    if any(r.get("quant") not in (None, "none") for r in results):
        print(header["int8_note"])
    r97 = next((r for r in results if r["name"] == "sla2-97" and "step_speedup" in r), None)
    if r97:
        print(f"sla2-97 step speedup {r97['step_speedup']}x (paper {PAPER_SPEEDUP_97}x); self-attention was "
              f"{next(r for r in results if r['name'] == 'dense')['self_attn_share']:.0%} of the dense step, so "
              f"removing it entirely would give {r97['step_speedup_if_attention_free']}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and latent (CPU smoke run)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.90, 0.95, 0.97])
    parser.add_argument("--quant", nargs="+", default=["none", "int8"], choices=["none", "int8", "int8_fp8"])
    parser.add_argument("--alpha", default="block", choices=["block", "head", "mass"])
    parser.add_argument("--backend", default="auto", choices=["auto", "pallas", "xla", "reference"])
    parser.add_argument("--only", nargs="+", help="run only these configuration names (e.g. dense sla2-97)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    parser.add_argument("--sample-steps", type=int, default=0, help="also time a sampling loop (e.g. 50)")
    parser.add_argument("--sample-configs", nargs="+", default=["dense", "sla2-97"])
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip sampling loops after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
