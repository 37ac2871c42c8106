"""Router: pooling with ragged blocks, smoothing, hard and soft top-k (with its implicit gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import random_qkv


def test_pool_blocks_ragged_last_block(seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 70, 3, 16))
    pooled = sla.pool_blocks(x, 32)  # blocks of 32, 32, 6 rows
    assert pooled.shape == (2, 3, 3, 16)
    np.testing.assert_allclose(pooled[:, :, 2], jnp.moveaxis(x[:, 64:].mean(axis=1), 1, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[:, :, 0], x[:, :32].mean(axis=1), rtol=1e-5, atol=1e-6)


def test_block_scores_match_pooled_product_and_identity_weights(seed):
    q, k, _ = random_qkv(seed, (1, 150, 2, 32))
    s = sla.block_scores(q, k, block_q=32, block_k=16)
    ks = k - k.mean(axis=1, keepdims=True)
    expect = jnp.einsum("bhid,bhjd->bhij", sla.pool_blocks(q, 32), sla.pool_blocks(ks, 16)) / np.sqrt(32)
    np.testing.assert_allclose(s, expect, rtol=1e-4, atol=1e-5)
    eye = jnp.eye(32)
    np.testing.assert_allclose(sla.block_scores(q, k, block_q=32, block_k=16, w_q=eye, w_k=eye), s, rtol=1e-5, atol=1e-6)
    w = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 32, 32))
    s_w = sla.block_scores(q, k, block_q=32, block_k=16, w_q=w, w_k=w)
    assert not np.allclose(s_w, s)


def test_topk_blocks_ascending_and_correct(seed):
    scores = jax.random.normal(jax.random.PRNGKey(seed), (2, 3, 5, 11))
    lut = sla.topk_blocks(scores, 4)
    assert lut.shape == (2, 3, 5, 4) and lut.dtype == jnp.int32
    assert bool(jnp.all(jnp.diff(lut, axis=-1) > 0))
    expect = np.sort(np.argsort(-np.asarray(scores), axis=-1)[..., :4], axis=-1)
    np.testing.assert_array_equal(lut, expect)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_soft_topk_rows_sum_to_k_and_track_hard_topk(seed, k):
    scores = 3 * jax.random.normal(jax.random.PRNGKey(seed), (2, 4, 12))
    m = sla.soft_topk(scores, k, 0.1)
    np.testing.assert_allclose(m.sum(-1), k, rtol=1e-4)
    assert bool(jnp.all((m >= 0) & (m <= 1)))
    hard = sla.selection_mask(sla.topk_blocks(scores[None], k), 12)[0]
    assert float(jnp.mean(jnp.abs(m - hard))) < 0.1


def test_soft_topk_gradient_matches_finite_differences(seed):
    scores = jax.random.normal(jax.random.PRNGKey(seed), (3, 9))
    weights = jax.random.normal(jax.random.PRNGKey(seed + 1), (3, 9))
    tau, k = 0.5, 3

    @jax.jit
    def loss(s):
        return jnp.sum(sla.soft_topk(s, k, tau) * weights)

    grad = jax.grad(loss)(scores)
    eps = 1e-2
    fd = np.zeros(scores.shape)
    for idx in np.ndindex(*scores.shape):
        d = jnp.zeros(scores.shape).at[idx].set(eps)
        fd[idx] = (loss(scores + d) - loss(scores - d)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-3)
    # the row sums are constant (= k), so their gradient is zero
    g_sum = jax.grad(lambda s: jnp.sum(sla.soft_topk(s, k, tau)))(scores)
    np.testing.assert_allclose(g_sum, 0.0, atol=1e-5)


def test_captured_mass_is_one_when_all_selected(seed):
    q, k, _ = random_qkv(seed, (1, 100, 2, 32))
    s = sla.block_scores(q, k, block_q=32, block_k=16)
    full = jnp.ones_like(s)
    np.testing.assert_allclose(sla.captured_mass(s, full, 100, 16), 1.0, rtol=1e-5)
    half = sla.selection_mask(sla.topk_blocks(s, 3), s.shape[-1])
    m = sla.captured_mass(s, half, 100, 16)
    assert bool(jnp.all((m > 0) & (m < 1)))
