"""The Pallas front end (interpret mode on CPU) with non-finite rows: a row with a NaN / Inf entry is left out of
its block's mean (as ``sla2_jax.pool_blocks``) and its int8 block's amax (as ``sla2_jax.quant.int8_block_scales``);
phi stays row-wise; the backward spreads each mean's cotangent over the finite rows only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import random_qkv
from pallas_kernels.front_end import block_means_and_phi, block_means_phi_int8_queries
from sla2_jax.feature_maps import feature_map, softmax_phi
from sla2_jax.quant import int8_block_scales

BLOCK = 32
BAD_ROWS = (5, 40, 41)  # block 0 and block 1 (two rows); block 2 (rows 64..89, ragged) and 3 stay finite


def _with_bad_rows(x):
    x = x.at[0, 5, 1, 3].set(jnp.nan)
    x = x.at[0, 40, 0, 0].set(jnp.inf)
    return x.at[0, 41, 0, :].set(jnp.nan)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_means_leave_out_non_finite_rows_and_phi_stays_row_wise(seed, dtype):
    x = _with_bad_rows(random_qkv(seed, (1, 3 * BLOCK - 6, 2, 32), dtype)[0])
    phi, means = block_means_and_phi(x, BLOCK, softmax_phi)
    assert np.isfinite(np.asarray(means)).all()
    np.testing.assert_allclose(means, sla.pool_blocks(x, BLOCK), rtol=1e-5, atol=1e-6)
    finite_rows = np.isfinite(np.asarray(x, np.float32)).all(axis=-1)  # (B, N, H)
    phi_finite = np.isfinite(np.asarray(phi, np.float32)).all(axis=-1)
    np.testing.assert_array_equal(phi_finite, finite_rows)
    # the finite rows' mean by hand: block 0 of head 1 without row 5
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(means[0, 1, 0], np.delete(x64[0, :BLOCK, 1], 5, axis=0).mean(axis=0), rtol=1e-5,
                               atol=1e-6)


def test_a_block_with_no_finite_row_has_mean_zero():
    x = random_qkv(0, (1, 2 * BLOCK, 1, 32))[0].at[0, :BLOCK].set(jnp.nan)
    _, means = block_means_and_phi(x, BLOCK, softmax_phi)
    np.testing.assert_array_equal(means[0, 0, 0], 0.0)
    np.testing.assert_allclose(means[0, 0, 1], np.asarray(x[0, BLOCK:, 0]).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_backward_spreads_the_mean_cotangent_over_finite_rows_as_xla(seed):
    x = _with_bad_rows(random_qkv(seed, (1, 3 * BLOCK - 6, 2, 32))[0])
    finite = jnp.all(jnp.isfinite(x), axis=-1, keepdims=True)
    g_phi = jnp.where(finite, jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), 0.0)
    g_mean = jax.random.normal(jax.random.PRNGKey(seed + 2), (1, 2, 3, 32))

    def loss(x, fn):
        phi, means = fn(x)
        return jnp.sum(jnp.where(finite, phi.astype(jnp.float32), 0.0) * g_phi) + jnp.sum(means * g_mean)

    kernel = jax.grad(loss)(x, lambda x: block_means_and_phi(x, BLOCK, softmax_phi))
    xla = jax.grad(loss)(x, lambda x: (feature_map(x, "softmax"), sla.pool_blocks(x, BLOCK)))
    rows = np.asarray(finite)[..., 0]
    assert np.isfinite(np.asarray(kernel)[rows]).all()
    np.testing.assert_allclose(np.asarray(kernel)[rows], np.asarray(xla)[rows], rtol=1e-5, atol=1e-6)


def test_int8_queries_keep_the_other_rows_scale_finite(seed):
    q = _with_bad_rows(random_qkv(seed, (1, 3 * BLOCK - 6, 2, 32), jnp.bfloat16)[0])
    k_mean = jnp.zeros((1, 2, 32), jnp.float32)
    _, means, queries = block_means_phi_int8_queries(q, BLOCK, softmax_phi, k_mean, 0.25)
    np.testing.assert_allclose(means, sla.pool_blocks(q, BLOCK), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(queries.scale)).all()
    np.testing.assert_allclose(queries.scale, int8_block_scales(q, BLOCK), rtol=1e-6)
    clean = q.at[0, 5, 1].set(0.0).at[0, 40, 0].set(0.0).at[0, 41, 0].set(0.0)  # bad rows as 0: same amax
    _, _, expect = block_means_phi_int8_queries(clean, BLOCK, softmax_phi, k_mean, 0.25)
    np.testing.assert_array_equal(queries.q8, expect.q8)
