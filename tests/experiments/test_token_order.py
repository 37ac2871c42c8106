"""Token order of the video DiT (ModelConfig.token_order): the tile permutation round-trips and puts cubes in blocks,
the dense model computes the same function in raster and tile order while its attention sees the permuted tokens,
the gate probe changes with the order, bad tiles are refused; the study accepts a stage-0 folder of another order
and probes its gate again before any router."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import data as data_lib, study, token_order, train
from experiments.configs import DataConfig, ModelConfig, RunSpec, get_study
from experiments.dit import VideoDiT, make_model

SMOKE = get_study("study-cpu-smoke")  # tokens (4, 8, 8) in 2 x 4 x 4 tiles, blocks of 32 queries / 16 keys
RASTER = study.override(SMOKE, "preset.model.token_order=raster")


def test_tile_permutation_round_trips_and_blocks_are_cubes():
    grid, tile = (8, 4, 8), (4, 2, 4)
    perm, inverse = token_order.permutation(grid, "tiles", tile)
    x = np.arange(8 * 4 * 8) * 10
    np.testing.assert_array_equal(x[perm][inverse], x)
    np.testing.assert_array_equal(np.sort(perm), np.arange(8 * 4 * 8))
    for start in (0, 32, 224):  # every run of 4 * 2 * 4 tokens is one cube, its tokens in raster order
        t, h, w = np.unravel_index(perm[start : start + 32], grid)
        assert len(set(t)) == 4 and len(set(h)) == 2 and len(set(w)) == 4
        assert max(t) - min(t) == 3 and max(h) - min(h) == 1 and max(w) - min(w) == 3
        assert list(perm[start : start + 32]) == sorted(perm[start : start + 32])
    assert token_order.permutation(grid, "raster") == (None, None)
    assert token_order.order_name("tiles", (4, 4, 4)) == "tiles 4x4x4"


def test_bad_tiles_and_orders_raise():
    with pytest.raises(ValueError, match="not divisible by tile"):
        token_order.tile_permutation((4, 8, 8), (3, 4, 4))
    with pytest.raises(ValueError, match="positive ints"):
        ModelConfig(token_order="tiles", tile=(0, 4, 4))
    with pytest.raises(ValueError, match="token_order"):
        ModelConfig(token_order="zigzag")
    # The preset checks its grid (4, 8, 8) and the short clips' (2, 8, 8): a 4-frame tile does not fit the latter.
    with pytest.raises(ValueError, match=r"\(2, 8, 8\) is not divisible by tile \(4, 4, 4\)"):
        study.override(SMOKE, "preset.model.tile=[4, 4, 4]")
    with pytest.raises(ValueError, match="not divisible by tile"):
        VideoDiT(ModelConfig(dim=32, depth=1, num_heads=2, token_order="tiles", tile=(1, 3, 3)),
                 DataConfig(frames=2, height=16, width=16), rngs=nnx.Rngs(0))


def _perturbed(preset):
    """The dense model of `preset` (seed 0) with its zero-initialised layers set to small random values."""
    model = make_model(preset, RunSpec("dense", "dense"))
    for i, lin in enumerate([blk.ada for blk in model.blocks] + [model.final_ada, model.final]):
        lin.kernel[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(i), lin.kernel.shape)
    return model


def test_dense_model_is_the_same_function_in_both_orders():
    raster, tiles = _perturbed(RASTER.preset), _perturbed(SMOKE.preset)
    x = jax.random.normal(jax.random.PRNGKey(5), (2 * 4 * 16 * 16 * 3,)).reshape(2, 4, 16, 16, 3)
    t, y = jnp.array([0.3, 0.8]), jnp.array([1, 5])
    out_r, cap_r = nnx.jit(lambda m: m(x, t, y, capture=True))(raster)
    out_t, cap_t = nnx.jit(lambda m: m(x, t, y, capture=True))(tiles)
    assert float(jnp.abs(out_r).max()) > 0.1
    np.testing.assert_allclose(out_t, out_r, atol=2e-5, rtol=1e-5)
    perm, _ = token_order.permutation(SMOKE.preset.grid, "tiles", SMOKE.preset.model.tile)
    for (qr, kr, vr), (qt, kt, vt) in zip(cap_r, cap_t):  # the attention sees the tokens in tile order
        for a, b in ((qr, qt), (kr, kt), (vr, vt)):
            np.testing.assert_allclose(b, a[:, perm], atol=2e-5, rtol=1e-5)


def test_gate_probe_is_measured_in_the_model_order():
    pytest.importorskip("skimage")
    from sla2_jax import diagnostics

    raster, tiles = _perturbed(RASTER.preset), _perturbed(SMOKE.preset)
    rep_r = study.probe_kept_mass(raster, RASTER, RASTER.preset)
    rep_t = study.probe_kept_mass(tiles, SMOKE, SMOKE.preset)
    assert abs(rep_r["mean_oracle"][0] - rep_t["mean_oracle"][0]) > 1e-3
    # The tile-order probe is the raster capture with its tokens permuted: the order reaches the attention blocks.
    cap = train.capture_qkv(raster, RASTER.preset, dataclasses.replace(RASTER.preset.stage1, timesteps=(0.5,)),
                            stream=data_lib.HELDOUT_STREAM, num_videos=1, with_output=False)
    perm, _ = token_order.permutation(SMOKE.preset.grid, "tiles", SMOKE.preset.model.tile)
    p = SMOKE.preset
    ref = diagnostics.kept_mass_report([q[:, perm] for q in cap["q"]], [k[:, perm] for k in cap["k"]],
                                       sparsities=SMOKE.curve_sparsities, block_q=p.block_q, block_k=p.block_k)
    np.testing.assert_allclose(rep_t["mean_oracle"], ref["mean_oracle"], atol=1e-5)


def _stage0_folder(out, gate_rows):
    """A study folder as a raster-order call leaves it: study.json written by the raster study (without the
    order fields, as before they existed), the dense run finished, the gate rows given."""
    study._check_config(RASTER, out)
    meta = json.load(open(os.path.join(out, "study.json")))
    for f in study.ORDER_FIELDS:
        del meta["config"]["preset"]["model"][f]
    train.write_json(os.path.join(out, "study.json"), meta)
    train.write_json(os.path.join(out, "stage0", "dense", "done.json"), {"steps": 2})
    train.write_json(os.path.join(out, "stage0", "gate.json"), gate_rows)


def test_stage0_folder_goes_on_in_tile_order_and_its_gate_is_probed_again(tmp_path):
    pytest.importorskip("skimage")
    out = str(tmp_path / "run")
    raster_row = dict(study.probe_kept_mass(_perturbed(RASTER.preset), RASTER, RASTER.preset), phase="dense",
                      step=2)
    _stage0_folder(out, [raster_row])
    assert study.gate_status(RASTER, out)["mean_oracle"] == raster_row["mean_oracle"][0]
    assert study.gate_status(SMOKE, out)["mean_oracle"] is None  # no row in tile order yet
    study._check_config(SMOKE, out)  # stage 0 alone: accepted, study.json now holds the tile order
    assert json.load(open(os.path.join(out, "study.json")))["config"]["preset"]["model"]["token_order"] == "tiles"
    dense = _perturbed(SMOKE.preset)
    assert study.reprobe_gate(SMOKE, out, dense)
    assert not study.reprobe_gate(SMOKE, out, dense)  # the latest row is in tile order now
    rows = json.load(open(os.path.join(out, "stage0", "gate.json")))
    assert [(r["phase"], r["step"], r.get("token_order")) for r in rows] == [
        ("dense", 2, None), ("dense", 2, "tiles 2x4x4")]
    assert rows[1]["reprobed_from"] == "raster"
    gate = study.gate_status(SMOKE, out)
    assert gate["mean_oracle"] == rows[1]["mean_oracle"][0] != raster_row["mean_oracle"][0]
    assert gate["token_order"] == "tiles 2x4x4"
    from experiments import study_report

    text = study_report.gate_section(SMOKE, out)
    assert "| dense | 2 | raster |" in text and "| dense | 2 | tiles 2x4x4 (re-probed) |" in text


def test_config_check_refuses_an_order_change_after_stage_0_and_other_changes(tmp_path):
    out = str(tmp_path / "run")
    _stage0_folder(out, [])
    os.makedirs(os.path.join(out, "stage1", "router-95-block"))
    with pytest.raises(ValueError, match="stage1 made in raster token order"):
        study._check_config(SMOKE, out)
    study._check_config(RASTER, out)  # the same order: accepted
    with pytest.raises(ValueError, match="different configuration"):
        study._check_config(study.override(RASTER, "preset.model.qk_norm_init=2.0"), out)
