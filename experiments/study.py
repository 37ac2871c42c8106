"""The SLA2 quality study: one resumable, time-budgeted command from dense pre-training to a report with CIs.

  python -m experiments.study --preset study-cpu-smoke --out runs/study-smoke
  python -m experiments.study --preset study-gpu --out /tmp/study --time-budget 480 --export-state $OUT

Steps (each skipped when its output exists, so a rerun continues where the last call stopped):
  pretrain  stage 0, dense, in time-budgeted chunks (short clips first when the preset has them); at every
            checkpoint the oracle kept mass of the model's attention (sla2_jax.diagnostics on held-out probe Q/K)
            is appended to stage0/gate.json
  gate      stage 2 runs only once the mean oracle kept mass at gate_sparsity is >= gate_threshold (or with
            --ignore-gate); the curve is reported either way. Rows carry the token order they were measured in
            (ModelConfig.token_order); only rows of the study's order count, and a finished dense model whose last
            row is of another order (a stage-0 state imported after a change of order) is probed again first
  routers   stage 1 for every SLA2 router the study needs, plus the router comparison on held-out Q/K/V:
            oracle, SLA's router (least-squares alpha), SLA with a fitted Proj, SLA2 routers trained with the
            forms of configs.ROUTER_FORMS: kept mass and attention error (routers.json)
  curve     training-free loss vs sparsity (the dense model with its attention swapped, no fine-tuning) for the
            oracle, SLA's router and the stage-1 SLA2 router, ratio to the dense model with paired CIs (curve.json)
  finetune  stage 2 of every model of preset.runs in order, each followed by its evaluation: eval_triples paired
            (video, t, noise) triples under the training and the uniform t distribution, per-t-bin losses,
            samples from fixed noise (PSNR/SSIM against dense-ft's), attention error and kept mass, step time
  report    results.md / results.json: tables with paired-bootstrap CIs of each model's loss ratio to dense-ft,
            dense-ft's seed-to-seed spread as the noise floor, the gate curve, the curves, sample GIFs

--export-state DIR writes what a later call needs (checkpoints as npz, optimizer moments in bf16) as at most 7
files of <= 15 MiB plus study_state.json (parts and checksum; a GPU call returns at most 8 files of 16 MiB);
--import-state DIR restores it before running, after checking the parts against study_state.json.

On GPU machines that are lent for one call at a time, each call continues the study from the previous call's
state (stage 0 of study-gpu alone takes about two 7-minute chunks on one H100):

  python -m experiments.study --preset study-gpu --out /tmp/study --time-budget 420 --export-state $OUT
  # replace .study_state/ (ignored by git) with the returned study_state.*, carry it, then each next call:
  python -m experiments.study --preset study-gpu --out /tmp/study --import-state .study_state \
      --time-budget 420 --export-state $OUT
  # read the results locally: cat .study_state/study_state.tar.* | tar -x -C runs/study
--set PATH=VALUE changes any field of the preset for a variant (e.g. --set preset.model.qk_norm_init=2.0); a
folder refuses a different configuration, so a variant needs its own --out. The token order is the exception while
a folder holds stage 0 alone (see _check_config): the dense model does not depend on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import os
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from experiments import data as data_lib
from experiments import evaluate, report, stats, token_order, train
from experiments.configs import ROUTER_FORMS, RunSpec, StudyConfig, get_study
from experiments.dit import VideoDiT, attention_spec, make_model


def _log(*a):
    print(*a, flush=True)


class Budget:
    """Wall-clock budget of one call: `left()` seconds remain; `deadline` for train_diffusion."""

    def __init__(self, seconds: float | None):
        self.t0 = time.time()
        self.deadline = None if seconds is None else self.t0 + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def over(self) -> bool:
        return self.left() <= 0


def _json(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Stage 0 with the kept-mass probe.


def probe_kept_mass(model: VideoDiT, study: StudyConfig, preset) -> dict:
    """Oracle and SLA-router kept mass of `model`'s attention on the probe videos (data.HELDOUT_STREAM) at
    study.probe_times, at every curve sparsity. Returns sla2_jax.diagnostics.kept_mass_report's dict."""
    from sla2_jax import diagnostics

    cfg = dataclasses.replace(preset.stage1, timesteps=study.probe_times)
    cap = train.capture_qkv(
        model, preset, cfg, stream=data_lib.HELDOUT_STREAM, num_videos=study.probe_videos, with_output=False
    )
    return diagnostics.kept_mass_report(
        cap["q"], cap["k"], sparsities=study.curve_sparsities, block_q=preset.block_q, block_k=preset.block_k
    )


def study_order(study: StudyConfig) -> str:
    """The token order of the study's model as gate rows and reports name it: "raster" or e.g. "tiles 4x4x4"."""
    m = study.preset.model
    return token_order.order_name(m.token_order, m.tile)


def probe_order(probe: dict) -> str:
    """The token order a gate row was measured in (rows written before the order was recorded: raster)."""
    return probe.get("token_order", "raster")


def gate_status(study: StudyConfig, out: str) -> dict:
    """{"passed": bool, "mean_oracle": float | None, "step": int | None, "token_order": str}: the latest
    full-length probe measured in the study's token order (rows of another order do not count)."""
    path = os.path.join(out, "stage0", "gate.json")
    order = study_order(study)
    probes = [p for p in (_json(path) if os.path.exists(path) else [])
              if p["phase"] == "dense" and probe_order(p) == order]
    if not probes:
        return {"passed": False, "mean_oracle": None, "step": None, "token_order": order}
    last = probes[-1]
    value = last["mean_oracle"][last["sparsities"].index(study.gate_sparsity)]
    return {"passed": value >= study.gate_threshold, "mean_oracle": value, "step": last["step"],
            "token_order": order}


