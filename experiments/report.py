"""Report of a recipe run: results.json, results.md (tables) and pictures, all written to the run folder.

Pictures: samples_grid.png (one row per model: the frames of sample 0, dense first), samples.gif (every model's
samples, one row per model), gifs/<run>.gif, data_examples.gif (training videos), error_vs_sparsity.png
(attention relative error and PSNR vs dense against sparsity, SLA2 vs SLA vs sparse-only) and loss_curves.png
(training loss of stages 0 and 2, relative MSE of stage 1).

Usage: python -m experiments.report --out runs/smoke   (run_recipe calls it at the end)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from experiments.configs import ABLATION_TABLE, MAIN_TABLE

LABELS = {"dense": "dense", "sla": "SLA", "sla2": "SLA2", "sparse": "sparse-only"}


def _to_uint8(video: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(video, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)


def _upscale(frames: np.ndarray, min_size: int = 96) -> np.ndarray:
    """Nearest-neighbour upscaling of (..., H, W, C) so that H >= min_size."""
    factor = max(1, int(np.ceil(min_size / frames.shape[-3])))
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2)


def _pad(img: np.ndarray, px: int = 2) -> np.ndarray:
    return np.pad(img, ((px, px), (px, px), (0, 0)), constant_values=255)


def _label_strip(text: str, height: int, width: int = 130) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(im).text((4, height // 2 - 6), text, fill="black")
    return np.asarray(im)


def save_sample_grid(samples: dict, path: str, max_frames: int = 16) -> None:
    """samples: {run: (S, T, H, W, C) in [-1, 1]}. One row per run, frames of sample 0 across."""
    from PIL import Image

    rows = []
    for name, video in samples.items():
        frames = _upscale(_to_uint8(video[0][:max_frames]))
        row = np.concatenate([_pad(f) for f in frames], axis=1)
        rows.append(np.concatenate([_label_strip(name, row.shape[0]), row], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def save_gif(videos: np.ndarray, path: str, fps: int = 6) -> None:
    """videos: (S, T, H, W, C) in [-1, 1] -> one GIF with the S videos side by side."""
    from PIL import Image

    v = _upscale(_to_uint8(videos))
    frames = [np.concatenate([_pad(v[s, t]) for s in range(v.shape[0])], axis=1) for t in range(v.shape[1])]
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)


def save_comparison_gif(samples: dict, path: str, fps: int = 6) -> None:
    """All models' samples in one GIF: a row per model (label on the left), samples across."""
    from PIL import Image

    rows_per_t = None
    for name, video in samples.items():
        v = _upscale(_to_uint8(video))
        frames = [np.concatenate([_pad(v[s, t]) for s in range(v.shape[0])], axis=1) for t in range(v.shape[1])]
        frames = [np.concatenate([_label_strip(name, f.shape[0]), f], axis=1) for f in frames]
        rows_per_t = [[f] for f in frames] if rows_per_t is None else [r + [f] for r, f in zip(rows_per_t, frames)]
    ims = [Image.fromarray(np.concatenate(r, axis=0)) for r in rows_per_t]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)


def save_error_plot(results: dict, path: str) -> None:
    """Attention relative error and PSNR vs dense against sparsity for SLA2 / SLA / sparse-only (hard-top-k, QAT
    as trained; alpha 'block')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, marker in (("sla2", "o"), ("sla", "s"), ("sparse", "^")):
        pts = sorted(
            (r["sparsity"], r)
            for r in results.values()
            if r.get("attention") == kind and r.get("alpha", "block") == "block" and not r["run"].endswith("-noqat")
        )
        if not pts:
            continue
        xs = [100 * s for s, _ in pts]
        axes[0].plot(xs, [r.get("attn_rel_err", np.nan) for _, r in pts], marker=marker, label=LABELS[kind])
        axes[1].plot(xs, [r.get("psnr", np.nan) for _, r in pts], marker=marker, label=LABELS[kind])
    axes[0].set(xlabel="sparsity (%)", ylabel="attention relative L2 error", title="held-out Q/K/V of the dense model")
    axes[1].set(xlabel="sparsity (%)", ylabel="PSNR vs dense samples (dB)", title="samples from the same noise")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_loss_curves(stages: dict, path: str) -> None:
    """stages: {"stage0/dense": done.json, ...}. Three panels: stage 0 (short clips then full length, on one step
    axis), stage 2 per model, stage 1 per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    offset = 0
    for name in ("stage0/dense-short", "stage0/dense"):
        curve = stages.get(name, {}).get("loss_curve") or []
        if curve:
            axes[0].plot([offset + s for s, _ in curve], [v for _, v in curve], label=name.split("/")[1])
            offset += stages[name]["steps"]
    for name, done in stages.items():
        if name.startswith("stage2/") and done.get("loss_curve"):
            axes[1].plot(*zip(*done["loss_curve"]), label=name.split("/")[1])
        if name.startswith("stage1/") and done.get("rel_mse_curve"):
            axes[2].plot(*zip(*done["rel_mse_curve"]), label=name.split("/")[1])
    titles = ("stage 0 (dense) training loss", "stage 2 training loss", "stage 1 relative MSE (soft top-k)")
    for ax, title in zip(axes, titles):
        ax.set(xlabel="step", title=title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x, spec):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _relative(loss, ref):
    return None if ref is None or loss is None else 100.0 * (loss - ref) / ref


