"""Report of a study folder (experiments/study.py): results.json, results.md and pictures.

Tables: the gate curve (oracle kept mass of the dense model while it trains), the router comparison, the
training-free curve, the fine-tuned models with paired-bootstrap 95% CIs of their loss ratio to dense-ft (training
and uniform t), per-t-bin loss ratios, the claims the study tests. Pictures: gate_curve.png, curve.png,
loss_curves.png (stages 0 and 2, stage-1 relative MSE), samples.gif (first samples of every model, one row each),
gifs/<model>.gif, data_examples.gif.

Usage: python -m experiments.study_report --preset study-gpu --out runs/study   (study.py calls it at the end)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from experiments import report, stats, token_order
from experiments.configs import StudyConfig, get_study

REF = "dense-ft"
NOISE_FLOOR = "dense-ft-s1"


def _fmt(x, spec=".4f"):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _ci(r):
    return "n/a" if r is None else f"{r['ratio']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"


def _table(head, rows) -> str:
    return ("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
            + "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in rows))


def _load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _losses(out, name):
    path = os.path.join(out, "eval", f"{name}_losses.npz")
    return dict(np.load(path)) if os.path.exists(path) else None


def ratio(out, name, ref, dist):
    """Paired bootstrap CI of mean loss(name) / mean loss(ref) under t distribution `dist`, or None."""
    a, b = _losses(out, name), _losses(out, ref)
    if a is None or b is None:
        return None
    return stats.paired_bootstrap_ratio(a[dist], b[dist])


def gate_section(study: StudyConfig, out: str) -> str:
    probes = _load(os.path.join(out, "stage0", "gate.json")) or []
    if not probes:
        return "## Gate: oracle kept mass of the dense model\n\nNo probe yet.\n"
    sp = probes[0]["sparsities"]
    g = sp.index(study.gate_sparsity)
    rows = [[p["phase"], p["step"], _order(p) + (" (re-probed)" if p.get("reprobed_from") else "")]
            + [f"{m:.3f}" for m in p["mean_oracle"]]
            + [", ".join(f"{o[g]:.2f}" for o in p["oracle"]), f"{p['mean_router'][g]:.3f}"] for p in probes]
    head = ["phase", "step", "token order"] + [f"oracle {100 * s:g}%" for s in sp]
    head += [f"per layer at {100 * study.gate_sparsity:g}%", f"SLA router at {100 * study.gate_sparsity:g}%"]
    _plot_gate(probes, study, os.path.join(out, "gate_curve.png"))
    return (
        "## Gate: oracle kept mass of the dense model while it trains\n\n"
        f"Exact softmax mass in the best key blocks (held-out probe videos at t = {list(study.probe_times)}), mean "
        f"over layers, heads and query rows. Gate: >= {study.gate_threshold} at {100 * study.gate_sparsity:g}% "
        "on the full-length model before any sparse fine-tuning, measured in the study's token order "
        f"({_study_order(study)}; the order decides which tokens share a block, the dense model does not depend on "
        "it; a re-probed row is the finished dense model probed again after a change of order).\n\n"
        + _table(head, rows)
        + "\n![gate curve](gate_curve.png)\n"
    )


def _order(probe) -> str:
    return probe.get("token_order", "raster")  # rows written before the order was recorded were raster


def _study_order(study: StudyConfig) -> str:
    return token_order.order_name(study.preset.model.token_order, study.preset.model.tile)


def _plot_gate(probes, study, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    offset = max([p["step"] for p in probes if p["phase"] == "dense-short"], default=0)
    orders = list(dict.fromkeys(_order(p) for p in probes))
    for i, s in enumerate(probes[0]["sparsities"]):
        color = f"C{i}"
        for order, marker in zip(orders, "osD^v"):
            for phase, style in (("dense-short", "--"), ("dense", "-")):
                pts = [(p["step"] + (offset if phase == "dense" else 0), p["mean_oracle"][i]) for p in probes
                       if p["phase"] == phase and _order(p) == order]
                if pts:
                    label = f"{100 * s:g}%" + (" (short clips)" if phase == "dense-short" else "")
                    label += f", {order}" if len(orders) > 1 else ""
                    ax.plot(*zip(*pts), style, marker=marker, color=color, label=label)
    ax.axhline(study.gate_threshold, color="k", ls="--", lw=1)
    ax.set(xlabel="stage-0 step (short clips, then full length)", ylabel="mean oracle kept mass", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(title="sparsity", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def router_section(out: str) -> str:
    res = _load(os.path.join(out, "routers.json"))
    if not res:
        return ""
    rows = [[f"{100 * r['sparsity']:g}%", r["method"], _fmt(r["kept_mass"], ".3f"),
             ", ".join(f"{m:.2f}" for m in r["kept_mass_per_layer"]), _fmt(r["attn_rel_err"]),
             ", ".join(f"{e:.3f}" for e in r["attn_rel_err_per_layer"])] for r in res["rows"]]
    return (
        "\n## Routers on held-out Q/K/V of the dense model (no fine-tuning)\n\n"
        "oracle: best blocks by exact mass, alpha = that mass. sla: SLA's router with the least-squares alpha. "
        "sla-fitted-proj: SLA (v1) with Proj fitted by least squares on the stage-1 capture. sla2-soft_dense / "
        "sla2-soft_dense_st / sla2-soft: stage-1 routers trained with every key block reachable (soft forward / "
        "hard forward with the soft gradient) / with the hard top-k blocks and log M. "
        "Attention error: relative L2 to dense attention.\n\n"
        + _table(["sparsity", "routing", "kept mass", "per layer", "attn rel. error", "per layer"], rows)
    )


def curve_section(out: str) -> str:
    curve = _load(os.path.join(out, "curve.json"))
    if not curve or not curve.get("points"):
        return ""
    rows = [[p["method"], f"{100 * p['sparsity']:g}%", _fmt(p["loss"]), _ci(p["ratio"])]
            for p in sorted(curve["points"], key=lambda p: (p["method"], p["sparsity"]))]
    _plot_curve(curve, os.path.join(out, "curve.png"))
    return (
        "\n## Training-free loss vs sparsity\n\n"
        f"The dense model (loss {curve['dense_loss']:.4f}) with its attention replaced, no fine-tuning; ratio to "
        "the dense model's loss on the same triples (training t) with a paired bootstrap 95% CI.\n\n"
        + _table(["routing", "sparsity", "loss", "ratio to dense [95% CI]"], rows) + "\n![curve](curve.png)\n"
    )


def _plot_curve(curve, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("oracle", "o"), ("sla", "s"), ("sla2", "^")):
        pts = sorted((p["sparsity"], p["ratio"]) for p in curve["points"] if p["method"] == method)
        if not pts:
            continue
        xs = [100 * s for s, _ in pts]
        ys = [r["ratio"] for _, r in pts]
        err = [[r["ratio"] - r["lo"] for _, r in pts], [r["hi"] - r["ratio"] for _, r in pts]]
        ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=method)
    ax.axhline(1.0, color="k", lw=1)
    ax.set(xlabel="sparsity (%)", ylabel="loss / dense loss (training-free)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_rows(study: StudyConfig, out: str) -> list:
    names = ["dense"] + [n for r in study.preset.runs for n, _ in r.eval_names]
    return [m for m in (_load(os.path.join(out, "eval", f"{n}.json")) for n in names) if m is not None]


def models_section(study: StudyConfig, out: str, results: list) -> str:
    if not results:
        return ""
    rows = []
    for m in results:
        n = m["name"]
        rows.append([
            n, "0%" if m["attention"] == "dense" else f"{100 * m['sparsity']:g}%",
            f"{m['quant_train']} / {m['quant_eval']}", m["seed"],
            _fmt(m["loss_train"]), "ref" if n == REF else _ci(ratio(out, n, REF, "train")),
            _fmt(m["loss_uniform"]), "ref" if n == REF else _ci(ratio(out, n, REF, "uniform")),
            "ref" if n == REF else _fmt(m.get("psnr_vs_dense_ft"), ".2f"),
            "ref" if n == REF else _fmt(m.get("ssim_vs_dense_ft"), ".4f"),
            _fmt(m.get("attn_rel_err")), "1" if m["attention"] == "dense" else _fmt(m.get("kept_mass"), ".3f"),
            _fmt(m.get("ms_per_step"), ".1f"),
        ])  # fmt: skip
    head = ["model", "sparsity", "quant train / eval", "seed", "loss (train t)", "ratio to dense-ft [95% CI]",
            "loss (uniform t)", "ratio [95% CI]", "PSNR vs dense-ft (dB)", "SSIM vs dense-ft", "attn rel. error",
            "kept mass", "ms / train step"]
    floor = ratio(out, NOISE_FLOOR, REF, "train")
    text = (
        "\n## Fine-tuned models: paired comparison with dense-ft\n\n"
        f"{study.eval_triples} (video, t, noise) triples per t distribution, the same for every model; ratio = "
        "mean loss / dense-ft's mean loss with a paired bootstrap 95% CI. Noise floor (dense-ft seed 1 vs seed 0, "
        f"training t): {_ci(floor)}. PSNR/SSIM: {study.preset.eval.num_samples} samples from fixed noise against "
        "dense-ft's; the dense-ft-s1 row is the ceiling. ms / train step: stage 2 (stage 0 for dense) after "
        "compilation.\n\n" + _table(head, rows)
    )
    edges = stats.t_bins(study.t_bins)
    ref = _losses(out, REF)
    if ref is not None:
        bin_rows = []
        for m in results:
            cur = _losses(out, m["name"])
            if cur is None or m["name"] == REF:
                continue
            a = stats.per_bin_means(cur["train"], cur["t_train"], edges)
            b = stats.per_bin_means(ref["train"], ref["t_train"], edges)
            bin_rows.append([m["name"]] + [_fmt(x / y if x is not None and y else None, ".3f") for x, y in zip(a, b)])
        counts = np.histogram(ref["t_train"], edges)[0]
        head = ["model"] + [f"t {lo:.1f}-{hi:.1f} (n={c})" for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
        text += "\n### Loss ratio to dense-ft per t bin (training t)\n\n" + _table(head, bin_rows)
    return text


CLAIMS = (
    # (description, model, reference, bound on the CI's upper end or None for "report the ratio")
    ("SLA2-95 within +2% of dense-ft", "sla2-95", REF, 1.02),
    ("SLA2-97 within +5% of dense-ft", "sla2-97", REF, 1.05),
    ("SLA2-95 <= SLA with fitted Proj", "sla2-95", "sla-95-fit", 1.0),
    ("QAT beats no QAT in int8", "sla2-97", "sla2-97-noqat@int8", 1.0),
    ("QAT beats no QAT in int8_fp8", "sla2-97-fp8", "sla2-97-noqat@int8_fp8", 1.0),
    ("stage-1 form: soft_dense_st vs soft at 95%", "sla2-95", "sla2-95-softrouter", None),
    ("linear scope 'all' vs 'complement' at 97%", "sla2-97-all", "sla2-97", None),
    ("SLA fitted Proj vs zero-init Proj at 95%", "sla-95-fit", "sla-95", None),
    ("SLA2-95 within +2% of dense-ft, both with 4x stage-2 steps", "sla2-95-x4", "dense-ft-x4", 1.02),
    ("SLA2-97 within +5% of dense-ft, both with 4x stage-2 steps", "sla2-97-x4", "dense-ft-x4", 1.05),
    ("SLA2-95: 4x stage-2 steps vs 1x", "sla2-95-x4", "sla2-95", None),
    ("SLA2-97: 4x stage-2 steps vs 1x", "sla2-97-x4", "sla2-97", None),
)


def verdict(r: dict | None, bound: float | None, floor: dict | None = None) -> str:
    """Verdict of a claim "ratio r (a CI dict with lo, hi) has its upper CI end <= bound". A claim that holds by
    less than the noise floor's spread (floor: dense-ft seed 1 / seed 0; its CI's largest distance from 1) is
    said so: the effect is smaller than what retraining with another seed changes."""
    if r is None:
        return "n/a (not run)"
    if bound is None:
        return "measured"
    if r["hi"] > bound:
        return "not decided" if r["lo"] <= bound else "does not hold"
    spread = max(abs(floor["hi"] - 1.0), abs(floor["lo"] - 1.0)) if floor else 0.0
    if bound == 1.0 and r["lo"] >= 1.0 - spread:
        return f"holds, by less than the seed-to-seed spread ({spread:.4f})"
    return "holds"


def claims_section(out: str) -> str:
    rows = []
    floor = ratio(out, NOISE_FLOOR, REF, "train")
    for desc, a, b, bound in CLAIMS:
        r = ratio(out, a, b, "train")
        rows.append([desc, f"{a} / {b}", _ci(r), "-" if bound is None else f"upper CI <= {bound}",
                     verdict(r, bound, floor)])
    note = (f"dense-ft seed-to-seed spread (noise floor): {_ci(floor)}. A ratio inside that spread is "
            "indistinguishable from retraining dense-ft with another seed.\n\n" if floor else "")
    return ("\n## Claims (training t, paired bootstrap 95% CI)\n\n" + note
            + _table(["claim", "ratio", "value [95% CI]", "criterion", "verdict"], rows))


def write_report(study: StudyConfig, out: str, status: dict | None = None) -> dict:
    """Write results.json and results.md (and pictures) for the study folder `out`. Returns results.json."""
    meta = _load(os.path.join(out, "study.json")) or {}
    results = model_rows(study, out)
    summary = {"status": status or {}, "meta": meta, "results": results,
               "routers": _load(os.path.join(out, "routers.json")), "curve": _load(os.path.join(out, "curve.json")),
               "gate": _load(os.path.join(out, "stage0", "gate.json"))}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    p = study.preset
    md = [
        f"# SLA2 quality study: preset `{p.name}`\n",
        f"Videos ({p.data.source}) {p.data.frames}x{p.data.height}x{p.data.width}, patch {p.model.patch}, "
        f"{p.num_tokens} tokens in {_study_order(study)} order; DiT dim {p.model.dim}, depth {p.model.depth}, "
        f"{p.model.num_heads} heads; blocks "
        f"b_q={p.block_q}, b_k={p.block_k}. Stage 2: {p.stage2.steps} steps x {p.stage2.batch_size} videos for "
        f"every model. Device: {meta.get('device', 'n/a')}; jax {meta.get('jax_version', 'n/a')}.\n",
        f"Status: `{json.dumps(status or {})}`\n",
        gate_section(study, out),
        router_section(out),
        curve_section(out),
        models_section(study, out, results),
        claims_section(out) if results else "",
    ]
    stages = {}
    for stage in ("stage0", "stage1", "stage2"):
        for run in sorted(os.listdir(os.path.join(out, stage))) if os.path.isdir(os.path.join(out, stage)) else []:
            done = _load(os.path.join(out, stage, run, "done.json"))
            if done is not None:
                stages[f"{stage}/{run}"] = done
    if stages:
        report.save_loss_curves(stages, os.path.join(out, "loss_curves.png"))
        md.append("\n## Training curves\n\n![loss curves](loss_curves.png)\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(x for x in md if x))
    previews = {m["name"]: np.load(os.path.join(out, "eval", f"{m['name']}_preview.npy"))
                for m in results if os.path.exists(os.path.join(out, "eval", f"{m['name']}_preview.npy"))}
    if previews:
        videos = {n: v.astype(np.float32) / 127.5 - 1.0 for n, v in previews.items()}
        report.save_comparison_gif(videos, os.path.join(out, "samples.gif"))
        os.makedirs(os.path.join(out, "gifs"), exist_ok=True)
        for n, v in videos.items():
            report.save_gif(v, os.path.join(out, "gifs", f"{n}.gif"))
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="study-cpu-smoke")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    write_report(get_study(args.preset), args.out)
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    main()