def _append_probe(study: StudyConfig, out: str, rep: dict, phase: str, step: int, **extra) -> None:
    """Add one row to stage0/gate.json (replacing rows of this phase and order at or after `step`: a resumed
    phase probes its checkpoints again) and print it."""
    gate_path = os.path.join(out, "stage0", "gate.json")
    order = study_order(study)
    probes = _json(gate_path) if os.path.exists(gate_path) else []
    probes = [p for p in probes if not (p["phase"] == phase and p["step"] >= step and probe_order(p) == order)]
    probes.append(dict(rep, phase=phase, step=step, token_order=order, time=time.time(), **extra))
    train.write_json(gate_path, probes)
    s = rep["sparsities"].index(study.gate_sparsity)
    tqdm.write(f"[probe] {phase} step {step} ({order} order): oracle kept mass at {study.gate_sparsity:.0%} "
               f"{rep['mean_oracle'][s]:.3f} (per layer {', '.join(f'{o[s]:.2f}' for o in rep['oracle'])})")


def reprobe_gate(study: StudyConfig, out: str, dense: VideoDiT) -> bool:
    """Probe the finished dense model again when the latest full-length gate row was measured in another token
    order than the study's (a state trained or probed in raster order, imported by a study in tile order): the
    dense weights do not depend on the order, its block sparsity does. Returns True when it probed."""
    path = os.path.join(out, "stage0", "gate.json")
    probes = [p for p in (_json(path) if os.path.exists(path) else []) if p["phase"] == "dense"]
    order = study_order(study)
    if not probes or probe_order(probes[-1]) == order:
        return False
    step = train.read_done(os.path.join(out, "stage0", "dense"))["steps"]
    _log(f"[gate] the last gate row was measured in {probe_order(probes[-1])} order: probing the dense model "
         f"(step {step}) in {order} order")
    _append_probe(study, out, probe_kept_mass(dense, study, study.preset), "dense", step,
                  reprobed_from=probe_order(probes[-1]))
    return True


def pretrain(study: StudyConfig, out: str, budget: Budget, mesh) -> bool:
    """Stage 0 (short clips, then full length) until done or out of time. Returns True when done."""
    preset = study.preset

    def prober(phase, phase_preset):
        def on_checkpoint(step, model):
            _append_probe(study, out, probe_kept_mass(model, study, phase_preset), phase, step)

        return on_checkpoint

    dense_run = preset.run("dense") if any(r.name == "dense" for r in preset.runs) else RunSpec("dense", "dense")
    init = None
    if preset.stage0_short is not None:
        short = preset.short_clip_preset()
        short_dir = os.path.join(out, "stage0", "dense-short")
        if train.is_done(short_dir):
            _log("[stage 0] short clips: skipped (done)")
        else:
            _log(f"[stage 0] short clips: {preset.stage0_short.steps} steps, {short.num_tokens} tokens per clip")
        res = train.train_diffusion(short_dir, short, dense_run, preset.stage0_short, mesh=mesh,
                                    desc="stage0 dense-short", deadline=budget.deadline,
                                    on_checkpoint=prober("dense-short", short))
        if "stopped_at" in res:
            return False

        def init(model):
            src = make_model(short, dense_run)
            train.load_params(short_dir, src)
            train.transfer_params(src, model)

    dense_dir = os.path.join(out, "stage0", "dense")
    if train.is_done(dense_dir):
        _log("[stage 0] dense pre-training: skipped (done)")
        return True
    if budget.over():
        return False
    _log(f"[stage 0] dense pre-training: {preset.stage0.steps} steps, {preset.num_tokens} tokens per video")
    res = train.train_diffusion(dense_dir, preset, dense_run, preset.stage0, init=init, mesh=mesh,
                                desc="stage0 dense", deadline=budget.deadline, on_checkpoint=prober("dense", preset))
    return "stopped_at" not in res