def _percent(x):
    return "n/a" if x is None else f"{x:+.2f}%"


def markdown_table(results: dict, names, dense_loss: float | None, stages: dict, dense_ft_loss=None) -> str:
    """One row per model: val loss (and its change vs the dense and the dense-ft models), PSNR/SSIM vs the dense
    model's samples, attention error, exact dense-attention mass kept by the router, training throughput."""
    head = (
        "| model | sparsity | stage-2 quant | val loss | vs dense | vs dense-ft | PSNR vs dense (dB) | SSIM vs dense "
        "| attn rel. error | kept mass | train videos/s |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name in names:
        r = results.get(name)
        if r is None:
            continue
        is_ref, is_dense = name == "dense", r["attention"] == "dense"
        speed = stages.get("stage0/dense" if is_ref else f"stage2/{name}", {}).get("videos_per_s")
        rows.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                name,
                "0%" if is_dense else f"{100 * r['sparsity']:.0f}%",
                "-" if is_dense else r["quant"],
                _fmt(r["val_loss"], ".4f"),
                "-" if is_ref else _percent(_relative(r["val_loss"], dense_loss)),
                "-" if name == "dense-ft" else _percent(_relative(r["val_loss"], dense_ft_loss)),
                "ref" if is_ref else _fmt(r.get("psnr"), ".2f"),
                "ref" if is_ref else _fmt(r.get("ssim"), ".4f"),
                _fmt(r.get("attn_rel_err"), ".4f"),
                "1" if is_dense else _fmt(r.get("kept_mass"), ".3f"),
                _fmt(speed, ".2f"),
            )
        )
    return head + "\n".join(rows) + "\n"


def oracle_mass_table(dense_result: dict) -> str:
    """Markdown: per layer, the dense attention mass of the best k key blocks at each sparsity (held-out Q/K/V)."""
    oracle = dense_result.get("oracle_kept_mass_per_layer")
    if not oracle:
        return ""
    levels = sorted(oracle, key=int)
    layers = len(oracle[levels[0]])
    head = "| sparsity | " + " | ".join(f"layer {i}" for i in range(layers)) + " | mean |\n"
    head += "|---" * (layers + 2) + "|\n"
    rows = [f"| {s}% | " + " | ".join(f"{m:.3f}" for m in oracle[s]) + f" | {np.mean(oracle[s]):.3f} |" for s in levels]
    return (
        "\n## How sparse is the dense model's attention? Oracle kept mass\n\n"
        "Exact softmax mass of the dense attention (held-out Q/K/V, mean over query rows and heads) inside the best "
        "k key blocks of each query block; an upper bound on what any router at that sparsity keeps.\n\n"
        + head
        + "\n".join(rows)
        + "\n"
    )


