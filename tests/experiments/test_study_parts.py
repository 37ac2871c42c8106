"""Parts of the study on known cases: the least-squares Proj of SLA recovers a planted Proj, the oracle core
equals dense attention when every key block is kept, the packed checkpoint round-trips."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sla2_jax as sla
from experiments import study, train
from experiments.configs import DataConfig, ModelConfig, RunSpec, get_study
from experiments.dit import attention_spec

SMOKE = get_study("study-cpu-smoke")
PRESET = dataclasses.replace(SMOKE.preset, backend="xla")


def _qkv(seed, n=64, heads=2, dim=16, batch=1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(kk, (batch, n, heads, dim), jnp.float32) * 1.5 for kk in ks]


def test_fit_sla_proj_recovers_a_planted_proj():
    run = RunSpec("sla-fit", "sla", 0.75)
    preset = dataclasses.replace(PRESET, block_q=16, block_k=16)
    cfg = dataclasses.replace(attention_spec(preset, dataclasses.replace(run, attention="sparse")).config,
                              quant="none")
    from sla2_jax.functional import sparse_linear_outputs

    rng = np.random.default_rng(0)
    planted = [(rng.normal(size=(16, 16)).astype(np.float32) * 0.3, rng.normal(size=16).astype(np.float32) * 0.1)
               for _ in range(2)]
    captured = {n: [[], []] for n in "qkvo"}
    for s in range(4):
        for layer, (p, b) in enumerate(planted):
            q, k, v = _qkv(10 * s + layer)
            o_s, o_l, _ = sparse_linear_outputs(q, k, v, cfg)
            for n, x in zip("qkvo", (q, k, v, o_s + jnp.einsum("bnhd,de->bnhe", o_l, p) + b)):
                captured[n][layer].append(x)
    captured = {n: [jnp.concatenate(x) for x in layers] for n, layers in captured.items()}
    fit = study.fit_sla_proj(preset, run, captured)
    for (p, b), (fp, fb) in zip(planted, fit):
        np.testing.assert_allclose(fp, p, atol=2e-2)
        np.testing.assert_allclose(fb, b, atol=2e-2)


def test_oracle_core_is_dense_attention_when_every_block_is_kept():
    q, k, v = _qkv(1, n=100)
    full = study.OracleAttention(sla.SLA2Config(block_q=16, block_k=16, topk_ratio=1.0, backend="xla"))
    np.testing.assert_allclose(full(q, k, v), sla.dense_attention(q, k, v), atol=2e-5)
    # At 75% the oracle's alpha is the exact kept mass: alpha * O_s is the selected part of P V.
    part = study.OracleAttention(sla.SLA2Config(block_q=16, block_k=16, topk_ratio=0.25, backend="xla"))
    err = float(jnp.linalg.norm(part(q, k, v) - sla.dense_attention(q, k, v)) / jnp.linalg.norm(
        sla.dense_attention(q, k, v)))
    assert 0 < err < 1


def test_packed_checkpoint_round_trips(tmp_path):
    smoke = dataclasses.replace(
        SMOKE,
        preset=dataclasses.replace(
            PRESET,
            data=DataConfig(frames=2, height=8, width=8, max_shapes=1),
            model=ModelConfig(patch=(1, 2, 2), dim=16, depth=1, num_heads=2),
            stage0_short=None,
            stage0=dataclasses.replace(PRESET.stage0, steps=3, ckpt_every=1, batch_size=2),
        ),
    )
    out = str(tmp_path / "a")
    run_dir = f"{out}/stage0/dense"
    train.train_diffusion(run_dir, smoke.preset, RunSpec("dense", "dense"), smoke.preset.stage0, stop_after=1)
    data = study._pack_checkpoint(smoke, out, run_dir)
    other = str(tmp_path / "b")
    study._unpack_checkpoint(smoke, other, f"{other}/stage0/dense", data)
    model_a, opt_a = study._training_objects(smoke, out, run_dir)
    model_b, opt_b = study._training_objects(smoke, other, f"{other}/stage0/dense")
    train.restore_checkpoint(train._manager(run_dir), 1, model_a, opt_a)
    train.restore_checkpoint(train._manager(f"{other}/stage0/dense"), 1, model_b, opt_b)
    pa, pb = (nnx.state(m, nnx.Param).to_pure_dict() for m in (model_a, model_b))
    jax.tree.map(np.testing.assert_array_equal, pa, pb)  # parameters exact
    oa, ob = (nnx.state(o).to_pure_dict() for o in (opt_a, opt_b))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-12), oa, ob)  # moments in bf16
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(ob))
    with pytest.raises(ValueError, match="not a training run"):
        study._training_objects(smoke, out, f"{out}/eval")
    with pytest.raises(ValueError, match="not a router run"):
        study._training_objects(smoke, out, f"{out}/stage1/router-42-block")
    routers, _ = study._training_objects(smoke, out, f"{out}/stage1/router-95-block")  # the routers travel too
    assert isinstance(routers, train.RouterSet)


def test_override_of_nested_fields():
    s = study.override(SMOKE, "preset.model.qk_norm_init=2.5")
    assert s.preset.model.qk_norm_init == 2.5 and SMOKE.preset.model.qk_norm_init == 1.0
    s = study.override(s, "curve_sparsities=[0.9, 0.95]")
    assert s.curve_sparsities == (0.9, 0.95)
    assert study.override(s, "preset.backend=xla").preset.backend == "xla"
    with pytest.raises(ValueError, match="no field"):
        study.override(SMOKE, "preset.model.width=3")
    with pytest.raises(ValueError, match="gate_sparsity"):
        study.override(SMOKE, "curve_sparsities=[0.9]")


def test_qk_norm_init_sets_the_gains():
    from experiments.dit import make_model

    preset = dataclasses.replace(PRESET, model=dataclasses.replace(PRESET.model, qk_norm_init=2.0))
    model = make_model(preset, RunSpec("dense", "dense"))
    np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.q_norm.scale[...]), 2.0)
    np.testing.assert_array_equal(np.asarray(model.blocks[1].attn.k_norm.scale[...]), 2.0)


def test_import_refuses_parts_of_another_export(tmp_path):
    src = tmp_path / "out"
    (src / "eval").mkdir(parents=True)
    (src / "eval" / "x.json").write_text("{}")
    state = tmp_path / "state"
    study.export_state(SMOKE, str(src), str(state))
    study.import_state(SMOKE, str(tmp_path / "copy"), str(state))
    assert (tmp_path / "copy" / "eval" / "x.json").read_text() == "{}"
    with open(state / "study_state.tar.000", "ab") as f:  # a stale or foreign part
        f.write(b"x")
    with pytest.raises(ValueError, match="do not match"):
        study.import_state(SMOKE, str(tmp_path / "other"), str(state))
