"""The study command end to end on the study-cpu-smoke preset: a first call stopped by its time budget after the
first stage-0 checkpoint exports its state (that call in raster token order); a second call in another folder
imports it in the preset's tile order (stage 0 does not depend on the order) and runs every step
(stage 0 with the kept-mass probe, gate, routers, router comparison, training-free curve, stage 2, powered
evaluation, report); a rerun skips everything; the finished state, exported and imported into a third folder,
holds the routers and the dense model. Runs once in a child process (started by conftest.py, in parallel
with the recipe's); the tests below check its outputs."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("skimage")

from experiments import study, train  # noqa: E402
from experiments.configs import get_study  # noqa: E402

STUDY = get_study("study-cpu-smoke")
RASTER = study.override(STUDY, "preset.model.token_order=raster")


def _run(first: str, state: str, second: str) -> None:
    study.run_study(RASTER, first, time_budget_s=1e-3)
    study.export_state(RASTER, first, state)
    study.import_state(STUDY, second, state)
    study.run_study(STUDY, second, ignore_gate=True)
    study.run_study(STUDY, second, ignore_gate=True)  # the rerun: every step skipped
    final_state, third = _third_hop(state, second)
    study.export_state(STUDY, second, final_state)  # the finished study travels on: routers and models included
    study.import_state(STUDY, third, final_state)


def _third_hop(state: str, second: str) -> tuple:
    return state + "-final", second + "-reimported"


@pytest.fixture(scope="module")
def dirs(smoke_run):
    """Folders of the child run started by conftest.py (`python tests/experiments/test_experiments_study.py
    FIRST STATE SECOND`, which runs `_run`)."""
    run = smoke_run("study")
    first, state, second = run["dirs"]
    return {"first": first, "state": state, "second": second, "log": run["log"]}


def test_first_call_stops_at_its_budget_and_exports(dirs):
    first = dirs["first"]
    assert not train.is_done(os.path.join(first, "stage0", "dense-short"))
    progress = json.load(open(os.path.join(first, "stage0", "dense-short", "progress.json")))
    assert [s for s, _ in progress["loss_curve"]] == [1]  # stopped at the first checkpoint after the deadline
    assert sorted(os.listdir(dirs["state"])) == ["study_state.json", "study_state.tar.000"]
    assert os.path.getsize(os.path.join(dirs["state"], "study_state.tar.000")) < study.PART_BYTES
    assert "stopped (time budget)" in open(os.path.join(first, "results.md")).read()


def test_second_call_ran_every_step(dirs):
    out = dirs["second"]
    for d in ("stage0/dense-short", "stage0/dense", "stage1/router-95-block",
              "stage2/dense-ft", "stage2/sla2-95-noqat", "stage2/sla-95-fit"):
        assert train.is_done(os.path.join(out, d)), d
    # The short phase continued from the imported step-1 checkpoint: its curve spans both calls.
    assert [s for s, _ in train.read_done(os.path.join(out, "stage0", "dense-short"))["loss_curve"]] == [1, 2]
    gate = json.load(open(os.path.join(out, "stage0", "gate.json")))
    assert [(p["phase"], p["step"], p["token_order"]) for p in gate] == [
        ("dense-short", 1, "raster"), ("dense-short", 2, "tiles 2x4x4"), ("dense", 2, "tiles 2x4x4")]
    for p in gate:
        assert all(0 < r <= o + 1e-6 <= 1 + 1e-6 for o, r in zip(p["mean_oracle"], p["mean_router"]))
    rows = json.load(open(os.path.join(out, "routers.json")))["rows"]
    assert {(r["method"], r["sparsity"]) for r in rows} == {
        (m, 0.95) for m in ("oracle", "sla", "sla-fitted-proj", "sla2-soft_dense_st")}
    assert all(np.isfinite(r["attn_rel_err"]) and 0 < r["kept_mass"] <= 1 for r in rows)
    points = json.load(open(os.path.join(out, "curve.json")))["points"]
    assert len(points) == 3 and all(p["ratio"]["lo"] <= p["ratio"]["ratio"] <= p["ratio"]["hi"] for p in points)


def test_exported_state_keeps_the_routers_and_the_dense_model(dirs):
    """A later call needs the stage-1 routers (stage 2 and the router comparison load them) and the dense model."""
    _, third = _third_hop(dirs["state"], dirs["second"])
    second = dirs["second"]
    specs = study.router_specs(STUDY)
    assert specs
    for spec in specs:
        loaded = []
        for out in (second, third):
            routers = train.RouterSet(STUDY.preset, spec)
            train.load_params(os.path.join(out, "stage1", spec.router_run), routers)
            loaded.append(jax.tree_util.tree_leaves(nnx.state(routers, nnx.Param)))
        for a, b in zip(*loaded):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a, b = study.load_dense(STUDY, second), study.load_dense(STUDY, third)
    for x, y in zip(jax.tree_util.tree_leaves(nnx.state(a, nnx.Param)), jax.tree_util.tree_leaves(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The report's sample GIFs stay behind (the next report remakes them from the previews, which travel).
    assert os.path.exists(os.path.join(second, "samples.gif")) and os.path.exists(os.path.join(second, "gifs"))
    assert not os.path.exists(os.path.join(third, "samples.gif")) and not os.path.exists(os.path.join(third, "gifs"))
    assert os.listdir(os.path.join(third, "eval")) and any(f.endswith("_preview.npy") for f in os.listdir(
        os.path.join(third, "eval")))


def test_evaluation_rows_and_report(dirs):
    out = dirs["second"]
    names = ["dense", "dense-ft", "sla2-95-noqat@none", "sla2-95-noqat@int8", "sla-95-fit"]
    for n in names:
        m = json.load(open(os.path.join(out, "eval", f"{n}.json")))
        z = np.load(os.path.join(out, "eval", f"{n}_losses.npz"))
        assert z["train"].shape == z["uniform"].shape == (STUDY.eval_triples,)
        assert np.all(np.isfinite(z["train"])) and m["loss_train"] == pytest.approx(float(z["train"].mean()))
        assert len(m["loss_per_t_bin_uniform"]) == STUDY.t_bins and None not in m["loss_per_t_bin_uniform"]
        if n not in ("dense", "dense-ft"):
            assert np.isfinite(m["psnr_vs_dense_ft"]) and 0 < m["kept_mass"] <= 1 and m["ms_per_step"] > 0
    # Same triples for every model (paired): the t values agree.
    a, b = (np.load(os.path.join(out, "eval", f"{n}_losses.npz")) for n in ("dense-ft", "sla-95-fit"))
    np.testing.assert_array_equal(a["t_train"], b["t_train"])
    md = open(os.path.join(out, "results.md")).read()
    lines = md.splitlines()
    for i in range(1, len(lines) - 1):  # valid Markdown tables: no blank line inside a table, no NaN cell
        assert not (lines[i - 1].startswith("|") and lines[i] == "" and lines[i + 1].startswith("|")), i
    assert "nan" not in md.lower().replace("dense", "")
    assert "| dense-short | 1 | raster |" in md and "| dense | 2 | tiles 2x4x4 |" in md
    assert "tokens in tiles 2x4x4 order" in md
    assert "was run in raster token order, goes on in tiles 2x4x4 order" in dirs["log"]
    for section in ("## Gate", "## Routers", "## Training-free", "## Fine-tuned", "## Claims", "per t bin"):
        assert section in md, section
    for f in ("results.json", "gate_curve.png", "curve.png", "loss_curves.png", "samples.gif", "gifs/sla-95-fit.gif",
              "data_examples.gif"):
        assert os.path.exists(os.path.join(out, f)), f
    assert "[stage 2] dense-ft: skipped (done)" in dirs["log"]
    assert "[stage 0] dense pre-training: skipped (done)" in dirs["log"]


if __name__ == "__main__":
    _run(*sys.argv[1:4])