def write_report(out: str, skipped=None, failed=None) -> dict:
    """Collect <out>/eval/*.json and stage metrics into results.json, results.md and the pictures.

    skipped: runs not started (time budget); None = every run of recipe.json without an eval json. failed: {run:
    error message} of runs that raised."""
    eval_dir = os.path.join(out, "eval")
    with open(os.path.join(out, "recipe.json")) as f:
        recipe = json.load(f)
    results, samples = {}, {}
    for name in recipe["runs"]:
        path = os.path.join(eval_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f)
            sample_path = os.path.join(eval_dir, f"{name}_samples.npy")
            if os.path.exists(sample_path):  # absent for runs whose metrics came from an earlier call
                samples[name] = np.load(sample_path)
    stages = {}
    for stage in ("stage0", "stage1", "stage2"):
        d = os.path.join(out, stage)
        if os.path.isdir(d):
            for run in sorted(os.listdir(d)):
                p = os.path.join(d, run, "done.json")
                if os.path.exists(p):
                    with open(p) as f:
                        stages[f"{stage}/{run}"] = json.load(f)
    failed = dict(failed or {})
    if skipped is None:
        skipped = [n for n in recipe["runs"] if n not in results and n not in failed]
    dense_loss = results.get("dense", {}).get("val_loss")
    dense_ft_loss = results.get("dense-ft", {}).get("val_loss")
    summary = {"recipe": recipe, "results": results, "stages": stages, "not_run": list(skipped), "failed": failed}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)

    p = recipe["preset"]
    md = [
        f"# SLA2 recipe: preset `{p['name']}`\n",
        f"Video {p['data']['frames']}x{p['data']['height']}x{p['data']['width']}, patch {tuple(p['model']['patch'])}, "
        f"{recipe['num_tokens']} tokens; DiT dim {p['model']['dim']}, depth {p['model']['depth']}, "
        f"{p['model']['num_heads']} heads; blocks b_q={p['block_q']}, b_k={p['block_k']}; backend "
        f"`{p['backend']}`. Budgets: stage 0 {p['stage0']['steps']} steps x {p['stage0']['batch_size']} videos, "
        f"stage 1 {p['stage1']['steps']} steps, stage 2 {p['stage2']['steps']} steps x "
        f"{p['stage2']['batch_size']} videos (same for every sparse model). Device: {recipe['device']}; "
        f"jax {recipe['jax_version']}.\n",
        "Val loss: flow-matching loss on fixed validation videos, t and noise. PSNR/SSIM: samples "
        f"({p['eval']['sample_steps']} Euler steps, fixed noise) against the dense model's samples. Attention error: "
        "relative L2 error of each layer's attention on held-out Q/K/V captured from the dense model, mean over "
        "layers. Train videos/s: stage-0 (dense) or stage-2 training throughput after compilation.\n",
        "Kept mass: exact softmax mass of the dense attention on those Q/K/V inside the key blocks the model's "
        "router selects. vs dense-ft: against the dense model fine-tuned with the same stage-2 budget.\n",
        (f"**Not run (time budget reached):** {', '.join(skipped)}.\n\n" if skipped else ""),
        "".join(f"**Failed:** {name}: {msg}\n\n" for name, msg in failed.items()),
        "## Main comparison\n",
        markdown_table(results, MAIN_TABLE, dense_loss, stages, dense_ft_loss),
        "\n## Ablations at 97% (alpha granularity, QAT)\n",
        markdown_table(results, ABLATION_TABLE, dense_loss, stages, dense_ft_loss),
        oracle_mass_table(results.get("dense", {})),
    ]
    router = {k: v for k, v in stages.items() if k.startswith("stage1/")}
    if router:
        md.append(
            "\n## Stage 1 (router + alpha, soft top-k): relative MSE to full attention\n\n"
            "| run | first step | last steps | alpha after least-squares init (mean per layer) |\n|---|---|---|---|\n"
            + "".join(
                f"| {k.split('/')[1]} | {_fmt(v.get('first_rel_mse'), '.4f')} | {_fmt(v.get('final_rel_mse'), '.4f')} "
                f"| {', '.join(f'{a:.2f}' for a in v.get('alpha_init') or []) or '-'} |\n"
                for k, v in router.items()
            )
        )
    sparse_runs = any(r["attention"] != "dense" for r in results.values())
    pictures = [("samples", "samples_grid.png", samples), ("error vs sparsity", "error_vs_sparsity.png", sparse_runs),
                ("loss curves", "loss_curves.png", stages)]
    md.append("".join(f"\n![{title}]({name})\n" for title, name, made in pictures if made))  # only those written below
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md))

    if samples:
        save_sample_grid(samples, os.path.join(out, "samples_grid.png"))
        save_comparison_gif(samples, os.path.join(out, "samples.gif"))
        os.makedirs(os.path.join(out, "gifs"), exist_ok=True)
        for name, v in samples.items():
            save_gif(v, os.path.join(out, "gifs", f"{name}.gif"))
    if sparse_runs:
        save_error_plot(results, os.path.join(out, "error_vs_sparsity.png"))
    if stages:
        save_loss_curves(stages, os.path.join(out, "loss_curves.png"))
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder written by experiments.run_recipe")
    args = parser.parse_args()
    write_report(args.out)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
