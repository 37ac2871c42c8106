"""KernelConfig.sum_blocks: the per-block outer sums (the complement's h_j per key block, the backward's sums per
query block) with several blocks per program give the same sums, bit for bit, as one block per program; so do the
fused forward's output and gradients. Ragged N, block counts that the wanted number does not divide (fewer blocks
per program then), D 64 / 128, bf16 / f32. Pallas interpret mode on the CPU; the kernel lowers for CUDA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fresh_seed, lowered_for_cuda, output_and_grads, softmax_phi

from pallas_kernels import KernelConfig, key_block_sums, linear_states, sla2_fused_attention
from pallas_kernels.common import validate_call
from sla2_jax.feature_maps import PHI_FUNCTIONS

PHI = PHI_FUNCTIONS["softmax"]


def _arrays(seed, n, d, dtype, h=2):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32).astype(dtype) for _ in range(4))


def _call(q, k, v, config, block_q=128, block_k=64):
    lut = jax.ShapeDtypeStruct((q.shape[0], q.shape[2], -(-q.shape[1] // block_q), 1), jnp.int32)
    return validate_call(q, k, v, q, k, lut, block_q, block_k, "complement", None, 1e-6, True, config)


@pytest.mark.parametrize("blocks", [2, 4, 8])
def test_blocks_per_program_divides_the_block_count(blocks):
    assert linear_states._blocks_per_program(512, blocks) == blocks
    assert linear_states._blocks_per_program(6, blocks) == 2  # 6 key blocks: 2 per program at most
    assert linear_states._blocks_per_program(5, blocks) == 1


@pytest.mark.parametrize("n, d, dtype", [(500, 64, jnp.bfloat16), (330, 128, jnp.bfloat16), (300, 128, jnp.float32)])
@pytest.mark.parametrize("blocks", [2, 4])
def test_per_key_block_sums_and_means_equal_one_block_per_program(n, d, dtype, blocks):
    """The forward's path: phi(K_j)^T V_j, colsum phi(K_j) (float16 with power-of-two scales for 16-bit inputs) and
    K's block means, made from K with phi in the kernel. 8, 6 and 5 key blocks: 4 / 2, 2 and 1 per program."""
    seed = fresh_seed()
    _, k, v, _ = _arrays(seed, n, d, dtype)
    k = k.at[0, 70, 1, 3].set(jnp.inf)  # a non-finite row: left out of its block's mean in both forms
    ref_sums, ref_means = key_block_sums(k, v, feature_map=PHI, interpret=True, config=KernelConfig())
    sums, means = key_block_sums(k, v, feature_map=PHI, interpret=True, config=KernelConfig(sum_blocks=blocks))
    assert sums.h.shape == ref_sums.h.shape and means.shape == ref_means.shape, seed
    np.testing.assert_array_equal(np.asarray(means), np.asarray(ref_means), err_msg=f"seed {seed}")
    for got, want in zip(sums, ref_sums):
        if want is not None:
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                          err_msg=f"seed {seed}")


@pytest.mark.parametrize("n, d", [(1000, 64), (700, 128)])
def test_weighted_per_query_block_sums_equal_one_block_per_program(n, d):
    """The backward's path: sum_r w_r phi(Q)_r^T X_r and sum_r u_r phi(Q)_r per 128-row query block (8 and 6 query
    blocks: 4 and 2 per program)."""
    seed = fresh_seed()
    q, x, _, _ = _arrays(seed, n, d, jnp.bfloat16)
    rng = np.random.default_rng(seed + 1)
    w, u = (jnp.asarray(rng.standard_normal((1, 2, n)), jnp.float32) for _ in range(2))
    q_phi = softmax_phi(q)
    sums = [linear_states.outer_sum(q_phi, x, _call(q, x, x, KernelConfig(sum_blocks=g)), w, u, block_rows=128)
            for g in (1, 4)]
    for got, want in zip(sums[1], sums[0]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                      err_msg=f"seed {seed}")


@pytest.mark.parametrize("n, d, dtype", [(600, 64, jnp.bfloat16), (450, 128, jnp.float32)])
def test_fused_attention_output_and_gradients_unchanged(n, d, dtype):
    seed = fresh_seed()
    q, k, v, do = _arrays(seed, n, d, dtype)
    nq, nk = -(-n // 128), -(-n // 64)
    rng = np.random.default_rng(seed)
    lut = jnp.asarray(np.sort(np.stack([rng.choice(nk, 2, replace=False) for _ in range(2 * nq)]), axis=-1),
                      jnp.int32).reshape(1, 2, nq, 2)
    alpha = jnp.asarray(rng.uniform(0.2, 0.8, (1, 2, nq)), jnp.float32)

    def run(blocks):
        fn = lambda q, k, v, a: sla2_fused_attention(  # noqa: E731
            q, k, v, None, None, lut, a, feature_map=PHI, block_q=128, block_k=64, interpret=True,
            config=KernelConfig(sum_blocks=blocks))
        return output_and_grads(fn, (q, k, v, alpha), do.astype(jnp.float32), jit=True)

    (o1, g1), (o4, g4) = run(1), run(4)
    np.testing.assert_array_equal(np.asarray(o4, np.float32), np.asarray(o1, np.float32), err_msg=f"seed {seed}")
    for a, b in zip(g4, g1):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=f"seed {seed}")


def test_bad_sum_blocks_refused():
    for bad in (0, 3, 2.0):
        with pytest.raises(ValueError, match="sum_blocks"):
            KernelConfig(sum_blocks=bad)


def test_lowers_for_cuda_at_wan_shape():
    k = jnp.zeros((1, 32760, 12, 128), jnp.bfloat16)
    text = lowered_for_cuda(lambda k, v: key_block_sums(k, v, feature_map=PHI, interpret=False,
                                                       config=KernelConfig(sum_blocks=4)), k, k)
    assert "sla_sum_phi" in text
