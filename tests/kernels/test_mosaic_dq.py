"""The Mosaic dQ kernel (pallas_kernels/mosaic_dq.py) on a CPU host: it runs on Hopper only, so these tests lower it
for CUDA (Mosaic GPU's Python lowering) at D 64 and 128, with and without alpha, ragged N (the masked last key
block), the library's ring of 4 K/V slots; of its choices only the profiler directory is not a keyword: it comes from
KernelConfig; bad input is refused. Its results are checked on the GPU by experiments/dev/probe_mosaic_dq.py."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import pytest

from helpers import lowered_for_cuda
from pallas_kernels import KernelConfig, mosaic_dq

B, N, H, TOPK = 1, 1000, 2, 3  # ragged N: the last LUT entry's keys past N are masked


def _inputs(d, use_alpha, dtype=jnp.bfloat16):
    nq = -(-N // 128)
    q = jnp.zeros((B, N, H, d), dtype)
    lse = jnp.zeros((B, H, nq * 128), jnp.float32)
    lut = jnp.zeros((B, H, nq, TOPK), jnp.int32)
    alpha = jnp.ones((B, H, nq), jnp.float32) if use_alpha else None
    return (q, q, q, q, lse, lse, lut), alpha


def _lowered(d, use_alpha, config, dtype=jnp.bfloat16):
    args, alpha = _inputs(d, use_alpha, dtype)
    fn = lambda *a: mosaic_dq.sparse_attention_dq_mosaic(*a, alpha, stages=4, config=config)  # noqa: E731
    return lowered_for_cuda(fn, *args)


@pytest.mark.parametrize("d, use_alpha, dtype", [(64, True, jnp.bfloat16), (128, False, jnp.float16)])
def test_dq_kernel_lowers_for_cuda(d, use_alpha, dtype):
    assert "mosaic_gpu" in _lowered(d, use_alpha, KernelConfig(), dtype)


def test_dq_kernel_takes_its_choices_from_kernel_config(tmp_path):
    keywords = [p.name for p in inspect.signature(mosaic_dq.sparse_attention_dq_mosaic).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY]  # fmt: skip
    assert keywords == ["block_k", "sm_scale", "stages", "config", "dq_phi", "feature_map"]
    args, _ = _inputs(64, False)
    config = KernelConfig(profile_dir=str(tmp_path))
    profiled = lambda *a: mosaic_dq.sparse_attention_dq_mosaic(*a, config=config)  # noqa: E731
    assert f"profile_dir='{tmp_path}'" in str(jax.make_jaxpr(profiled)(*args))  # a profiled build lowers on a GPU only


def test_dq_kernel_refuses_bad_input():
    args, alpha = _inputs(64, True)
    with pytest.raises(ValueError, match="block_k"):
        mosaic_dq.sparse_attention_dq_mosaic(*args, alpha, block_k=32)
    with pytest.raises(ValueError, match="alpha"):
        mosaic_dq.sparse_attention_dq_mosaic(*args, alpha[:, :, :3])
    with pytest.raises(ValueError, match="lut"):
        mosaic_dq.sparse_attention_dq_mosaic(*args[:6], args[6][:, :, :2], alpha)
