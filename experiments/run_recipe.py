"""One command for the whole SLA2 recipe of a preset: stage 0, capture, stage 1, stage 2, evaluation, report.

  python -m experiments.run_recipe --preset cpu-smoke --out runs/smoke
  python -m experiments.run_recipe --preset gpu --out runs/gpu --runs dense,sla-95,sla2-95,sla2-97

Folder layout (every stage is skipped when its done.json / eval json exists, resumed from its latest checkpoint
when interrupted):
  recipe.json               the preset and the runs (a rerun with a different preset config is refused)
  stage0/dense-short/       first phase of dense pre-training on short clips (presets with stage0_short only)
  stage0/dense/             dense pre-training (continues from dense-short when there is one)
  stage1/router-<s>-<a>/    router + alpha per sparsity s and alpha granularity a (soft top-k on captured Q/K/V)
  stage2/<run>/             fine-tuning of every sparse model from the stage-0 weights (same budget for all)
  eval/<run>.json, eval/<run>_samples.npy
  results.json, results.md, samples_grid.png, samples.gif, gifs/, error_vs_sparsity.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np

from experiments import data as data_lib
from experiments import evaluate, report, train
from experiments.configs import Preset, get_preset
from experiments.dit import make_model


def select_runs(preset: Preset, names: str | None) -> Preset:
    """Keep only the named runs (comma-separated); "dense" is always kept (it is the reference)."""
    if not names:
        return preset
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    for n in wanted:
        preset.run(n)  # raises ValueError on unknown names
    keep = tuple(r for r in preset.runs if r.name == "dense" or r.name in wanted)
    return dataclasses.replace(preset, runs=keep)


def _check_recipe(out: str, preset: Preset) -> dict:
    cfg = dataclasses.asdict(preset)
    cfg.pop("runs")
    path = os.path.join(out, "recipe.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old["preset"] != json.loads(json.dumps(cfg)):
            raise ValueError(f"{out!r} holds a run of a different preset config; use another --out")
    recipe = {
        "preset": cfg,
        "runs": [r.name for r in preset.runs],
        "num_tokens": preset.num_tokens,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "jax_version": jax.__version__,
    }
    train.write_json(path, recipe)
    return recipe


def run_recipe(preset: Preset, out: str, *, time_budget_s: float | None = None, context: int = 1, log=print) -> dict:
    """Run every missing stage of the preset into `out` and write the report. Returns results.json's content.

    Sparse models are trained and evaluated one after the other in the order of preset.runs (router first when it
    is missing), so an interrupted or time-limited run leaves complete rows. time_budget_s: once this many seconds
    have passed, no further model is started (the report says which were skipped); a rerun continues.
    context: devices per sequence-parallel group (mesh "context" axis; the rest of the devices split the batch).
    """
    t_start = time.time()
    os.makedirs(out, exist_ok=True)
    _check_recipe(out, preset)
    mesh = train.make_mesh(context)
    dense_run = preset.run("dense")
    stage0_dir = os.path.join(out, "stage0", "dense")
    eval_dir = os.path.join(out, "eval")
    evaluated = lambda r: os.path.exists(os.path.join(eval_dir, f"{r.name}.json"))

    # Stage 0: dense pre-training (optionally short clips first).
    init_dense = _stage0_short(preset, out, mesh, log)
    if train.is_done(stage0_dir):
        log("[stage 0] dense pre-training: skipped (done)")
    else:
        log(f"[stage 0] dense pre-training: {preset.stage0.steps} steps, {preset.num_tokens} tokens per video")
    train.train_diffusion(
        stage0_dir,
        preset,
        dense_run,
        preset.stage0,
        init=init_dense,
        mesh=mesh,
        desc="stage0 dense",
    )
    dense = make_model(preset, dense_run)
    train.load_params(stage0_dir, dense)
    examples = os.path.join(out, "data_examples.gif")
    if not os.path.exists(examples):
        report.save_gif(data_lib.make_source(preset.data, data_lib.VAL_STREAM).batch(0, 4)["video"], examples)

    # Held-out Q/K/V (attention error) and the dense model's evaluation: its samples are the reference.
    heldout, captured = None, None
    if not all(evaluated(r) for r in preset.runs):
        log(f"[eval] capturing held-out Q/K/V from {preset.stage1.heldout_videos} videos")
        heldout = train.capture_qkv(
            dense, preset, preset.stage1, stream=data_lib.HELDOUT_STREAM, num_videos=preset.stage1.heldout_videos
        )
        heldout = evaluate.add_block_mass(heldout, preset.block_q, preset.block_k)
    if not evaluated(dense_run):
        m = evaluate.evaluate_run(eval_dir, preset, dense_run, dense, heldout=heldout, dense_samples=None)
        log(f"[eval] dense: val_loss={m['val_loss']:.4f}")
    dense_samples = np.load(os.path.join(eval_dir, "dense_samples.npy"))

    skipped, failed = [], {}
    for r in preset.runs:
        if r.name == dense_run.name:
            continue
        if evaluated(r):
            log(f"[stage 2] {r.name}: skipped (done)")
            continue
        if time_budget_s is not None and time.time() - t_start > time_budget_s:
            skipped.append(r.name)
            continue
        t_run = time.time()
        try:
            captured = _stage12_and_eval(preset, r, out, dense, heldout, dense_samples, captured, mesh, log)
        except (FloatingPointError, ValueError, RuntimeError) as e:  # keep the other rows (one-shot GPU runs)
            failed[r.name] = f"{type(e).__name__}: {e}"[:500]
            log(f"[error] {r.name}: {failed[r.name]}")
        log(f"[time] {r.name}: {time.time() - t_run:.1f} s (total {time.time() - t_start:.1f} s)")

    if skipped:
        log(f"[budget] time budget of {time_budget_s} s reached; not run: {skipped}")
    summary = report.write_report(out, skipped=skipped, failed=failed)
    log(f"[done] {time.time() - t_start:.1f} s; report in {os.path.join(out, 'results.md')}")
    return summary


def _stage0_short(preset: Preset, out: str, mesh, log):
    """Train the short-clip phase of stage 0 when the preset has one; returns the init function of the full-length
    phase (copies the short-clip weights: the DiT's parameters do not depend on the number of frames), or None."""
    if preset.stage0_short is None:
        return None
    short = preset.short_clip_preset()
    short_dir = os.path.join(out, "stage0", "dense-short")
    if train.is_done(short_dir):
        log("[stage 0] short clips: skipped (done)")
    else:
        log(f"[stage 0] short clips: {preset.stage0_short.steps} steps, {short.num_tokens} tokens per clip")
    train.train_diffusion(
        short_dir,
        short,
        preset.run("dense"),
        preset.stage0_short,
        mesh=mesh,
        desc="stage0 dense-short",
    )

    def init(model):
        src = make_model(short, preset.run("dense"))
        train.load_params(short_dir, src)
        train.transfer_params(src, model)

    return init


def _stage12_and_eval(preset: Preset, r, out: str, dense, heldout, dense_samples, captured, mesh, log):
    """Stage 1 (when the run's router is missing), stage 2 and evaluation of one compared model. Returns the
    captured stage-1 Q/K/V (captured on first need, then reused by the next runs)."""
    # Stage 1: the router (one per sparsity and alpha granularity) on Q/K/V captured from the frozen dense model.
    router_dir = None if r.router_run is None else os.path.join(out, "stage1", r.router_run)
    if router_dir is not None and not train.is_done(router_dir):
        if captured is None:
            log(f"[stage 1] capturing Q/K/V at t={preset.stage1.timesteps} from {preset.stage1.num_videos} videos")
            captured = train.capture_qkv(
                dense, preset, preset.stage1, stream=data_lib.CAPTURE_STREAM, num_videos=preset.stage1.num_videos
            )
        log(f"[stage 1] {r.router_run}: {preset.stage1.steps} steps ({r.router_routing})")
        train.train_router(router_dir, preset, r, captured)

    # Stage 2: fine-tune from the dense weights (router frozen; SLA2 loads its stage-1 router and alpha).
    def init(model):
        train.transfer_params(dense, model)
        if router_dir is not None:
            train.load_router(router_dir, preset, r, model)

    log(f"[stage 2] {r.name}: {preset.stage2.steps} steps, quant={r.quant}")
    run_dir = os.path.join(out, "stage2", r.name)
    train.train_diffusion(
        run_dir,
        preset,
        r,
        preset.stage2,
        init=init,
        trainable=train.STAGE2_TRAINABLE,
        mesh=mesh,
        desc=f"stage2 {r.name}",
    )

    model = make_model(preset, r)
    train.load_params(run_dir, model)
    m = evaluate.evaluate_run(
        os.path.join(out, "eval"),
        preset,
        r,
        model,
        heldout=heldout,
        dense_samples=dense_samples,
    )
    kept = "n/a" if m.get("kept_mass") is None else f"{m['kept_mass']:.4f}"
    log(
        f"[eval] {r.name}: val_loss={m['val_loss']:.4f} psnr={m['psnr']:.2f} ssim={m['ssim']:.4f} "
        f"attn_err={m['attn_rel_err']:.4f} kept_mass={kept}"
    )
    return captured


def export_state(preset: Preset, out: str, dst: str) -> None:
    """Copy into `dst` what a later call needs to continue the recipe of `out` without redoing stage 0 or the
    finished models: recipe.json, the stage-0 done.json files with the dense parameters alone (no optimizer state),
    the stage-1 runs (small), eval/*.json and the dense model's samples (the PSNR/SSIM reference)."""
    os.makedirs(os.path.join(dst, "eval"), exist_ok=True)
    shutil.copy(os.path.join(out, "recipe.json"), dst)
    for name in ("dense-short", "dense"):
        src = os.path.join(out, "stage0", name)
        if train.is_done(src):
            os.makedirs(os.path.join(dst, "stage0", name), exist_ok=True)
            shutil.copy(os.path.join(src, "done.json"), os.path.join(dst, "stage0", name))
    dense_dir = os.path.join(out, "stage0", "dense")
    if train.is_done(dense_dir):
        dense = make_model(preset, preset.run("dense"))
        step = train.load_params(dense_dir, dense)
        train.save_params_only(os.path.join(dst, "stage0", "dense"), step, dense)
    for run in preset.runs:  # stage-2 metrics (throughput, loss curve) of the evaluated models, no checkpoints
        src = os.path.join(out, "stage2", run.name)
        if train.is_done(src) and os.path.exists(os.path.join(out, "eval", f"{run.name}.json")):
            os.makedirs(os.path.join(dst, "stage2", run.name), exist_ok=True)
            shutil.copy(os.path.join(src, "done.json"), os.path.join(dst, "stage2", run.name))
    if os.path.isdir(os.path.join(out, "stage1")):
        shutil.copytree(os.path.join(out, "stage1"), os.path.join(dst, "stage1"), dirs_exist_ok=True)
    for f in os.listdir(os.path.join(out, "eval")):
        if f.endswith(".json") or f == "dense_samples.npy":
            shutil.copy(os.path.join(out, "eval", f), os.path.join(dst, "eval"))


def main():
    parser = argparse.ArgumentParser(description="Run all stages of the SLA2 recipe for a preset.")
    parser.add_argument("--preset", default="cpu-smoke")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default=None, help="comma-separated subset of runs (dense always included)")
    parser.add_argument("--stage0-steps", type=int, default=None)
    parser.add_argument("--stage1-steps", type=int, default=None)
    parser.add_argument("--stage2-steps", type=int, default=None)
    parser.add_argument("--backend", default=None, help="sla2_jax backend override (auto, pallas, xla)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after which no further model is started (a rerun continues)",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=1,
        help="devices per context-parallel group (sequence-sharded attention); the rest split the batch",
    )
    parser.add_argument(
        "--export-state",
        default=None,
        help="only copy the state needed to continue --out elsewhere into this folder (see export_state)",
    )
    args = parser.parse_args()
    preset = select_runs(get_preset(args.preset), args.runs)
    if args.stage0_steps is not None:
        preset = dataclasses.replace(preset, stage0=dataclasses.replace(preset.stage0, steps=args.stage0_steps))
    if args.stage1_steps is not None:
        preset = dataclasses.replace(preset, stage1=dataclasses.replace(preset.stage1, steps=args.stage1_steps))
    if args.stage2_steps is not None:
        preset = dataclasses.replace(preset, stage2=dataclasses.replace(preset.stage2, steps=args.stage2_steps))
    if args.backend is not None:
        preset = dataclasses.replace(preset, backend=args.backend)
    if args.export_state is not None:
        export_state(preset, args.out, args.export_state)
        return
    run_recipe(preset, args.out, time_budget_s=args.time_budget, context=args.context)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
