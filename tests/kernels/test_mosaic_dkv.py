"""The Mosaic dK/dV kernel (pallas_kernels/mosaic_dkv.py) on a CPU host: it runs on Hopper only, so these tests lower
it for CUDA (Mosaic GPU's Python lowering) under both exchanges of the partial sums (two float32 buffers at D = 64,
one at D = 128), with and without alpha, ragged N; its choices come from KernelConfig, not from keywords; bad input
is refused. Its results are checked on the GPU by experiments/dev/probe_mosaic_dkv.py."""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import pytest

from helpers import lowered_for_cuda
from pallas_kernels import KernelConfig, mosaic_dkv
from pallas_kernels.linear_states import transpose_lut

B, N, H = 1, 1000, 2  # ragged N: the masked last query block is lowered too


def _inputs(d, use_alpha):
    nq, nk = -(-N // 128), -(-N // 64)
    q = jnp.zeros((B, N, H, d), jnp.bfloat16)
    lse = jnp.zeros((B, H, nq * 128), jnp.float32)
    lut_t, count = transpose_lut(jnp.zeros((B, H, nq, 3), jnp.int32), nk)
    alpha = jnp.ones((B, H, nq), jnp.float32) if use_alpha else None
    return (q, q, q, q, lse, lse, lut_t, count), alpha


@pytest.mark.parametrize("d, exchange", [(64, "pair"), (128, "serial")])
@pytest.mark.parametrize("use_alpha", [True, False])
def test_dkv_kernel_lowers_for_cuda(d, exchange, use_alpha):
    assert mosaic_dkv._exchange_mode(d, 2, 2) == exchange
    args, alpha = _inputs(d, use_alpha)
    fn = lambda *a: mosaic_dkv.sparse_attention_dkv_mosaic(*a, alpha, config=KernelConfig())  # noqa: E731
    text = lowered_for_cuda(fn, *args)
    assert "mosaic_gpu" in text


def test_dkv_kernel_takes_its_choices_from_kernel_config():
    keywords = [p.name for p in inspect.signature(mosaic_dkv.sparse_attention_dkv_mosaic).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]  # fmt: skip
    assert keywords == ["block_k", "sm_scale", "stages", "config", "dk_phi", "dv_add", "feature_map"]


def test_dkv_kernel_refuses_bad_input():
    args, alpha = _inputs(64, True)
    with pytest.raises(ValueError, match="block_k"):
        mosaic_dkv.sparse_attention_dkv_mosaic(*args, alpha, block_k=128)
    with pytest.raises(ValueError, match="alpha"):
        mosaic_dkv.sparse_attention_dkv_mosaic(*args, alpha[:, :, :3])
