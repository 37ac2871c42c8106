"""Video DiT: shapes in every attention mode, adaLN-zero init, capture, gradients, metrics, bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import evaluate
from experiments.configs import DataConfig, ModelConfig, RunSpec, get_preset
from experiments.dit import AttentionSpec, VideoDiT, flow_matching_loss, make_model, patchify, unpatchify

PRESET = dataclasses.replace(
    get_preset("cpu-smoke"),
    data=DataConfig(frames=2, height=16, width=16),
    model=ModelConfig(patch=(1, 2, 2), dim=128, depth=1, num_heads=2),
    block_q=32,
    block_k=16,
)
RUNS = [
    RunSpec("dense", "dense"),
    RunSpec("sla-95", "sla", 0.95),
    RunSpec("sparse-95", "sparse", 0.95),
    RunSpec("sla2-90", "sla2", 0.90, quant="int8"),
    RunSpec("sla2-97-mass", "sla2", 0.97, alpha="mass"),
]


def _normal_flat(key, shape):
    """jax.random.normal(key, shape) float32, drawn flat and reshaped: the same values, but XLA CPU compiles a 5-D
    draw of these shapes in 2-9 s and a flat one in 0.2 s."""
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape)


def _inputs(b=2):
    x = _normal_flat(jax.random.PRNGKey(0), (b, 2, 16, 16, 3))
    return x, jnp.linspace(0.1, 0.9, b), jnp.arange(b, dtype=jnp.int32)


@pytest.mark.parametrize("run", RUNS, ids=lambda r: r.name)
def test_forward_shapes_capture_and_zero_init(run):
    model = make_model(PRESET, run)
    x, t, y = _inputs()
    out, captured = nnx.jit(lambda m: m(x, t, y, capture=True))(model)  # one program, not op by op (compile-bound)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # adaLN-zero: the final projection is zero at init, so the untrained model predicts exactly 0.
    assert float(jnp.abs(out).max()) == 0.0
    assert len(captured) == 1
    q, k, v = captured[0]
    assert q.shape == k.shape == v.shape == (2, PRESET.num_tokens, 2, 64)


def test_sparse_models_train_and_differ_from_dense():
    """After perturbing the zero-init layers (output and adaLN gates), SLA2 and dense give different, finite outputs
    and gradients reach the attention projections."""
    x, t, y = _inputs()
    dense = make_model(PRESET, RUNS[0])
    sla2 = make_model(PRESET, RUNS[3])
    for m in (dense, sla2):
        for i, lin in enumerate([m.final, m.blocks[0].ada]):
            lin.kernel[...] = jax.random.normal(jax.random.PRNGKey(i), lin.kernel[...].shape) * 0.1
    o_d = nnx.jit(lambda m: m(x, t, y))(dense)
    (_, o_s), grads = nnx.jit(
        nnx.value_and_grad(lambda m: (flow_matching_loss(m, x, y, t, jnp.ones_like(x)), m(x, t, y)), has_aux=True)
    )(sla2)
    assert 0 < float(jnp.abs(o_d - o_s).max()) and bool(jnp.all(jnp.isfinite(o_s)))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["blocks"][0]["attn"]["qkv"]["kernel"][...]).sum()) > 0


def test_patchify_roundtrip_and_token_order():
    v = _normal_flat(jax.random.PRNGKey(0), (2, 4, 8, 8, 3))
    tok = patchify(v, (2, 2, 2))
    assert tok.shape == (2, 2 * 4 * 4, 24)
    np.testing.assert_array_equal(np.asarray(unpatchify(tok, (2, 2, 2), (4, 8, 8, 3))), np.asarray(v))
    # Raster order (t, h, w): token 1 is the patch right of token 0.
    np.testing.assert_array_equal(np.asarray(tok[0, 1, :3]), np.asarray(v[0, 0, 0, 2]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="attention kind"):
        AttentionSpec("flash")
    with pytest.raises(ValueError, match="SLA2Config"):
        AttentionSpec("sla2")
    with pytest.raises(ValueError, match="divisible by patch"):
        VideoDiT(ModelConfig(patch=(1, 3, 3)), DataConfig(frames=2, height=16, width=16), rngs=nnx.Rngs(0))
    model = make_model(PRESET, RUNS[0])
    with pytest.raises(ValueError, match="expected"):
        model(jnp.zeros((1, 3, 16, 16, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="not in preset"):
        PRESET.run("sla2-99")


def _ssim_numpy(x, y, data_range=2.0):
    """Independent SSIM: explicit 2D Gaussian window loops (valid positions), mean over everything."""
    x, y = np.asarray(x, np.float64) / data_range, np.asarray(y, np.float64) / data_range
    size, sigma = 11, 1.5
    g = np.exp(-0.5 * ((np.arange(size) - 5) / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    H, W = x.shape
    vals = []
    for i in range(H - size + 1):
        for j in range(W - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2
            cov = (w * a * b).sum() - ma * mb
            vals.append(((2 * ma * mb + 1e-4) * (2 * cov + 9e-4)) / ((ma**2 + mb**2 + 1e-4) * (va + vb + 9e-4)))
    return np.mean(vals)


def test_psnr_and_ssim():
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 1, 16, 16, 1), minval=-1, maxval=1)
    y = jnp.clip(x + 0.2 * jax.random.normal(jax.random.PRNGKey(1), x.shape), -1, 1)
    np.testing.assert_allclose(float(evaluate.psnr(x, x + 0.1)[0]), 10 * np.log10(4 / 0.01), rtol=1e-4)
    np.testing.assert_allclose(float(evaluate.ssim(x, x)[0]), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        float(evaluate.ssim(x, y)[0]), _ssim_numpy(x[0, 0, :, :, 0], y[0, 0, :, :, 0]), rtol=1e-4
    )
    assert float(evaluate.ssim(x, y)[0]) < 0.9
    assert float(evaluate.relative_l2(2 * x, x)[0]) == pytest.approx(1.0, rel=1e-5)
