"""Wan2.1 transformer (experiments/wan/model.py): RoPE layout, every attention mode, SLA2 == dense at full
top-k with alpha = 1, scanned forward == layer loop, config errors. Tiny shapes, CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.wan.loading import load_wan_state_dict, wan_state_dict
from experiments.wan.model import (WanConfig, WanModel, apply_rope, forward_stacked, rope_angles, rope_split,
                                   stack_blocks, wan_1_3b, wan_14b, latent_tokens)

# head_dim 64, ragged token count: latent (3, 8, 12) -> grid (3, 4, 6) = 72 tokens = 4.5 blocks of 16.
TINY = WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, freq_dim=32, text_len=8,
                 dtype=jnp.float32, param_dtype=jnp.float32)
LATENT = (3, 8, 12)


def _normal_flat(key, shape):
    """jax.random.normal(key, shape) float32, drawn flat and reshaped: the same values, but XLA CPU compiles a 5-D
    draw of these shapes in 2-9 s and a flat one in 0.2 s."""
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape)


def _inputs(cfg=TINY, batch=1, seed=0):
    kx, kc = jax.random.split(jax.random.key(seed))
    x = _normal_flat(kx, (batch, cfg.in_dim, *LATENT))
    context = jax.random.normal(kc, (batch, 5, cfg.text_dim), jnp.float32)
    t = jnp.linspace(100.0, 900.0, batch)
    return x, t, context


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, t, context):
    return nnx.merge(graphdef, state)(x, t, context)


def forward(model, x, t, context):
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, x, t, context)


def _sla_config(**kw):
    sla = pytest.importorskip("sla2_jax")
    base = dict(block_q=16, block_k=16, topk_ratio=0.4, alpha="head", backend="xla")
    base.update(kw)
    return sla.SLA2Config(**base)


def test_published_shapes():
    assert (wan_1_3b().dim, wan_1_3b().num_layers, wan_1_3b().num_heads, wan_1_3b().head_dim) == (1536, 30, 12, 128)
    assert (wan_14b().dim, wan_14b().num_layers, wan_14b().num_heads, wan_14b().ffn_dim) == (5120, 40, 40, 13824)
    assert latent_tokens(wan_1_3b(), (21, 60, 104)) == 32760
    assert rope_split(128) == (22, 21, 21)


def test_rope_matches_wan_complex_formula():
    """Transcription of the reference: per axis freqs theta^(-2j/d_axis) with d_axis = (d - 4(d//6), 2(d//6),
    2(d//6)), x viewed as complex pairs (x[2j], x[2j+1]) and multiplied by exp(i * pos * freq)."""
    d, grid = 64, (3, 4, 5)
    x = np.random.default_rng(0).standard_normal((1, int(np.prod(grid)), 2, d))
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    tables = [np.outer(np.arange(16), 1.0 / 10000.0 ** (np.arange(0, n, 2) / n)) for n in dims]
    f, h, w = grid
    ang = np.concatenate([
        np.broadcast_to(tables[0][:f, None, None], (f, h, w, tables[0].shape[1])),
        np.broadcast_to(tables[1][None, :h, None], (f, h, w, tables[1].shape[1])),
        np.broadcast_to(tables[2][None, None, :w], (f, h, w, tables[2].shape[1])),
    ], axis=-1).reshape(-1, 1, d // 2)
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = xc * np.exp(1j * ang)[None]
    expected = np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)
    got = apply_rope(jnp.asarray(x, jnp.float32), rope_angles(grid, d))
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=1e-4)


MODES = [
    ("dense", {}),
    ("sla", dict(alpha="head")),
    ("sla2", dict(alpha="head")),
    ("sla2", dict(alpha="block", quant="int8")),
]


@pytest.mark.parametrize("attention,kw", MODES, ids=["dense", "sla", "sla2", "sla2-block-int8"])
def test_forward_each_attention_mode(attention, kw):
    cfg = TINY.replace(attention=attention, seq_len=latent_tokens(TINY, LATENT),
                       sla_config=None if attention == "dense" else _sla_config(**kw))
    model = WanModel(cfg, rngs=nnx.Rngs(0))
    x, t, context = _inputs(batch=2)
    out = forward(model, x, t, context)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # the output depends on the input video, and the two batch rows are different
    out2 = forward(model, x * 0.5, t, context)
    assert float(jnp.max(jnp.abs(out - out2))) > 1e-3
    assert float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-3


def _set_alpha_logits(model, value):
    found = 0
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and path[-1] == "alpha_logit":
            node.set_value(jnp.full(node.get_value().shape, value, node.get_value().dtype))
            found += 1
    return found


def test_sla2_full_topk_alpha_one_equals_dense():
    dense = WanModel(TINY, rngs=nnx.Rngs(0))
    sla2 = WanModel(TINY.replace(attention="sla2", sla_config=_sla_config(topk_ratio=1.0, alpha="head")),
                    rngs=nnx.Rngs(1))
    x, t, context = _inputs()
    before = forward(sla2, x, t, context)
    load_wan_state_dict(sla2, wan_state_dict(dense, include_extra=False))
    assert _set_alpha_logits(sla2, 30.0) == TINY.num_layers
    want = forward(dense, x, t, context)
    got = forward(sla2, x, t, context)
    assert float(jnp.max(jnp.abs(before - want))) > 1e-2   # the copy of the weights mattered
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4, rtol=2e-4)


def test_scanned_forward_matches_layer_loop():
    model = WanModel(TINY, rngs=nnx.Rngs(0))
    x, t, context = _inputs()
    graphdef, stacked = stack_blocks(model)
    assert stacked["modulation"].shape == (TINY.num_layers, 1, 6, TINY.dim)
    got = jax.jit(lambda s: forward_stacked(model, graphdef, s, x, t, context))(stacked)
    np.testing.assert_allclose(np.asarray(got), np.asarray(forward(model, x, t, context)), atol=1e-5, rtol=1e-5)


def test_bad_inputs_and_configs():
    with pytest.raises(ValueError, match="attention"):
        TINY.replace(attention="flash")
    with pytest.raises(ValueError, match="sla_config"):
        TINY.replace(attention="sla2")
    with pytest.raises(ValueError, match="num_heads"):
        TINY.replace(num_heads=3)
    model = WanModel(TINY.replace(num_layers=0), rngs=nnx.Rngs(0))
    x, t, context = _inputs()
    with pytest.raises(ValueError, match="patch_size"):
        model(x[:, :, :, :7], t, context)
    with pytest.raises(ValueError, match="text_len"):
        model(x, t, jnp.zeros((1, TINY.text_len + 1, TINY.text_dim)))
    with pytest.raises(ValueError, match="context"):
        model(x, t, jnp.zeros((1, 4, TINY.text_dim + 1)))
