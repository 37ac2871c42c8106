"""The Wan2.1 port against diffusers (PyTorch), an implementation written elsewhere: transformer, schedulers and
the whole guided sampling loop, from fixtures that diffusers produced. CPU, float32.

The fixtures in tests/experiments/fixtures/wan/ come from diffusers, never from this project's code (info.json
there holds the diffusers and torch versions). Regenerate them where torch and diffusers are installed, outside
this project's environment:

    python3 -m venv /tmp/venv-torch
    /tmp/venv-torch/bin/pip install torch==2.13.0 diffusers safetensors transformers numpy
    /tmp/venv-torch/bin/python experiments/wan/make_parity_fixtures.py --out tests/experiments/fixtures/wan

Relative error here is max|ours - diffusers| / max|diffusers| over the whole output.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.wan.loading import load_diffusers_transformer, open_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "wan")
MODEL_DIR = os.path.join(FIXTURES, "tiny_diffusers")
TEXT_LEN = 16


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, context):
    return nnx.merge(graphdef, state)(x, t, context)


def _run(model, x, t, context):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context)))


def _load(**overrides):
    model, report = load_diffusers_transformer(MODEL_DIR, text_len=TEXT_LEN, dtype=jnp.float32,
                                               param_dtype=jnp.float32, **overrides)
    return model, report


def test_fixture_comes_from_diffusers_in_its_sharded_layout():
    with open(os.path.join(FIXTURES, "info.json")) as f:
        info = json.load(f)
    assert info["diffusers"] and info["torch"]
    transformer = os.path.join(MODEL_DIR, "transformer")
    shards = sorted(f for f in os.listdir(transformer) if f.endswith(".safetensors"))
    assert len(shards) > 1 and all(s.startswith("diffusion_pytorch_model-") for s in shards)
    names = set(open_checkpoint(MODEL_DIR))
    assert "condition_embedder.time_proj.weight" in names and "blocks.1.attn2.to_out.0.weight" in names


def test_transformer_matches_diffusers_dense():
    io = np.load(os.path.join(FIXTURES, "transformer_io.npz"))
    model, report = _load()
    assert report.layout == "diffusers" and not report.kept_at_init
    got = _run(model, io["x"], io["t"], io["context"])
    assert got.shape == io["out"].shape
    assert _rel_err(got, io["out"]) <= 1e-4
    # the comparison can fail: one square weight loaded transposed (the classic mistake) moves the output
    # far beyond the tolerance
    kernel = model.blocks[0].self_attn.o.kernel
    kernel.set_value(kernel[...].T)
    assert _rel_err(_run(model, io["x"], io["t"], io["context"]), io["out"]) > 1e-3


def test_transformer_matches_diffusers_sla2_full_topk_alpha_one():
    """SLA2 at topk_ratio 1 selects every key block (nothing is left for the linear branch); with alpha = 1
    (alpha_logit 30: sigmoid is 1 in float32) its output is the sparse branch = exact softmax attention."""
    sla = pytest.importorskip("sla2_jax")
    io = np.load(os.path.join(FIXTURES, "transformer_io.npz"))
    config = sla.SLA2Config(block_q=16, block_k=16, topk_ratio=1.0, alpha="head", backend="xla")
    model, report = _load(attention="sla2", sla_config=config)
    assert report.kept_at_init and all(".self_attn.attn." in name for name in report.kept_at_init)
    logits = [node for path, node in nnx.iter_graph(model)
              if isinstance(node, nnx.Param) and path[-1] == "alpha_logit"]
    assert len(logits) == 2
    for node in logits:
        node.set_value(jnp.full(node[...].shape, 30.0, node[...].dtype))
    # 72 tokens = 4.5 blocks of 16: the ragged last block is part of the check
    got = _run(model, io["x"], io["t"], io["context"])
    assert _rel_err(got, io["out"]) <= 1e-4


# --------------------------------------------------------------------------------------------------
# Schedulers and the guided sampling loop
# --------------------------------------------------------------------------------------------------
SCHEDULERS = [(name, shift) for shift in (3.0, 5.0) for name in ("euler", "unipc")]


@pytest.mark.parametrize("name,shift", SCHEDULERS, ids=[f"{n}-shift{s:g}" for n, s in SCHEDULERS])
def test_schedule_and_updates_match_diffusers(name, shift):
    """Same timesteps and sigmas as diffusers' FlowMatchEulerDiscreteScheduler / UniPCMultistepScheduler (Wan's
    settings) for 8 and 50 steps, and the same samples after each of 8 steps on random model outputs (UniPC's
    corrector and second-order predictor carry state from step to step, so every step is compared)."""
    from experiments.wan.sampling import Euler, UniPC, euler_schedule, unipc_schedule

    fx = np.load(os.path.join(FIXTURES, "schedulers.npz"))
    key = f"{name}_s{shift:g}"
    make_schedule = euler_schedule if name == "euler" else unipc_schedule
    for steps in (8, 50):
        schedule = make_schedule(steps, shift)
        np.testing.assert_allclose(schedule.timesteps, fx[f"{key}_n{steps}_timesteps"], rtol=1e-6, atol=0)
        np.testing.assert_allclose(schedule.sigmas, fx[f"{key}_n{steps}_sigmas"], rtol=1e-6, atol=0)
    solver = (Euler if name == "euler" else UniPC)(8, shift)
    step = jax.jit(solver.step)
    x = jnp.asarray(fx[f"{key}_x0"])
    state = solver.init(x)
    for i in range(8):
        x, state = step(state, jnp.int32(i), jnp.asarray(fx[f"{key}_outputs"][i]), x)
        assert _rel_err(x, fx[f"{key}_chain"][i]) <= 1e-5, f"step {i}"


def test_unipc_is_not_euler():
    """The UniPC chain differs from an Euler chain on the same schedule by far more than the tolerance above
    (so the comparison with diffusers' UniPC would notice a plain Euler update)."""
    from experiments.wan.sampling import UniPC

    fx = np.load(os.path.join(FIXTURES, "schedulers.npz"))
    solver = UniPC(8, 3.0)
    sigmas = solver.schedule.sigmas
    euler = fx["unipc_s3_x0"]
    for i in range(8):
        euler = euler + (sigmas[i + 1] - sigmas[i]) * fx["unipc_s3_outputs"][i]
    assert _rel_err(euler, fx["unipc_s3_chain"][-1]) > 1e-2


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_guided_sampling_matches_diffusers_pipeline(solver):
    """Our sampler with the tiny transformer against diffusers' WanPipeline (output_type="latent"): 4 steps,
    guidance 5.0 (two transformer calls per step), shift 3.0, same start latents and text embeddings."""
    from experiments.wan.sampling import sample

    fx = np.load(os.path.join(FIXTURES, "pipeline.npz"))
    model, _ = _load()
    graphdef, state = nnx.split(model)

    def velocity(params, x, t, context):
        return nnx.merge(graphdef, params)(x, t, context)

    calls = []
    times = []
    got = sample(lambda p, x, t, c: calls.append(t) or velocity(p, x, t, c), state, jnp.asarray(fx["latents_in"]),
                 jnp.asarray(fx["prompt_embeds"]), jnp.asarray(fx["negative_prompt_embeds"]), solver=solver,
                 num_steps=4, shift=3.0, guidance_scale=5.0, step_times=times)
    assert len(calls) == 2 and len(times) == 4     # traced once: cond and uncond calls in one compiled step
    assert _rel_err(got, fx[f"{solver}_latents_out"]) <= 1e-4
    # without guidance the result is different: the comparison sees the guidance
    plain = sample(velocity, state, jnp.asarray(fx["latents_in"]), jnp.asarray(fx["prompt_embeds"]), None,
                   solver=solver, num_steps=4, shift=3.0, guidance_scale=1.0)
    assert _rel_err(plain, fx[f"{solver}_latents_out"]) > 1e-2
