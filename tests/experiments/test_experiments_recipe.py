"""The smoke recipe end to end: stages chain (short clips -> full-length dense -> routers -> fine-tunes), checkpoints
resume to the same step and parameters, reruns skip finished stages, metrics are finite and the report files exist.

The recipe itself runs once, in a child process (`python tests/experiments/test_experiments_recipe.py OUT STRAIGHT`,
started by conftest.py in parallel with the study's) that compiles with LLVM optimisation off: it is compile-bound
(about 15 programs), and this halves its time. The HLO, hence what is computed, is the same; the tests below check
its outputs in this process."""

import dataclasses
import json
import os
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import run_recipe, train
from experiments.configs import DataConfig, ModelConfig, get_preset
from experiments.dit import make_model

# Smaller than the cpu-smoke preset (256 tokens, one block kind per stage) so the test stays CI-sized.
PRESET = run_recipe.select_runs(
    dataclasses.replace(
        get_preset("cpu-smoke"),
        data=DataConfig(frames=4, height=16, width=16, max_shapes=2),
        model=ModelConfig(patch=(1, 2, 2), dim=128, depth=2, num_heads=2),
        stage0_short=dataclasses.replace(get_preset("cpu-smoke").stage0_short, steps=2, ckpt_every=2, log_every=1),
        short_frames=2,
        stage0=dataclasses.replace(get_preset("cpu-smoke").stage0, steps=8, ckpt_every=4, log_every=4, warmup=2),
        stage1=dataclasses.replace(get_preset("cpu-smoke").stage1, steps=4, log_every=2),
        stage2=dataclasses.replace(get_preset("cpu-smoke").stage2, steps=4, ckpt_every=2, log_every=2),
        block_q=32,
        block_k=16,
    ),
    "sla2-95",
)


def _params(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def _run_smoke_recipe(out: str, straight: str) -> None:
    """The recipe into `out`, with stage 0 interrupted after 4 of 8 steps (the recipe must resume it from the
    checkpoint), and the same stage 0 without interruption into `straight`, from the same short-clip weights."""
    quiet = lambda *a: None
    init = run_recipe._stage0_short(PRESET, out, train.make_mesh(), log=quiet)
    stopped = train.train_diffusion(
        os.path.join(out, "stage0", "dense"), PRESET, PRESET.run("dense"), PRESET.stage0, init=init, stop_after=4
    )
    if stopped != {"stopped_at": 4}:
        raise SystemExit(f"stop_after=4 returned {stopped}")
    run_recipe.run_recipe(PRESET, out, log=quiet)
    init = run_recipe._stage0_short(PRESET, out, train.make_mesh(), log=quiet)
    train.train_diffusion(straight, PRESET, PRESET.run("dense"), PRESET.stage0, init=init)


@pytest.fixture(scope="module")
def recipe_dirs(smoke_run):
    """(recipe folder, uninterrupted stage-0 folder), written by `_run_smoke_recipe` in the child process that
    conftest.py starts (`python tests/experiments/test_experiments_recipe.py OUT STRAIGHT`)."""
    out, straight = smoke_run("recipe")["dirs"]
    return out, straight


@pytest.fixture(scope="module")
def recipe_dir(recipe_dirs):
    return recipe_dirs[0]


def test_stage0_resumes_to_same_step_and_params(recipe_dirs):
    recipe_dir, straight_dir = recipe_dirs
    done = train.read_done(os.path.join(recipe_dir, "stage0", "dense"))
    assert done["resumed_from"] == 4 and done["steps"] == 8
    resumed = make_model(PRESET, PRESET.run("dense"))
    assert train.load_params(os.path.join(recipe_dir, "stage0", "dense"), resumed) == 8
    # The same training without interruption, from the same short-clip weights.
    straight = make_model(PRESET, PRESET.run("dense"))
    assert train.load_params(straight_dir, straight) == 8
    fresh = _params(make_model(PRESET, PRESET.run("dense")))
    a, b = _params(resumed), _params(straight)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
    # ... and training did change the parameters.
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(fresh)))


