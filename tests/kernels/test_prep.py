"""Pallas front end (pallas_kernels.prep, interpret mode on CPU): phi + block means from one read (gradient for
softmax), and the one-kernel top-k selection (ascending LUT with ties, captured mass and its gradient), against
XLA / numpy references; the block means alone are covered through `route` on the pallas backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import random_qkv, rel_err
from pallas_kernels import quantize
from pallas_kernels.front_end import block_means_and_phi, block_means_phi_int8, block_means_phi_int8_queries, select_blocks
from sla2_jax.feature_maps import PHI_FUNCTIONS, feature_map


def _grad(f):
    """jax.grad(f) w.r.t. the first argument (the others, functions, held fixed), jitted: one program instead of an
    op-by-op run, the same values to rounding, a fraction of the compile time."""
    return lambda x, *fixed: jax.jit(jax.grad(lambda x: f(x, *fixed)))(x)


@pytest.mark.parametrize(
    "dtype, dim, kind, block",
    [(jnp.bfloat16, 128, "softmax", 64), (jnp.float32, 64, "elu", 16), (jnp.float16, 32, "relu", 32)],
)
def test_block_means_and_phi_match_xla(seed, dtype, dim, kind, block):
    x = random_qkv(seed, (1, 3 * block - 5, 2, dim), dtype)[0]  # ragged last block
    phi, means = block_means_and_phi(x, block, PHI_FUNCTIONS[kind])
    assert phi.dtype == dtype and phi.shape == x.shape and means.shape == (1, 2, 3, dim)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(phi, np.float32), np.asarray(feature_map(x, kind), np.float32), rtol=tol, atol=tol * 1e-2
    )
    x64 = np.asarray(x, np.float64)
    pad = np.concatenate([x64, np.zeros((1, 5, 2, dim))], axis=1).reshape(1, 3, block, 2, dim)
    expect = pad.sum(axis=2) / np.array([block, block, block - 5])[None, :, None, None]
    np.testing.assert_allclose(means, np.transpose(expect, (0, 2, 1, 3)), rtol=1e-5, atol=1e-6)
    g_phi = jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape, jnp.float32)
    g_mean = jax.random.normal(jax.random.PRNGKey(seed + 2), means.shape)

    def loss(x, fn):
        phi, means = fn(x)
        return jnp.sum(phi.astype(jnp.float32) * g_phi) + jnp.sum(means * g_mean)

    # the backward kernel (sla_prep_bwd) vs the vjp of the XLA formulas; both compute in float32 and round once
    got = _grad(loss)(x, lambda x: block_means_and_phi(x, block, PHI_FUNCTIONS[kind]))
    ref = _grad(loss)(x, lambda x: (feature_map(x, kind), sla.pool_blocks(x, block)))
    assert got.dtype == dtype and rel_err(got, ref) < (1e-6 if dtype == jnp.float32 else 4e-3)
    # pass_through: X comes back as a third output; its cotangent is added to dX inside the backward kernel
    g_x = jax.random.normal(jax.random.PRNGKey(seed + 3), x.shape, jnp.float32)
    out = block_means_and_phi(x, block, PHI_FUNCTIONS[kind], pass_through=True)
    assert len(out) == 3
    np.testing.assert_array_equal(np.asarray(out[2], np.float32), np.asarray(x, np.float32))
    got = _grad(
        lambda x: (
            loss(x, lambda x: block_means_and_phi(x, block, PHI_FUNCTIONS[kind], pass_through=True)[:2])
            + jnp.sum(block_means_and_phi(x, block, PHI_FUNCTIONS[kind], pass_through=True)[2].astype(jnp.float32) * g_x)
        )
    )(x)
    ref = _grad(
        lambda x: (
            loss(x, lambda x: (feature_map(x, kind), sla.pool_blocks(x, block))) + jnp.sum(x.astype(jnp.float32) * g_x)
        )
    )(x)
    assert rel_err(got, ref) < (1e-6 if dtype == jnp.float32 else 4e-3)
    # the means alone (no feature map): d mean / (valid rows of the block) on every row
    got = _grad(lambda x: jnp.sum(block_means_and_phi(x, block)[1] * g_mean))(x)
    ref = _grad(lambda x: jnp.sum(sla.pool_blocks(x, block) * g_mean))(x)
    assert rel_err(got, ref) < (1e-6 if dtype == jnp.float32 else 4e-3)


@pytest.mark.parametrize("dtype, dim, block", [(jnp.bfloat16, 128, 32), (jnp.float32, 64, 16)])
def test_block_means_phi_int8_matches_references(seed, dtype, dim, block):
    k = random_qkv(seed, (1, 3 * block - 7, 2, dim), dtype)[1]  # ragged last block
    k = (k.astype(jnp.float32) + jax.random.normal(jax.random.PRNGKey(seed + 1), (dim,))).astype(dtype)  # a mean
    phi, means, keys = block_means_phi_int8(k, block, PHI_FUNCTIONS['softmax'])
    phi_ref, means_ref = block_means_and_phi(k, block, PHI_FUNCTIONS['softmax'])
    np.testing.assert_array_equal(np.asarray(phi, np.float32), np.asarray(phi_ref, np.float32))
    np.testing.assert_allclose(means, means_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keys.mean, np.asarray(k, np.float64).mean(axis=1), rtol=1e-5, atol=1e-6)
    k8_ref, scale_ref = sla.quantize_int8_blocks(sla.smooth_keys(k), block)
    assert keys.k8.dtype == jnp.int8 and keys.k8.shape == k.shape and keys.scale.shape == (1, 2, 3)
    np.testing.assert_array_equal(np.asarray(keys.scale), np.asarray(scale_ref))
    # the kernel divides exactly; XLA on CPU may not, so an exact tie x / scale = m + 0.5 can round one step apart
    diff = np.abs(np.asarray(keys.k8, np.int32) - np.asarray(k8_ref, np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 2e-3
    # gradients (phi, the means and the pass-through k; the int8 keys have none) vs the XLA formulas
    g_phi, g_mean, g_k = (
        jax.random.normal(jax.random.PRNGKey(seed + i), s)
        for i, s in enumerate((k.shape, means.shape, k.shape), start=2)
    )

    def loss(k, fn):
        phi, means, k_out = fn(k)
        return sum(jnp.sum(a.astype(jnp.float32) * g) for a, g in ((phi, g_phi), (means, g_mean), (k_out, g_k)))

    got = _grad(loss)(
        k, lambda k: [block_means_phi_int8(k, block, PHI_FUNCTIONS['softmax'], pass_through=True)[i] for i in (0, 1, 3)]
    )
    ref = _grad(loss)(k, lambda k: (feature_map(k, "softmax"), sla.pool_blocks(k, block), k))
    assert rel_err(got, ref) < (1e-6 if dtype == jnp.float32 else 4e-3)
    assert np.abs(np.asarray(keys.k8, np.int32)).max() == 127  # the block's amax maps to 127


@pytest.mark.parametrize("dtype, dim, block", [(jnp.bfloat16, 128, 32), (jnp.float32, 64, 16), (jnp.float16, 64, 32)])
def test_block_means_phi_int8_queries_equal_query_pass(seed, dtype, dim, block):
    """The Q front end of the low-bit path: phi(Q) and the means as block_means_and_phi; int8 Q, scales and LSE
    shift as quantize.quantize_queries (the separate Q pass it replaces) and as the XLA / float64 formulas."""
    q, k, _ = random_qkv(seed, (1, 3 * block - 7, 2, dim), dtype)  # ragged last block
    k_mean = jnp.mean(k.astype(jnp.float32), axis=1)
    phi, means, queries = block_means_phi_int8_queries(q, block, PHI_FUNCTIONS['softmax'], k_mean, 0.37)
    phi_ref, means_ref = block_means_and_phi(q, block, PHI_FUNCTIONS['softmax'])
    np.testing.assert_array_equal(np.asarray(phi, np.float32), np.asarray(phi_ref, np.float32))
    np.testing.assert_allclose(means, means_ref, rtol=1e-5, atol=1e-6)
    assert queries.q8.dtype == jnp.int8 and queries.q8.shape == q.shape
    assert queries.scale.shape == (1, 2, 3) and queries.shift.shape == (1, 2, 3 * block)
    pass_q8, pass_scale, pass_shift = quantize.quantize_queries(q, block, k_mean, 0.37, interpret=True, method="pallas")
    r8, r_scale = sla.quantize_int8_blocks(q, block)
    np.testing.assert_array_equal(np.asarray(queries.scale), np.asarray(pass_scale))
    np.testing.assert_array_equal(np.asarray(queries.scale), np.asarray(r_scale))
    # the Q pass's arithmetic; the sum over D is left to the compiler (bound, not equality)
    np.testing.assert_allclose(np.asarray(queries.shift), np.asarray(pass_shift), rtol=1e-6, atol=1e-6)
    # the kernels divide exactly; XLA on CPU may not, so an exact tie x / scale = m + 0.5 can round one step apart
    np.testing.assert_array_equal(np.asarray(queries.q8), np.asarray(pass_q8))
    diff = np.abs(np.asarray(queries.q8, np.int32) - np.asarray(r8, np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 2e-3
    assert np.abs(np.asarray(queries.q8, np.int32)).max() == 127
    ref = np.einsum("bnhd,bhd->bhn", np.asarray(q, np.float64), np.asarray(k_mean, np.float64)) * 0.37
    assert rel_err(queries.shift[:, :, : q.shape[1]], ref) < 1e-6
    assert not np.any(np.asarray(queries.shift[:, :, q.shape[1] :]))
    # gradients (phi, the means and the pass-through q; the int8 queries and the shift have none) vs XLA
    g_phi, g_mean, g_q, g_shift = (
        jax.random.normal(jax.random.PRNGKey(seed + i), s)
        for i, s in enumerate((q.shape, means.shape, q.shape, queries.shift.shape), start=2)
    )

    def loss(q, fn):
        outs = fn(q)
        return sum(jnp.sum(a.astype(jnp.float32) * g) for a, g in zip(outs, (g_phi, g_mean, g_q, g_shift)))

    def front(q):
        phi, means, queries, q_out = block_means_phi_int8_queries(q, block, PHI_FUNCTIONS['softmax'], k_mean, 0.37, pass_through=True)
        return phi, means, q_out, queries.shift

    got = _grad(loss)(q, front)
    ref = _grad(loss)(q, lambda q: (feature_map(q, "softmax"), sla.pool_blocks(q, block), q))
    assert rel_err(got, ref) < (1e-6 if dtype == jnp.float32 else 4e-3)
    with pytest.raises(ValueError, match="k_mean"):
        block_means_phi_int8_queries(q, block, PHI_FUNCTIONS['softmax'], k_mean[:, :1], 0.37)


def _numpy_topk_ascending(scores, k):
    order = np.argsort(-scores, axis=-1, kind="stable")  # ties: lower index first, like lax.top_k
    return np.sort(order[..., :k], axis=-1)


@pytest.mark.parametrize("row_elements", [64, 1024], ids=["row_per_program", "rows_per_program"])
@pytest.mark.parametrize("nk, k", [(37, 1), (21, 21), (130, 40)])
def test_select_blocks_lut_and_mass(seed, nk, k, row_elements):
    """The LUT (one scatter with a spare slot) and the mass, one or several rows per program (with several, a ragged
    last program: Nq 5), exact ties."""
    from pallas_kernels.front_end import SelectLaunch

    block_k, nq = 16, 5
    seq_len = nk * block_k - 7
    scores = jax.random.normal(jax.random.PRNGKey(seed), (1, 2, nq, nk))
    scores = jnp.round(scores * 4) / 4  # many exact ties, also across the k-th place
    lut, mass = select_blocks(scores, k, seq_len, block_k, launch=SelectLaunch(row_elements=row_elements))
    s = np.asarray(scores, np.float64)
    np.testing.assert_array_equal(lut, _numpy_topk_ascending(s, k))
    np.testing.assert_array_equal(lut, jnp.sort(jax.lax.top_k(scores, k)[1], axis=-1))
    counts = np.full(nk, float(block_k))
    counts[-1] = seq_len - (nk - 1) * block_k
    p = np.exp(s + np.log(counts))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(mass, np.take_along_axis(p, np.asarray(lut), -1).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1024, 8192])
def test_select_blocks_lowers_for_cuda(rows):
    """The selection kernel lowers for CUDA at wan-14b-720p's row length (1182 key blocks; checked against
    lax.top_k on the GPU by experiments/dev/probe_select.py)."""
    from helpers import lowered_for_cuda

    from pallas_kernels.front_end import SelectLaunch

    scores = jax.ShapeDtypeStruct((1, 2, 591, 1182), jnp.float32)
    launch = SelectLaunch(row_elements=rows, warps=8)
    text = lowered_for_cuda(lambda s: select_blocks(s, 59, 75600, 64, interpret=False, launch=launch), scores)
    assert "sla_select" in text


def test_select_blocks_mass_gradient_matches_xla(seed):
    scores = 2 * jax.random.normal(jax.random.PRNGKey(seed), (1, 2, 3, 19))
    g = jax.random.normal(jax.random.PRNGKey(seed + 1), (1, 2, 3))
    seq_len, block_k, k = 19 * 16 - 3, 16, 6

    def xla_mass(s):
        lut = sla.topk_blocks(s, k)
        return sla.captured_mass(s, sla.selection_mask(lut, 19), seq_len, block_k)

    got = _grad(lambda s: jnp.sum(select_blocks(s, k, seq_len, block_k)[1] * g))(scores)
    ref = _grad(lambda s: jnp.sum(xla_mass(s) * g))(scores)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("dim", [64, 128])
def test_route_pallas_equals_xla(seed, dim):
    q, k, _ = random_qkv(seed, (1, 203, 2, dim), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, dim, dim)) / np.sqrt(dim)
    cfg = sla.SLA2Config(block_q=64, block_k=32, topk_ratio=0.3)
    lut_p, _, mass_p = sla.route(q, k, cfg.replace(backend="pallas"), w_q=w, w_k=w)
    lut_x, _, mass_x = sla.route(q, k, cfg.replace(backend="xla"), w_q=w, w_k=w)
    np.testing.assert_array_equal(lut_p, lut_x)
    np.testing.assert_allclose(mass_p, mass_x, rtol=1e-5, atol=1e-6)
