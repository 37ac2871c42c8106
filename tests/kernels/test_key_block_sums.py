"""One read of K and V for the routing and the linear states: ``pallas_kernels.key_block_sums(k, v)`` gives the
sums the fused forward would make (per key block for the complement scope, the totals for "all") and the block
means of K (those the front end gives), and ``sla2_fused_attention(..., key_sums=)`` takes the sums instead of making
them: same output and gradients. Pallas interpret mode on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fresh_seed as _seed
from helpers import rel_err as _rel

from pallas_kernels import KernelConfig, key_block_sums, linear_states, sla2_fused_attention
from pallas_kernels.common import validate_call
from pallas_kernels.front_end import block_means_and_phi
from sla2_jax.feature_maps import PHI_FUNCTIONS

PHI = PHI_FUNCTIONS["softmax"]


def _qkv(seed, n, d, dtype, h=2):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32).astype(dtype) for _ in range(3))


def _lut_alpha_w(seed, n, d, topk, h=2):
    """A random ascending LUT (1, h, Nq, topk) int32, alpha (1, h, Nq) in [0.2, 0.8] and output weights (1, n, h, d)."""
    nq, nk = -(-n // 128), -(-n // 64)
    rng = np.random.default_rng(seed)
    lut = np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(h * nq)]), -1).reshape(1, h, nq, topk)
    alpha = jnp.asarray(rng.uniform(0.2, 0.8, (1, h, nq)), jnp.float32)
    return jnp.asarray(lut, jnp.int32), alpha, jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32)


@pytest.mark.parametrize("n, d, dtype", [(200, 64, jnp.bfloat16), (300, 128, jnp.float32)])
def test_means_are_the_front_ends_and_sums_the_forwards(n, d, dtype):
    q, k, v = _qkv(_seed(), n, d, dtype)
    k = k.at[0, 70, 1, 3].set(jnp.inf)  # a non-finite row: left out of its block's mean, as by the front end
    sums, means = key_block_sums(k, v, feature_map=PHI)
    np.testing.assert_allclose(means, block_means_and_phi(k, 64)[1], rtol=1e-6, atol=1e-6)
    lut = jnp.zeros((1, 2, -(-n // 128), 1), jnp.int32)
    cfg = validate_call(q, k, v, q, k, lut, 128, 64, "complement", None, 1e-6, None, None)
    ref = linear_states.outer_sum(k, v, cfg, block_rows=64, phi=PHI)
    nk = -(-n // 64)  # 4 or 5 blocks, the sums stored for 8 (a multiple of 8 below 512 blocks), zero past nk
    assert sums.blocks == nk and sums.h.shape[2] == sums.z.shape[2] == 8, (sums.blocks, sums.h.shape)
    assert not np.any(np.asarray(sums.h[:, :, nk:], np.float32)) and not np.any(np.asarray(sums.z[:, :, nk:]))
    for got, want in zip(sums, ref):
        if want is not None:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_stored_block_counts():
    """Block sums are stored for a multiple of 64 blocks from 512 on (wan-14b-720p: 1182 key blocks -> 1216, 591
    query blocks -> 640), else of 8; aligned counts stay."""
    counts = [1, 6, 8, 256, 511, 512, 513, 591, 1182]
    assert [linear_states.stored_blocks(c) for c in counts] == [8, 8, 8, 256, 512, 512, 576, 640, 1216]


@pytest.mark.parametrize("n, d, dtype", [(200, 64, jnp.bfloat16), (333, 128, jnp.float32)])
def test_totals_for_scope_all(n, d, dtype):
    """Scope "all": the means as the front end's (a non-finite row left out), the totals as the forward's states
    kernel makes them (the same sums, taken one key block per step: float32 rounding apart)."""
    q, k, v = _qkv(_seed(), n, d, dtype)
    k = k.at[0, 130, 0, 5].set(jnp.nan)
    sums, means = key_block_sums(k, v, feature_map=PHI, linear_scope="all")
    np.testing.assert_allclose(means, block_means_and_phi(k, 64)[1], rtol=1e-6, atol=1e-6)
    lut = jnp.zeros((1, 2, -(-n // 128), 1), jnp.int32)
    k_ok = jnp.where(jnp.isfinite(k), k, 0)  # the totals of a NaN row are NaN: compare them on finite keys
    cfg = validate_call(q, k_ok, v, q, k_ok, lut, 128, 64, "all", None, 1e-6, None, None)
    h_ref, z_ref = linear_states.outer_sum(k_ok, v, cfg, phi=PHI)
    sums = key_block_sums(k_ok, v, feature_map=PHI, linear_scope="all")[0]
    assert sums.h.shape == (1, 2, d, d) and sums.z.shape == (1, 2, d) and sums.scale is None
    np.testing.assert_allclose(sums.h, h_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(h_ref))))
    np.testing.assert_allclose(sums.z, z_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(z_ref))))


@pytest.mark.parametrize("scope", ["complement", "all"])
def test_fused_attention_with_key_sums_equals_without(scope):
    n, d, topk = 456, 64, 2
    q, k, v = _qkv(_seed(), n, d, jnp.bfloat16)
    lut, alpha, w = _lut_alpha_w(1, n, d, topk)

    def run(with_sums):
        def f(q, k, v, a):
            sums = key_block_sums(jax.lax.stop_gradient(k), jax.lax.stop_gradient(v), feature_map=PHI,
                                  linear_scope=scope)[0]
            o = sla2_fused_attention(q, k, v, None, None, lut, a, feature_map=PHI, linear_scope=scope,
                                     key_sums=sums if with_sums else None)
            return jnp.sum(o.astype(jnp.float32) * w), o
        (_, o), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, alpha)
        return o, grads

    o1, g1 = run(True)
    o0, g0 = run(False)
    tol = 1e-6 if scope == "complement" else 1e-5  # "all": the totals may be summed in another order of rows
    assert _rel(o1, o0) < tol
    for a, b in zip(g1, g0):
        assert _rel(a, b) < tol


@pytest.mark.parametrize("chunk", [64, 256])
def test_totals_chunk_changes_only_the_split(chunk):
    """KernelConfig.totals_chunk (rows per program of the totals' split-K sums): the totals and block means of
    scope "all" equal a float64 reference, and the fused op's output and gradients (whose backward makes dH, dZ
    totals the same way) equal those of the default chunk, up to float32 summation order."""
    n, d, topk = 333, 64, 2
    q, k, v = _qkv(_seed(), n, d, jnp.float32)
    lut, alpha, w = _lut_alpha_w(2, n, d, topk)
    config = KernelConfig(totals_chunk=chunk)
    cfg = validate_call(q, k, v, q, k, lut, 128, 64, "all", None, 1e-6, None, config)
    (h, z), means = linear_states.outer_sum(k, v, cfg, phi=PHI, means=True)
    kp = np.asarray(PHI(k), np.float64)[0]
    np.testing.assert_allclose(h[0], np.einsum("nhd,nhe->hde", kp, np.asarray(v, np.float64)[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z[0], kp.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(means, block_means_and_phi(k, 64)[1], rtol=1e-6, atol=1e-6)

    def run(config):
        def f(q, k, v, a):
            o = sla2_fused_attention(q, k, v, None, None, lut, a, feature_map=PHI, linear_scope="all", config=config)
            return jnp.sum(o * w), o
        (_, o), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, alpha)
        return o, grads

    o1, g1 = run(config)
    o0, g0 = run(KernelConfig())
    assert _rel(o1, o0) < 1e-5
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 1e-5
    with pytest.raises(ValueError, match="totals_chunk"):
        KernelConfig(totals_chunk=96)


def test_bad_key_sums_are_refused():
    q, k, v = _qkv(0, 256, 64, jnp.bfloat16)
    lut = jnp.zeros((1, 2, 2, 1), jnp.int32)
    alpha = jnp.full((1, 2, 2), 0.5, jnp.float32)
    sums = key_block_sums(k, v, feature_map=PHI)[0]
    with pytest.raises(ValueError, match="linear_scope"):
        sla2_fused_attention(q, k, v, None, None, lut, alpha, feature_map=PHI, key_sums=sums, linear_scope="all")
    totals = key_block_sums(k, v, feature_map=PHI, linear_scope="all")[0]
    with pytest.raises(ValueError, match="linear_scope"):
        sla2_fused_attention(q, k, v, None, None, lut, alpha, feature_map=PHI, key_sums=totals)
    other = key_block_sums(k[:, :128], v[:, :128], feature_map=PHI)[0]
    with pytest.raises(ValueError, match="key_block_sums"):
        sla2_fused_attention(q, k, v, None, None, lut, alpha, feature_map=PHI, key_sums=other)
    with pytest.raises(ValueError, match="feature_map"):
        sla2_fused_attention(q, k, v, q, k, lut, alpha, key_sums=sums)
    with pytest.raises(ValueError, match="feature_map"):
        key_block_sums(k, v, feature_map=None)


@pytest.mark.parametrize("scope", ["complement", "all"])
def test_states_kernel_with_means_lowers_for_cuda(scope):
    """The Triton states kernel with the block-means output (per-block sums, or the totals stepping one key block at
    a time) lowers for CUDA at wan-1.3b's shape (compiling and running it needs a GPU)."""
    from helpers import lowered_for_cuda

    from pallas_kernels import KernelConfig

    k = jnp.zeros((1, 32760, 12, 128), jnp.bfloat16)
    text = lowered_for_cuda(lambda k, v: key_block_sums(k, v, feature_map=PHI, linear_scope=scope, interpret=False,
                                                       config=KernelConfig()), k, k)
    assert "sla_sum_phi" in text