def test_all_stages_ran_and_metrics_are_finite(recipe_dir):
    for d in ("stage0/dense-short", "stage0/dense", "stage1/router-95-block", "stage2/sla2-95"):
        assert train.is_done(os.path.join(recipe_dir, d)), d
    with open(os.path.join(recipe_dir, "results.json")) as f:
        summary = json.load(f)
    results = summary["results"]
    assert set(results) == {"dense", "sla2-95"} and not summary["failed"]
    # Logs every 4 steps; the curve spans both calls (stopped at 4, resumed to 8).
    assert [step for step, _ in summary["stages"]["stage0/dense"]["loss_curve"]] == [4, 8]
    assert len(summary["stages"]["stage1/router-95-block"]["alpha_init"]) == PRESET.model.depth
    for name, r in results.items():
        assert np.isfinite(r["val_loss"]), name
        if name != "dense":
            for key in ("psnr", "ssim", "attn_rel_err"):
                assert np.isfinite(r[key]), (name, key)
            assert -1 <= r["ssim"] <= 1 and (0 < r["attn_rel_err"] < 2 or r["attention"] == "dense")
    for name in ("sla2-95",):  # a router keeps at most what the best blocks hold
        oracle = results["dense"]["oracle_kept_mass_per_layer"]["95"]
        assert all(0 < m <= o + 1e-6 for m, o in zip(results[name]["kept_mass_per_layer"], oracle)), name
    assert results["dense"]["attn_rel_err"] == 0.0
    files = (
        "results.md",
        "samples_grid.png",
        "samples.gif",
        "error_vs_sparsity.png",
        "loss_curves.png",
        "gifs/sla2-95.gif",
    )
    for f in files:
        assert os.path.getsize(os.path.join(recipe_dir, f)) > 0, f
    md = open(os.path.join(recipe_dir, "results.md")).read()
    assert "| sla2-95 | 95% | int8 |" in md and "| dense | 0% |" in md
    assert "Oracle kept mass" in md and "nan" not in md.lower().replace("dense", "")
    for picture in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):  # every linked picture was written
        assert os.path.getsize(os.path.join(recipe_dir, picture)) > 0, picture
    lines = md.splitlines()
    for i in range(1, len(lines) - 1):  # valid Markdown tables: no blank line between two rows
        assert not (lines[i - 1].startswith("|") and lines[i] == "" and lines[i + 1].startswith("|")), lines[i - 1]


def test_stage2_used_dense_weights_and_stage1_router(recipe_dir):
    """SLA2 fine-tuning starts from the dense weights and keeps the stage-1 router frozen."""
    run = PRESET.run("sla2-95")
    model = make_model(PRESET, run)
    train.load_params(os.path.join(recipe_dir, "stage2", "sla2-95"), model)
    ref = make_model(PRESET, run)
    train.load_router(os.path.join(recipe_dir, "stage1", run.router_run), PRESET, run, ref)
    for blk, rblk in zip(model.blocks, ref.blocks):
        np.testing.assert_array_equal(np.asarray(blk.attn.core.w_q[...]), np.asarray(rblk.attn.core.w_q[...]))
    # The router moved away from identity in stage 1 (it was trained).
    eye = np.eye(model.blocks[0].attn.core.w_q[...].shape[0])
    assert not np.allclose(np.asarray(model.blocks[0].attn.core.w_q[...]), eye)


def test_rerun_skips_finished_stages(recipe_dir):
    marker = os.path.join(recipe_dir, "stage2", "sla2-95", "done.json")
    before = os.path.getmtime(marker), open(os.path.join(recipe_dir, "eval", "sla2-95.json")).read()
    run_recipe.run_recipe(PRESET, recipe_dir, log=lambda *a: None)
    assert os.path.getmtime(marker) == before[0]
    assert open(os.path.join(recipe_dir, "eval", "sla2-95.json")).read() == before[1]
    other = dataclasses.replace(PRESET, stage2=dataclasses.replace(PRESET.stage2, steps=99))
    with pytest.raises(ValueError, match="different preset"):
        run_recipe.run_recipe(other, recipe_dir, log=lambda *a: None)


def test_export_state_keeps_what_a_continuation_needs(recipe_dir, tmp_path):
    dst = str(tmp_path / "state")
    run_recipe.export_state(PRESET, recipe_dir, dst)
    for f in (
        "recipe.json",
        "stage0/dense/done.json",
        "stage1/router-95-block/done.json",
        "eval/sla2-95.json",
        "eval/dense_samples.npy",
        "stage2/sla2-95/done.json",
    ):
        assert os.path.exists(os.path.join(dst, f)), f
    assert not os.path.exists(os.path.join(dst, "stage2", "sla2-95", "ckpt"))
    exported, original = make_model(PRESET, PRESET.run("dense")), make_model(PRESET, PRESET.run("dense"))
    assert train.load_params(os.path.join(dst, "stage0", "dense"), exported) == PRESET.stage0.steps
    train.load_params(os.path.join(recipe_dir, "stage0", "dense"), original)
    jax.tree.map(np.testing.assert_array_equal, _params(exported), _params(original))


if __name__ == "__main__":
    _run_smoke_recipe(*sys.argv[1:3])