def load_dense(study: StudyConfig, out: str) -> VideoDiT:
    model = make_model(study.preset, RunSpec("dense", "dense"))
    train.load_params(os.path.join(out, "stage0", "dense"), model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 and the router comparison.


def router_specs(study: StudyConfig) -> list:
    """Every SLA2 router the study trains: one per curve sparsity (the default form), the other forms of
    ROUTER_FORMS at the soft_router_sparsities, and whatever the stage-2 runs need (e.g. linear_scope "all")."""
    specs = {}
    for s in study.curve_sparsities:
        r = RunSpec(f"sla2-{round(100 * s)}", "sla2", s)
        specs[r.router_run] = r
    for s in study.soft_router_sparsities:
        for routing in ROUTER_FORMS[1:]:
            r = RunSpec(f"sla2-{round(100 * s)}-{routing}", "sla2", s, router_routing=routing)
            specs[r.router_run] = r
    for r in study.preset.runs:
        if r.router_run is not None:
            specs.setdefault(r.router_run, dataclasses.replace(r, quant="none"))
    return list(specs.values())


RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative to the mean diagonal of A^T A


def fit_sla_proj(preset, run: RunSpec, captured: dict) -> list:
    """Least-squares Proj of SLA (v1) per layer: o ~ o_s + o_l P + b over the captured rows and heads, with SLA's
    router at run.sparsity. The ridge (RIDGES) is chosen by fitting on the even captured samples and measuring
    the error on the odd ones, then the fit is redone on all. Returns one (P (D, D), b (D,)) float32 pair per
    layer."""
    from sla2_jax.functional import sparse_linear_outputs

    cfg = dataclasses.replace(attention_spec(preset, dataclasses.replace(run, attention="sparse")).config,
                              quant="none")

    @jax.jit
    def sums(q, k, v, o):
        o_s, o_l, _ = sparse_linear_outputs(q, k, v, cfg)
        dim = o_l.shape[-1]
        a = jnp.concatenate([o_l.reshape(-1, dim), jnp.ones((o_l.size // dim, 1), jnp.float32)], 1)
        target = (o.astype(jnp.float32) - o_s).reshape(-1, dim)
        return a.T @ a, a.T @ target, jnp.sum(target * target)

    def solve(ata, atb, ridge):
        return jnp.linalg.solve(ata + ridge * jnp.trace(ata) / ata.shape[0] * jnp.eye(ata.shape[0]), atb)

    out = []
    for layer in range(len(captured["q"])):
        parts = [sums(*(captured[n][layer][i : i + 1] for n in ("q", "k", "v", "o")))
                 for i in range(captured["q"][layer].shape[0])]
        total = [sum(p[j] for p in parts) for j in range(3)]
        ridge = RIDGES[-1]
        if len(parts) >= 2:
            fit_on = [sum(p[j] for p in parts[0::2]) for j in range(3)]
            val = [sum(p[j] for p in parts[1::2]) for j in range(3)]
            errs = []
            for r in RIDGES:  # ||t - A P||^2 = t^T t - 2 tr(P^T A^T t) + tr(P^T A^T A P)
                sol = solve(fit_on[0], fit_on[1], r)
                errs.append(float(val[2] - 2 * jnp.sum(sol * val[1]) + jnp.sum(sol * (val[0] @ sol))))
            ridge = RIDGES[int(np.argmin(errs))]
        sol = solve(total[0], total[1], ridge)
        out.append((np.asarray(sol[:-1], np.float32), np.asarray(sol[-1], np.float32)))
    return out


class OracleAttention(nnx.Module):
    """Training-free oracle core: the best k key blocks by exact softmax mass, alpha = that kept mass (the value
    that makes alpha * O_s equal the selected part of P V). __call__(q, k, v): (B, N, H, D) -> (B, N, H, D)."""

    def __init__(self, config):
        self.config = config

    def __call__(self, q, k, v):
        import sla2_jax as sla
        from sla2_jax import diagnostics

        c = self.config
        mass = diagnostics.block_attention_mass(q, k, block_q=c.block_q, block_k=c.block_k)
        vals, idx = jax.lax.top_k(mass, c.num_selected(mass.shape[-1]))
        lut = jnp.sort(idx, axis=-1).astype(jnp.int32)
        o_s, o_l = sla.sparse_linear_branches(q, k, v, lut, block_q=c.block_q, block_k=c.block_k,
                                              feature_map=c.feature_map, linear_scope=c.linear_scope,
                                              backend=c.backend)
        return sla.combine(o_s, o_l, jnp.sum(vals, -1), block_q=c.block_q).astype(q.dtype)


def training_free_model(study: StudyConfig, out: str, dense: VideoDiT, method: str, sparsity: float, captured):
    """The dense model with each layer's attention replaced, no fine-tuning. method: "oracle", "sla" (SLA's
    router, least-squares alpha per block), "sla2" (the stage-1 router and alpha, default form)."""
    preset = study.preset
    run = RunSpec(f"{method}-{round(100 * sparsity)}", "sla2", sparsity)
    model = make_model(preset, run)
    train.transfer_params(dense, model)
    if method == "sla2":
        train.load_router(os.path.join(out, "stage1", run.router_run), preset, run, model)
    elif method == "sla":
        routers = train.RouterSet(preset, run)
        train.init_alpha_least_squares(routers, captured)
        for blk, layer in zip(model.blocks, routers.layers):
            train.transfer_params(layer, blk.attn.core)
    elif method == "oracle":
        for blk in model.blocks:
            blk.attn.core = OracleAttention(blk.attn.core.config)
    else:
        raise ValueError(f"method={method!r}")
    return model


def _layer_cores(model: VideoDiT):
    return [blk.attn.core for blk in model.blocks]


def compare_routers(study: StudyConfig, out: str, dense, captured, heldout) -> dict:
    """Kept mass and attention error (held-out Q/K/V) of every routing at every curve sparsity: oracle, SLA
    (least-squares alpha), SLA with fitted Proj, SLA2 routers of each trained form."""
    from sla2_jax import diagnostics

    preset = study.preset
    path = os.path.join(out, "routers.json")
    if os.path.exists(path):
        return _json(path)
    rows = []
    qs, ks = heldout["q"], heldout["k"]
    for s in study.curve_sparsities:
        base = diagnostics.kept_mass_report(qs, ks, sparsities=(s,), block_q=preset.block_q, block_k=preset.block_k)
        for method in ("oracle", "sla"):
            model = training_free_model(study, out, dense, method, s, captured)
            kept = base["oracle"] if method == "oracle" else base["router"]
            rows.append(_router_row(method, s, [m[0] for m in kept], evaluate.attention_errors(model, heldout)))
        sla_run = RunSpec("sla-fit", "sla", s)
        sla_model = make_model(preset, sla_run)
        for core, (p, b) in zip(_layer_cores(sla_model), fit_sla_proj(preset, sla_run, captured)):
            core.proj_kernel[...], core.proj_bias[...] = jnp.asarray(p), jnp.asarray(b)
        rows.append(_router_row("sla-fitted-proj", s, [m[0] for m in base["router"]],
                                evaluate.attention_errors(sla_model, heldout)))
        for spec in router_specs(study):
            if spec.sparsity != s or spec.linear_scope != "complement" or spec.alpha != "block":
                continue
            model = make_model(preset, spec)
            train.load_router(os.path.join(out, "stage1", spec.router_run), preset, spec, model)
            cores = _layer_cores(model)
            rep = diagnostics.kept_mass_report(qs, ks, sparsities=(s,), block_q=preset.block_q,
                                               block_k=preset.block_k, w_q=[c.w_q[...] for c in cores],
                                               w_k=[c.w_k[...] for c in cores])
            rows.append(_router_row(f"sla2-{spec.router_routing}", s, [m[0] for m in rep["router"]],
                                    evaluate.attention_errors(model, heldout)))
    result = {"rows": rows}
    train.write_json(path, result)
    return result


def _router_row(method, sparsity, kept, errs):
    return {"method": method, "sparsity": sparsity, "kept_mass_per_layer": kept, "kept_mass": float(np.mean(kept)),
            "attn_rel_err_per_layer": errs, "attn_rel_err": float(np.mean(errs))}


def train_routers(study: StudyConfig, out: str, dense, budget: Budget) -> tuple:
    """Stage 1 of every router (skipping finished ones). Returns (captured, heldout) Q/K/V (captured lazily:
    None when every router was done and nothing else needed them)."""
    preset = study.preset
    captured = heldout = None
    for spec in router_specs(study):
        rdir = os.path.join(out, "stage1", spec.router_run)
        if train.is_done(rdir):
            continue
        if budget.over():
            return captured, heldout
        if captured is None:
            captured = capture(study, dense, "train")
        _log(f"[stage 1] {spec.router_run}: {preset.stage1.steps} steps ({spec.router_routing})")
        train.train_router(rdir, preset, spec, captured)
    return captured, heldout


def capture(study: StudyConfig, dense, which: str) -> dict:
    preset = study.preset
    if which == "train":
        _log(f"[capture] Q/K/V at t={preset.stage1.timesteps} from {preset.stage1.num_videos} videos")
        return train.capture_qkv(dense, preset, preset.stage1, stream=data_lib.CAPTURE_STREAM,
                                 num_videos=preset.stage1.num_videos)
    _log(f"[capture] held-out Q/K/V from {preset.stage1.heldout_videos} videos")
    heldout = train.capture_qkv(dense, preset, preset.stage1, stream=data_lib.HELDOUT_STREAM,
                                num_videos=preset.stage1.heldout_videos)
    return evaluate.add_block_mass(heldout, preset.block_q, preset.block_k)


# ----------------------------------------------------------------------------------------------------------------
# Training-free curve.


def training_free_curve(study: StudyConfig, out: str, dense, captured, budget: Budget) -> dict:
    """Loss (training t, curve_triples triples) of the dense model and of each training-free replacement at each
    curve sparsity, with the paired CI of its ratio to the dense model. Resumes point by point (curve.json)."""
    preset = study.preset
    path = os.path.join(out, "curve.json")
    curve = _json(path) if os.path.exists(path) else {"points": []}
    done = {(p["method"], p["sparsity"]) for p in curve["points"]}
    n = study.curve_triples
    ref_path = os.path.join(out, "curve_dense_losses.npy")
    if not os.path.exists(ref_path):
        np.save(ref_path, evaluate.paired_losses(dense, preset, n, "train", study.eval_batch)["loss"])
    ref = np.load(ref_path)
    curve["dense_loss"] = float(ref.mean())
    todo = [(m, s) for s in study.curve_sparsities for m in ("oracle", "sla", "sla2") if (m, s) not in done]
    for method, s in tqdm(todo, desc="training-free curve", dynamic_ncols=True):
        if budget.over():
            break
        model = training_free_model(study, out, dense, method, s, captured)
        losses = evaluate.paired_losses(model, preset, n, "train", study.eval_batch)["loss"]
        ci = stats.paired_bootstrap_ratio(losses, ref)
        curve["points"].append({"method": method, "sparsity": s, "loss": float(losses.mean()), "ratio": ci})
        train.write_json(path, curve)
    train.write_json(path, curve)
    return curve


# ----------------------------------------------------------------------------------------------------------------
# Stage 2 and the powered evaluation.


def stage2_source_and_cfg(study: StudyConfig, run: RunSpec):
    """Training data and TrainConfig of one stage-2 run: run.seed shifts the data seed and the noise seed."""
    preset = study.preset
    data = dataclasses.replace(preset.data, seed=preset.data.seed + 7919 * run.seed)
    cfg = dataclasses.replace(preset.stage2, seed=preset.stage2.seed + 1000 * run.seed)
    if run.stage2_steps:
        cfg = dataclasses.replace(cfg, steps=run.stage2_steps)
    return data_lib.make_source(data, data_lib.TRAIN_STREAM), cfg


def finetune(study: StudyConfig, out: str, run: RunSpec, dense, captured_fn, mesh, budget: Budget) -> bool:
    """Stage 2 of one model from the dense weights (SLA2: its stage-1 router, frozen; SLA with proj_init "fit":
    the least-squares Proj). Returns True when done."""
    preset = study.preset
    run_dir = os.path.join(out, "stage2", run.name)
    proj = None
    if run.attention == "sla" and run.proj_init == "fit" and not train.is_done(run_dir):
        proj_path = os.path.join(out, "stage1", f"proj-{round(100 * run.sparsity)}.npz")
        if not os.path.exists(proj_path):
            fit = fit_sla_proj(preset, run, captured_fn())
            np.savez(proj_path, **{f"p{i}": p for i, (p, _) in enumerate(fit)},
                     **{f"b{i}": b for i, (_, b) in enumerate(fit)})
        z = np.load(proj_path)
        proj = [(z[f"p{i}"], z[f"b{i}"]) for i in range(preset.model.depth)]

    def init(model):
        train.transfer_params(dense, model)
        if run.router_run is not None:
            train.load_router(os.path.join(out, "stage1", run.router_run), preset, run, model)
        if proj is not None:
            for core, (p, b) in zip(_layer_cores(model), proj):
                core.proj_kernel[...], core.proj_bias[...] = jnp.asarray(p), jnp.asarray(b)

    source, cfg = stage2_source_and_cfg(study, run)
    _log(f"[stage 2] {run.name}: {cfg.steps} steps, quant={run.quant}")
    res = train.train_diffusion(run_dir, preset, run, cfg, init=init, trainable=train.STAGE2_TRAINABLE,
                                source=source, mesh=mesh, desc=f"stage2 {run.name}", deadline=budget.deadline)
    return "stopped_at" not in res


def evaluate_model(study: StudyConfig, out: str, name: str, run: RunSpec, quant: str, model_dir, heldout) -> dict:
    """Powered evaluation of one result row; writes eval/<name>.json, <name>_losses.npz and samples."""
    preset = study.preset
    eval_dir = os.path.join(out, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    t0 = time.time()
    model = make_model(preset, run, quant=quant)
    train.load_params(model_dir, model)
    edges = stats.t_bins(study.t_bins)
    losses, metrics = {}, {"name": name, "run": run.name, "attention": run.attention, "sparsity": run.sparsity,
                           "quant_train": run.quant, "quant_eval": quant, "seed": run.seed,
                           "linear_scope": run.linear_scope, "router_routing": run.router_routing,
                           "proj_init": run.proj_init}
    bar = tqdm(total=2 * study.eval_triples, desc=f"eval {name}", dynamic_ncols=True, mininterval=2.0)
    for dist in evaluate.T_DISTS:
        res = evaluate.paired_losses(model, preset, study.eval_triples, dist, study.eval_batch, progress=bar.update)
        losses[dist], losses[f"t_{dist}"] = res["loss"], res["t"]
        metrics[f"loss_{dist}"] = float(res["loss"].mean())
        metrics[f"loss_per_t_bin_{dist}"] = stats.per_bin_means(res["loss"], res["t"], edges)
    bar.close()
    np.savez(os.path.join(eval_dir, f"{name}_losses.npz"), **losses)
    noise, labels = evaluate.sample_inputs(preset)
    samples = np.asarray(evaluate.euler_sample(model, noise, labels, preset.eval.sample_steps,
                                               preset.eval.sample_shift))
    ref_path = os.path.join(eval_dir, "dense-ft_samples.npy")
    if name == "dense-ft":
        np.save(ref_path, samples.astype(np.float16))
    if os.path.exists(ref_path):
        ref = jnp.asarray(np.load(ref_path).astype(np.float32))
        metrics["psnr_vs_dense_ft"] = float(jnp.mean(evaluate.psnr(jnp.asarray(samples), ref)))
        metrics["ssim_vs_dense_ft"] = float(jnp.mean(evaluate.ssim(jnp.asarray(samples), ref)))
    np.save(os.path.join(eval_dir, f"{name}_preview.npy"), report._to_uint8(samples[:4]))
    if heldout is not None:
        errs = evaluate.attention_errors(model, heldout)
        metrics["attn_rel_err_per_layer"], metrics["attn_rel_err"] = errs, float(np.mean(errs))
        kept = evaluate.kept_mass(model, heldout)
        if kept is not None:
            metrics["kept_mass_per_layer"], metrics["kept_mass"] = kept, float(np.mean(kept))
    done_path = os.path.join(model_dir, "done.json")
    if os.path.exists(done_path):
        vps = _json(done_path).get("videos_per_s")
        cfg = preset.stage0 if run.name == "dense" else preset.stage2
        metrics["ms_per_step"] = None if not vps else 1000.0 * cfg.batch_size / vps
    metrics["eval_seconds"] = time.time() - t0
    train.write_json(os.path.join(eval_dir, f"{name}.json"), metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# The command.


def run_study(study: StudyConfig, out: str, *, time_budget_s: float | None = None, ignore_gate: bool = False,
              context: int = 1) -> dict:
    """Run every missing step of the study into `out` (see the module docstring) and write the report."""
    budget = Budget(time_budget_s)
    preset = study.preset
    os.makedirs(out, exist_ok=True)
    _check_config(study, out)
    mesh = train.make_mesh(context)
    status = {"stage0": "running"}
    if not pretrain(study, out, budget, mesh):
        status["stage0"] = "stopped (time budget)"
        return _finish(study, out, status)
    status["stage0"] = "done"
    dense = load_dense(study, out)
    reprobe_gate(study, out, dense)  # before any router: the gate in this study's token order
    examples = os.path.join(out, "data_examples.gif")
    if not os.path.exists(examples):
        report.save_gif(data_lib.make_source(preset.data, data_lib.VAL_STREAM).batch(0, 4)["video"], examples)

    captured, heldout = train_routers(study, out, dense, budget)
    if budget.over():
        status["stage1"] = "stopped (time budget)"
        return _finish(study, out, status)
    cache = {"captured": captured, "heldout": heldout}

    def get(which):
        if cache[which] is None:
            cache[which] = capture(study, dense, "train" if which == "captured" else "heldout")
        return cache[which]

    if not os.path.exists(os.path.join(out, "routers.json")):
        compare_routers(study, out, dense, get("captured"), get("heldout"))
    training_free_curve(study, out, dense, get("captured") if _curve_needs_capture(study, out) else None, budget)
    if not os.path.exists(os.path.join(out, "eval", "dense.json")) and not budget.over():
        evaluate_model(study, out, "dense", RunSpec("dense", "dense"), "none", os.path.join(out, "stage0", "dense"),
                       get("heldout"))

    gate = gate_status(study, out)
    status["gate"] = gate
    if not gate["passed"] and not ignore_gate:
        _log(f"[gate] mean oracle kept mass at {study.gate_sparsity:.0%} is {gate['mean_oracle']} < "
             f"{study.gate_threshold}: no sparse fine-tuning (rerun with --ignore-gate to force)")
        status["stage2"] = "gate not passed"
        return _finish(study, out, status)
    if not gate["passed"]:
        gate["ignored"] = True  # --ignore-gate: the report says that the fine-tuning ran below the gate
        _log(f"[gate] mean oracle kept mass at {study.gate_sparsity:.0%} is {gate['mean_oracle']} < "
             f"{study.gate_threshold}: fine-tuning anyway (--ignore-gate)")
    not_run = []
    for run in preset.runs:
        if all(os.path.exists(os.path.join(out, "eval", f"{n}.json")) for n, _ in run.eval_names):
            _log(f"[stage 2] {run.name}: skipped (done)")
            continue
        if budget.over():
            not_run.append(run.name)
            continue
        if not finetune(study, out, run, dense, lambda: get("captured"), mesh, budget):
            not_run.append(run.name)
            continue
        for name, quant in run.eval_names:
            m = evaluate_model(study, out, name, run, quant, os.path.join(out, "stage2", run.name), get("heldout"))
            _log(f"[eval] {name}: loss (train t) {m['loss_train']:.4f}, uniform t {m['loss_uniform']:.4f}, "
                 f"attn err {m.get('attn_rel_err', float('nan')):.4f}")
    status["stage2"] = {"not_run": not_run}
    return _finish(study, out, status)


def _curve_needs_capture(study, out) -> bool:
    path = os.path.join(out, "curve.json")
    done = {(p["method"], p["sparsity"]) for p in (_json(path)["points"] if os.path.exists(path) else [])}
    return any(("sla", s) not in done for s in study.curve_sparsities)


ORDER_FIELDS = ("token_order", "tile")  # of ModelConfig: they change which tokens share a block, not stage 0
ORDER_DEPENDENT = ("stage1", "stage2", "eval", "routers.json", "curve.json")  # made with the old order's blocks


def _check_config(study: StudyConfig, out: str) -> None:
    """Refuse a folder that holds a study of another configuration, except for the token order when the folder
    holds stage 0 only: the dense model computes the same function in every order (its position embeddings are
    added per token before the permutation), so its training continues and its gate is probed again
    (reprobe_gate); the routers, the curves and the sparse models are made of blocks and are not carried over."""
    cfg = dataclasses.asdict(study)
    cfg["preset"].pop("runs")
    cfg = json.loads(json.dumps(cfg))
    path = os.path.join(out, "study.json")
    if os.path.exists(path):
        old = _json(path)["config"]
        strip = [{**c, "preset": {**c["preset"], "model": {k: v for k, v in c["preset"]["model"].items()
                                                             if k not in ORDER_FIELDS}}} for c in (old, cfg)]
        if strip[0] != strip[1]:
            raise ValueError(f"{out!r} holds a study of a different configuration; use another --out")
        model = old["preset"]["model"]  # written before the order was a field: raster
        was = token_order.order_name(model.get("token_order", "raster"), model.get("tile"))
        if was != study_order(study):
            made = [p for p in ORDER_DEPENDENT if os.path.exists(os.path.join(out, p))]
            if made:
                raise ValueError(f"{out!r} holds {', '.join(made)} made in {was} token order; only a folder with "
                                 f"stage 0 alone can go on in {study_order(study)} order: use another --out")
            _log(f"[config] {out!r} was run in {was} token order, goes on in {study_order(study)} order (stage 0 "
                 "does not depend on it)")
    train.write_json(path, {"config": cfg, "runs": [r.name for r in study.preset.runs],
                            "num_tokens": study.preset.num_tokens,
                            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                            "jax_version": jax.__version__})


def _finish(study: StudyConfig, out: str, status: dict) -> dict:
    from experiments import study_report

    summary = study_report.write_report(study, out, status)
    _log(f"[done] report in {os.path.join(out, 'results.md')}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Carrying the state between calls.

PART_BYTES = 15 * 1024 * 1024
MAX_PARTS = 7  # + study_state.json


def _training_objects(study: StudyConfig, out: str, run_dir: str):
    """(model, optimizer) matching the checkpoints of one training run folder of the study."""
    preset = study.preset
    rel = os.path.relpath(run_dir, out).split(os.sep)
    if rel == ["stage0", "dense-short"]:
        p, run, cfg, wrt = preset.short_clip_preset(), RunSpec("dense", "dense"), preset.stage0_short, nnx.Param
    elif rel == ["stage0", "dense"]:
        p, run, cfg, wrt = preset, RunSpec("dense", "dense"), preset.stage0, nnx.Param
    elif rel[0] == "stage2":
        run = preset.run(rel[1])
        p, cfg, wrt = preset, stage2_source_and_cfg(study, run)[1], train.STAGE2_TRAINABLE
    elif rel[0] == "stage1":
        specs = [spec for spec in router_specs(study) if spec.router_run == rel[1]]
        if not specs:
            raise ValueError(f"not a router run of the study: {run_dir!r}")
        routers = train.RouterSet(preset, specs[0])
        return routers, train.make_optimizer(routers, train.stage1_train_config(preset.stage1),
                                                  train.STAGE1_TRAINABLE)
    else:
        raise ValueError(f"not a training run folder of the study: {run_dir!r}")
    model = make_model(p, run)
    return model, train.make_optimizer(model, cfg, wrt)


def _flat(tree) -> dict:
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat_into(tree, flat: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, v in paths:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        leaves.append(jnp.asarray(flat[key], dtype=np.asarray(v).dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _pack_checkpoint(study, out, run_dir) -> bytes:
    """The latest checkpoint of a training run as npz bytes: params float32, optimizer floats bfloat16."""
    import ml_dtypes

    model, opt = _training_objects(study, out, run_dir)
    mngr = train._manager(run_dir)
    step = mngr.latest_step()
    with_opt = not train.is_done(run_dir)
    train.restore_checkpoint(mngr, step, model, opt if with_opt else None)
    arrays = {f"model/{k}": v for k, v in _flat(nnx.state(model, nnx.Param).to_pure_dict()).items()}
    if with_opt:
        for k, v in _flat(nnx.state(opt).to_pure_dict()).items():
            if v.dtype == np.float32 and v.size > 1:
                v = v.astype(ml_dtypes.bfloat16).view(np.uint16)
                k = k + "::bf16"
            arrays[f"opt/{k}"] = v
    buf = io.BytesIO()
    np.savez(buf, __step__=np.int64(step), **arrays)
    return buf.getvalue()


def _unpack_checkpoint(study, out, run_dir, data: bytes) -> None:
    import ml_dtypes

    z = np.load(io.BytesIO(data))
    step = int(z["__step__"])
    if os.path.isdir(os.path.join(run_dir, "ckpt")) and train._manager(run_dir).latest_step() == step:
        return  # already there (an import into a folder that holds this state)
    model, opt = _training_objects(study, out, run_dir)
    flat = {k: z[k] for k in z.files if k != "__step__"}
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, _unflat_into(state.to_pure_dict(),
                                                 {k[6:]: v for k, v in flat.items() if k.startswith("model/")}))
    nnx.update(model, state)
    if any(k.startswith("opt/") for k in flat):
        opt_flat = {}
        for k, v in flat.items():
            if k.startswith("opt/"):
                k = k[4:]
                if k.endswith("::bf16"):
                    k, v = k[:-6], v.view(ml_dtypes.bfloat16).astype(np.float32)
                opt_flat[k] = v
        ostate = nnx.state(opt)
        nnx.replace_by_pure_dict(ostate, _unflat_into(ostate.to_pure_dict(), opt_flat))
        nnx.update(opt, ostate)
        train.save_checkpoint(train._manager(run_dir), step, model, opt)
    else:
        train.save_params_only(run_dir, step, model)


def _report_gif(rel: str) -> bool:
    """The report's sample GIFs (samples.gif, gifs/<model>.gif): remade from eval/*_preview.npy by every report."""
    return rel == "samples.gif" or rel.startswith("gifs" + os.sep)


def export_state(study: StudyConfig, out: str, dst: str, max_mib: float = 45.0) -> list:
    """Write what a later call needs to continue `out` into `dst` as study_state.tar.NNN parts of <= 15 MiB:
    every file except checkpoints and the report's sample GIFs (the report remakes them); the checkpoints that are
    still needed (unfinished training runs with their optimizer state in bf16, the finished dense model's
    parameters, the stage-1 routers' parameters (stage 2 and the router comparison load them), finished stage-2
    runs not yet evaluated) as npz. A stage-2 checkpoint that would take the state past max_mib is left out (that run restarts from its
    beginning in the next call; the state must travel back with the repository, 64 MiB in all). Returns the part
    paths."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
            rel = os.path.relpath(path, out)
            if os.path.isdir(path) or f"{os.sep}ckpt{os.sep}" in f"{os.sep}{rel}" or _report_gif(rel):
                continue
            tar.add(path, arcname=rel)
        run_dirs = [d for stage in ("stage0", "stage1", "stage2") for d in glob.glob(os.path.join(out, stage, "*"))]
        for run_dir in sorted(run_dirs):
            if not os.path.isdir(os.path.join(run_dir, "ckpt")) or train._manager(run_dir).latest_step() is None:
                continue
            rel = os.path.relpath(run_dir, out)
            name = os.path.basename(run_dir)
            full_started = os.path.isdir(os.path.join(out, "stage0", "dense", "ckpt"))
            if rel.startswith("stage0") and name == "dense-short" and train.is_done(run_dir) and full_started:
                continue  # the full-length phase has started from it
            if rel.startswith("stage2"):
                run = study.preset.run(name)
                if all(os.path.exists(os.path.join(out, "eval", f"{n}.json")) for n, _ in run.eval_names):
                    continue
            data = _pack_checkpoint(study, out, run_dir)
            if rel.startswith("stage2") and (buf.tell() + len(data)) / 2**20 > max_mib:
                _log(f"[export] left out {rel}'s checkpoint ({len(data) / 2**20:.1f} MiB): it restarts next call")
                continue
            info = tarfile.TarInfo(os.path.join(rel, "ckpt.npz"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    parts = [blob[i : i + PART_BYTES] for i in range(0, len(blob), PART_BYTES)]
    if len(parts) > MAX_PARTS:
        raise ValueError(f"the state is {len(blob) / 2**20:.1f} MiB, more than {MAX_PARTS} parts of 15 MiB")
    os.makedirs(dst, exist_ok=True)
    paths = []
    for i, part in enumerate(parts):
        paths.append(os.path.join(dst, f"study_state.tar.{i:03d}"))
        with open(paths[-1], "wb") as f:
            f.write(part)
    manifest = {"parts": [os.path.basename(p) for p in paths], "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest()}
    train.write_json(os.path.join(dst, "study_state.json"), manifest)
    _log(f"[export] {len(blob) / 2**20:.1f} MiB in {len(parts)} part(s) under {dst}")
    return paths


def import_state(study: StudyConfig, out: str, src: str) -> None:
    """Restore a state written by `export_state` into `out` (files, then checkpoints from their npz)."""
    manifest_path = os.path.join(src, "study_state.json")
    if not os.path.exists(manifest_path):
        raise ValueError(f"no study_state.json in {src!r} (written by --export-state beside its parts)")
    manifest = _json(manifest_path)
    parts = [os.path.join(src, name) for name in manifest["parts"]]
    blob = b"".join(open(p, "rb").read() for p in parts)
    if len(blob) != manifest["bytes"] or hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise ValueError(f"the parts in {src!r} do not match study_state.json (parts of different exports?)")
    os.makedirs(out, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
        for m in members:
            if m.name.endswith("ckpt.npz"):
                run_dir = os.path.join(out, os.path.dirname(m.name))
                os.makedirs(run_dir, exist_ok=True)
                _unpack_checkpoint(study, out, run_dir, tar.extractfile(m).read())
            elif hasattr(tarfile, "data_filter"):
                tar.extract(m, out, filter="data")
            else:
                tar.extract(m, out)
    _log(f"[import] {len(members)} entries from {len(parts)} part(s) into {out}")


def override(obj, item: str):
    """obj (nested frozen dataclasses) with the field at dotted PATH of "PATH=VALUE" replaced by VALUE (JSON, or
    a string when it is not JSON; lists become tuples)."""
    path, _, text = item.partition("=")
    if not _ or not path:
        raise ValueError(f"--set {item!r}: expected PATH=VALUE")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    value = tuple(value) if isinstance(value, list) else value
    head, _, rest = path.partition(".")
    if not dataclasses.is_dataclass(obj) or head not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"--set {item!r}: no field {head!r} in {type(obj).__name__}")
    new = override(getattr(obj, head), f"{rest}={text}") if rest else value
    return dataclasses.replace(obj, **{head: new})


def main():
    parser = argparse.ArgumentParser(description="The SLA2 quality study (resumable, time-budgeted).")
    parser.add_argument("--preset", default="study-cpu-smoke")
    parser.add_argument("--out", required=True)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: training stops at the first checkpoint after it, no new step starts")
    parser.add_argument("--ignore-gate", action="store_true", help="fine-tune even if the gate did not pass")
    parser.add_argument("--runs", default=None, help="comma-separated subset of the stage-2 models")
    parser.add_argument("--backend", default=None, help="sla2_jax backend override (auto, pallas, xla)")
    parser.add_argument("--context", type=int, default=1, help="devices per sequence-parallel group")
    parser.add_argument("--import-state", default=None, help="folder with study_state.* to restore first")
    parser.add_argument("--export-state", default=None, help="folder to write study_state.* to at the end")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a field, e.g. preset.model.qk_norm_init=2.0 or preset.stage0.steps=12000 "
                             "(VALUE parsed as JSON, else a string); repeatable")
    args = parser.parse_args()
    study = get_study(args.preset)
    for item in args.set:
        study = override(study, item)
    preset = study.preset
    if args.runs:
        wanted = [n.strip() for n in args.runs.split(",") if n.strip()]
        preset = dataclasses.replace(preset, runs=tuple(preset.run(n) for n in wanted))
    if args.backend:
        preset = dataclasses.replace(preset, backend=args.backend)
    study = dataclasses.replace(study, preset=preset)
    if args.import_state:
        import_state(study, args.out, args.import_state)
    try:
        run_study(study, args.out, time_budget_s=args.time_budget, ignore_gate=args.ignore_gate,
                  context=args.context)
    finally:
        if args.export_state:
            export_state(study, args.out, args.export_state)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
