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
