"""One read of K and V for the routing and the complement states: ``pallas_kernels.key_block_sums(k, v)`` gives the
per-key-block sums (those the fused forward would make) and the block means of K (those the front end gives), and
``sla2_fused_attention(..., key_sums=)`` takes the sums instead of making them: same output and gradients. Pallas
interpret mode on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fresh_seed as _seed
from helpers import rel_err as _rel

from pallas_kernels import key_block_sums, linear_states, sla2_fused_attention
from pallas_kernels.common import validate_call
from pallas_kernels.front_end import block_means_and_phi
from sla2_jax.feature_maps import PHI_FUNCTIONS

PHI = PHI_FUNCTIONS["softmax"]


def _qkv(seed, n, d, dtype, h=2):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("n, d, dtype", [(200, 64, jnp.bfloat16), (300, 128, jnp.float32)])
def test_means_are_the_front_ends_and_sums_the_forwards(n, d, dtype):
    q, k, v = _qkv(_seed(), n, d, dtype)
    k = k.at[0, 70, 1, 3].set(jnp.inf)  # a non-finite row: left out of its block's mean, as by the front end
    sums, means = key_block_sums(k, v, feature_map=PHI)
    np.testing.assert_allclose(means, block_means_and_phi(k, 64)[1], rtol=1e-6, atol=1e-6)
    lut = jnp.zeros((1, 2, -(-n // 128), 1), jnp.int32)
    cfg = validate_call(q, k, v, q, k, lut, 128, 64, "complement", None, 1e-6, None, None)
    ref = linear_states.outer_sum(k, v, cfg, block_rows=64, phi=PHI)
    for got, want in zip(sums, ref):
        if want is not None:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_fused_attention_with_key_sums_equals_without():
    n, d, topk = 456, 64, 2
    q, k, v = _qkv(_seed(), n, d, jnp.bfloat16)
    nq, nk = -(-n // 128), -(-n // 64)
    rng = np.random.default_rng(1)
    lut = jnp.asarray(np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(2 * nq)]), -1).reshape(1, 2, nq, topk),
                      jnp.int32)
    alpha = jnp.asarray(rng.uniform(0.2, 0.8, (1, 2, nq)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, n, 2, d)), jnp.float32)

    def run(with_sums):
        def f(q, k, v, a):
            sums = key_block_sums(jax.lax.stop_gradient(k), jax.lax.stop_gradient(v), feature_map=PHI)[0]
            o = sla2_fused_attention(q, k, v, None, None, lut, a, feature_map=PHI,
                                     key_sums=sums if with_sums else None)
            return jnp.sum(o.astype(jnp.float32) * w), o
        (_, o), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, alpha)
        return o, grads

    o1, g1 = run(True)
    o0, g0 = run(False)
    assert _rel(o1, o0) < 1e-6
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 1e-6


def test_bad_key_sums_are_refused():
    q, k, v = _qkv(0, 256, 64, jnp.bfloat16)
    lut = jnp.zeros((1, 2, 2, 1), jnp.int32)
    alpha = jnp.full((1, 2, 2), 0.5, jnp.float32)
    sums = key_block_sums(k, v, feature_map=PHI)[0]
    with pytest.raises(ValueError, match="complement"):
        sla2_fused_attention(q, k, v, None, None, lut, alpha, feature_map=PHI, key_sums=sums, linear_scope="all")
    other = key_block_sums(k[:, :128], v[:, :128], feature_map=PHI)[0]
    with pytest.raises(ValueError, match="key_block_sums"):
        sla2_fused_attention(q, k, v, None, None, lut, alpha, feature_map=PHI, key_sums=other)
    with pytest.raises(ValueError, match="feature_map"):
        sla2_fused_attention(q, k, v, q, k, lut, alpha, key_sums=sums)
    with pytest.raises(ValueError, match="feature_map"):
        key_block_sums(k, v, feature_map=None)
