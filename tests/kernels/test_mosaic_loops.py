"""The compute warpgroups' LUT loop of the Mosaic GPU sparse forward (KernelConfig.loop, .pair_steps).

The kernels run only on a Hopper GPU; experiments/dev/probe_mosaic_sparse.py (--parts loops, and small / fused_small with
--loop / --pair-steps) checks each variant there against the dense float32 reference and the other variants. On CPU:
every kernel kind lowers for CUDA under every variant (ragged N, odd and even LUT lengths, one entry), the variants
lower to different kernels, FP8 values ignore pair_steps, an odd LUT length in pairs ends with a 64-key step under the
ping-pong loop, and a bad loop name is refused.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest

from helpers import lowered_for_cuda
from pallas_kernels import KernelConfig
from pallas_kernels import mosaic_forward as sm
from pallas_kernels import quantize

B, N, H, D = 1, 1000, 2, 128  # ragged N: the loops' masked last step is lowered too
NQ, NK = -(-N // 128), -(-N // 64)


def _kernels(config):
    """{kind: fn(q, k, v, lut)}: the bf16 kernel, the training-mode fused kernel (five outputs), INT8, INT8 + FP8."""
    keys = quantize.QuantisedKeys(jnp.zeros((B, N, H, D), jnp.int8), jnp.ones((B, H, NK)), jnp.zeros((B, H, D)))
    q = jnp.zeros((B, N, H, D), jnp.bfloat16)
    h, z, alpha = jnp.zeros((B, H, NQ, D, D), jnp.bfloat16), jnp.zeros((B, H, NQ, D)), jnp.zeros((B, H, NQ))
    linear = sm.LinearInputs(q, h, z, alpha, 1e-6)
    train = ("o", "o_s", "o_l", "lse", "den")
    return {
        "bf16": lambda q, k, v, lut: sm.sparse_attention_mosaic(q, k, v, lut, stages=4, config=config),
        "fused": lambda q, k, v, lut: sm.sparse_linear_attention_mosaic(
            q, k, v, lut, linear, outputs=train, config=config
        ),
        "int8": lambda q, k, v, lut: sm.sparse_attention_mosaic_int8(q, k, v, lut, keys, config=config),
        "int8_fp8": lambda q, k, v, lut: sm.sparse_attention_mosaic_int8(
            q, k, v, lut, keys, values=quantize.quantize_values_fp8(v, 64, interleave=True), config=config
        ),
    }


def _lowered(kind: str, loop: str, topk: int, pairs: bool = True) -> str:
    config = KernelConfig(forward="mosaic", loop=loop, pair_steps=pairs)
    q = jnp.zeros((B, N, H, D), jnp.bfloat16)
    lut = jnp.zeros((B, H, NQ, topk), jnp.int32)
    fn = _kernels(config)[kind]
    return lowered_for_cuda(fn, q, q, q, lut)


@pytest.mark.parametrize("kind", ["bf16", "fused", "int8", "int8_fp8"])
@pytest.mark.parametrize("topk", [1, 3, 4])
def test_loop_variants_lower(kind, topk):
    texts = {
        (loop, pairs): _lowered(kind, loop, topk, pairs)
        for loop in ("pingpong", "pipelined")
        for pairs in (False, True)
    }
    assert texts["pingpong", True] != texts["pipelined", True]
    # pairs need two LUT entries and 16-bit values
    same_with_pairs = topk == 1 or kind == "int8_fp8"
    assert (texts["pingpong", False] == texts["pingpong", True]) == same_with_pairs
    assert (texts["pipelined", False] == texts["pipelined", True]) == same_with_pairs


def test_bad_loop_refused():
    with pytest.raises(ValueError, match="loop"):
        _lowered("bf16", "spiral", 3)


@pytest.mark.parametrize("kind", ["bf16", "fused", "int8"])
def test_odd_lut_length_in_pairs_ends_with_a_64_key_step(kind):
    """With paired steps, an odd LUT length under the ping-pong loop ends with a 64-key step: a 64 x 64 score tile,
    i.e. an m64n64 wgmma, which no step of an even length has, nor the pipelined loop (whose last step computes a
    second half repeating the entry, masked)."""

    def has_64_key_step(loop, topk):
        return re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n64k", _lowered(kind, loop, topk)) is not None

    assert has_64_key_step("pingpong", 3) and has_64_key_step("pingpong", 5)
    assert not has_64_key_step("pingpong", 4)
    assert not has_64_key_step("pipelined", 3)
