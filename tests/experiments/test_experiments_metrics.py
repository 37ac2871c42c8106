"""Recipe diagnostics against numpy: block-level dense attention mass, oracle and router kept mass, the
least-squares alpha of stage 1's initialisation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import evaluate, train
from experiments.configs import DataConfig, ModelConfig, RunSpec, get_preset
from experiments.dit import make_model

SEED = int(np.random.SeedSequence().entropy % 2**31)  # fresh inputs every run


def _qk(seed, n, heads, dim):
    kq, kk = jax.random.split(jax.random.PRNGKey(seed))
    q = 2.0 * jax.random.normal(kq, (1, n, heads, dim), jnp.float32)
    return q, 2.0 * jax.random.normal(kk, (1, n, heads, dim), jnp.float32)


def _block_mass_numpy(q, k, block_q, block_k):
    q, k = np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0]  # (N, H, D)
    n, heads, dim = q.shape
    out = np.zeros((heads, n // block_q, n // block_k))
    for h in range(heads):
        s = q[:, h] @ k[:, h].T / np.sqrt(dim)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[h] = p.reshape(n // block_q, block_q, n // block_k, block_k).sum(3).mean(1)
    return out


@pytest.mark.parametrize("dim", [64, 128])
def test_block_attention_mass_and_oracle_match_numpy(dim):
    q, k = _qk(SEED + dim, 128, 2, dim)
    got = np.asarray(evaluate.block_attention_mass(q, k, block_q=32, block_k=16))[0]
    want = _block_mass_numpy(q, k, 32, 16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)
    # Oracle at 75% of 8 key blocks: the best 2 blocks of every query block.
    oracle = np.sort(want, -1)[..., -2:].sum(-1).mean()
    assert evaluate.oracle_kept_mass(jnp.asarray(got)[None], 0.75) == pytest.approx(oracle, rel=1e-4)


def test_optimal_alpha_sums_is_the_least_squares_fit():
    rng = np.random.default_rng(SEED)
    o_s, o_l = rng.normal(size=(2, 1, 80, 2, 16))  # N = 80: ragged last block of 32
    o = 0.3 * o_s + 0.7 * o_l + 0.1 * rng.normal(size=o_s.shape)
    num, den = (np.asarray(x) for x in train.optimal_alpha_sums(*(jnp.asarray(x) for x in (o_s, o_l, o)), 32))
    assert num.shape == den.shape == (2, 3)
    for h in range(2):
        for i in range(3):
            rows = slice(32 * i, min(32 * (i + 1), 80))
            a = (o_s - o_l)[0, rows, h].reshape(-1, 1)
            b = (o - o_l)[0, rows, h].reshape(-1)
            np.testing.assert_allclose(num[h, i] / den[h, i], np.linalg.lstsq(a, b, rcond=None)[0][0], rtol=1e-4)


def test_alpha_init_lowers_stage1_error_and_router_mass_is_below_oracle():
    preset = dataclasses.replace(
        get_preset("cpu-smoke"),
        data=DataConfig(frames=2, height=16, width=16),
        model=ModelConfig(patch=(1, 2, 2), dim=128, depth=1, num_heads=2),
        block_q=32,
        block_k=16,
        backend="xla",
    )
    run = RunSpec("sla2-75", "sla2", 0.75)
    q, k = _qk(SEED, preset.num_tokens, 2, 64)
    v = jax.random.normal(jax.random.PRNGKey(SEED + 1), q.shape)
    o = jax.nn.dot_product_attention(q, k, v)
    captured = {"q": [q], "k": [k], "v": [v], "o": [o]}
    routers = train.RouterSet(preset, run)
    layer = routers.layers[0]
    error = nnx.jit(lambda layer: train.relative_mse(layer(q, k, v), o))
    before = float(error(layer))  # alpha = 0.5
    means = train.init_alpha_least_squares(routers, captured)
    after = float(error(layer))
    assert len(means) == 1 and 0.02 <= means[0] <= 0.98
    assert after <= before + 1e-7

    model = make_model(preset, run)
    heldout = evaluate.add_block_mass(captured, preset.block_q, preset.block_k)
    kept = evaluate.kept_mass(model, heldout)
    assert len(kept) == 1 and 0.0 < kept[0] <= evaluate.oracle_kept_mass(heldout["block_mass"][0], 0.75) + 1e-6
