"""FP8 P V in the INT8 Mosaic GPU sparse forward (quant "int8_fp8" on Hopper; pallas_kernels/mosaic_forward.py).

The kernel runs only on a Hopper GPU (experiments/dev/probe_mosaic_fp8.py checks it there against the Triton int8_fp8
kernel and the fake-quant reference). On CPU: the interleaved FP8 values it reads, its lowering for CUDA (the e4m3
wgmma with P from registers or from shared memory), and the wiring of the low-bit Mosaic path with an XLA
emulation of the kernel's arithmetic, against the Triton int8_fp8 path (interpret mode): outputs and gradients.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import lowbit_triton_and_emulated_mosaic, lowered_for_cuda, random_qkv, rel_err
from pallas_kernels import KernelConfig, attention, quantize
from pallas_kernels import mosaic_forward as sm
from pallas_kernels.common import validate_call


def test_interleaved_values_permute_keys_within_16(seed):
    """quantize_values_fp8(interleave=True): the plain FP8 V^T with position 16 g + i holding key 16 g +
    P8_KEY_ORDER[i] (the order of P's columns in the 8-bit wgmma fragment); same scales; keys past N zero."""
    order = np.asarray(quantize.P8_KEY_ORDER)
    assert sorted(order) == list(range(16)) and list(order[:4]) == [0, 1, 8, 9]
    v = random_qkv(seed, (2, 200, 3, 64), jnp.bfloat16)[2]
    plain, s_plain = quantize.quantize_values_fp8(v, 64)
    inter, s_inter = quantize.quantize_values_fp8(v, 64, interleave=True)
    assert inter.shape == plain.shape == (2, 3, 64, 256) and inter.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(s_plain), np.asarray(s_inter))
    p = np.asarray(plain.astype(jnp.float32)).reshape(2, 3, 64, 16, 16)
    np.testing.assert_array_equal(np.asarray(inter.astype(jnp.float32)).reshape(p.shape), p[..., order])
    assert not np.any(p.reshape(2, 3, 64, 256)[..., 200:])  # padded keys are zero (interleaved: within their 16)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize.quantize_values_fp8(v, 8, interleave=True)


@pytest.mark.parametrize("n, d, dtype", [(200, 64, jnp.bfloat16), (130, 128, jnp.float16), (256, 64, jnp.float32)])
def test_pallas_value_pass_equals_xla(seed, n, d, dtype):
    """quantize_values_fp8 by the Pallas pass (interpret mode on CPU) = the XLA formulas, bit for bit, interleaved
    or not; ragged N."""
    v = random_qkv(seed, (2, n, 3, d), dtype)[2] * 3.0
    for interleave in (False, True):
        x8, xs = quantize.quantize_values_fp8(v, 64, interleave=interleave, method="xla")
        p8, ps = quantize.quantize_values_fp8(v, 64, interleave=interleave, method="pallas")
        np.testing.assert_array_equal(np.asarray(ps), np.asarray(xs))
        assert p8.dtype == x8.dtype and p8.shape == x8.shape
        np.testing.assert_array_equal(np.asarray(p8.view(jnp.uint8)), np.asarray(x8.view(jnp.uint8)))


@pytest.mark.parametrize("operand, a_constraint", [("registers", "r,r,r,r,l,"), ("smem", "l,l,")])
def test_fp8_kernel_lowers_for_cuda(operand, a_constraint):
    """The FP8 forward lowers for CUDA on a CPU host (Mosaic GPU's Python lowering): one e4m3 wgmma per P V (D = 128:
    m64n128k32) whose A operand is four 32-bit registers ("registers") or a shared-memory descriptor ("smem"), and the
    f32 -> e4m3 pair conversion."""
    config = KernelConfig(forward="mosaic", p8_operand=operand)
    b, n, h, d = 1, 1000, 2, 128
    nq, nk = -(-n // 128), -(-n // 64)
    q = jnp.zeros((b, n, h, d), jnp.bfloat16)
    lut = jnp.zeros((b, h, nq, 3), jnp.int32)
    keys = quantize.QuantisedKeys(jnp.zeros((b, n, h, d), jnp.int8), jnp.ones((b, h, nk)), jnp.zeros((b, h, d)))

    def fwd(q, k, v, lut):
        values = quantize.quantize_values_fp8(v, 64, interleave=True)
        return sm.sparse_attention_mosaic_int8(q, k, v, lut, keys, values=values, config=config)

    text = lowered_for_cuda(fwd, q, q, q, lut)
    wgmma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n128k32\.f32\.e4m3\.e4m3[^\"]*", text)
    assert wgmma, "no e4m3 wgmma in the lowered kernel"
    constraints = wgmma[0].split("\\00")[1]
    assert constraints.endswith(a_constraint + "n,n,n"), constraints[-40:]
    assert "cvt.rn.satfinite.e4m3x2.f32" in text
    assert "m64n64k32.s32.s8.s8" in text  # the INT8 scores


def test_fp8_values_checked():
    """_sparse_forward's FP8 values: float8_e4m3fn V^T (B, H, D, Nk * block_k) and float32 scales (B, H, D), with int8
    scores and block_k a multiple of 16; otherwise a ValueError."""
    v = jnp.zeros((1, 100, 2, 64), jnp.bfloat16)
    good = (jnp.zeros((1, 2, 64, 128), jnp.float8_e4m3fn), jnp.ones((1, 2, 64)))
    sm._check_values(good, v, 64, True, None)
    with pytest.raises(ValueError, match="v8t"):
        sm._check_values((good[0].astype(jnp.bfloat16), good[1]), v, 64, True, None)
    with pytest.raises(ValueError, match="v8t"):
        sm._check_values((good[0][..., :100], good[1]), v, 64, True, None)
    with pytest.raises(ValueError, match="v_scale"):
        sm._check_values((good[0], good[1][..., :32]), v, 64, True, None)
    with pytest.raises(ValueError, match="int8 scores"):
        sm._check_values(good, v, 64, False, None)


def test_int8_fp8_takes_the_mosaic_path_where_chosen():
    """quant "int8_fp8" goes to the Mosaic kernel like "int8" when KernelConfig.forward is "mosaic", unless
    KernelConfig.mosaic_fp8 is off (then the Triton int8_fp8 kernel)."""
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    lut = jnp.zeros((1, 2, 2, 1), jnp.int32)

    def call(config):
        return validate_call(q, q, q, q, q, lut, 128, 64, "complement", None, 1e-6, None, config)

    on = call(KernelConfig(forward="mosaic"))
    assert attention._lowbit_on_mosaic(on, "int8") and attention._lowbit_on_mosaic(on, "int8_fp8")
    off = call(KernelConfig(forward="mosaic", mosaic_fp8=False))
    assert attention._lowbit_on_mosaic(off, "int8") and not attention._lowbit_on_mosaic(off, "int8_fp8")
    triton = call(KernelConfig(forward="triton"))
    assert not attention._lowbit_on_mosaic(triton, "int8")


def _emulated_fp8_kernel(q8, k8, v, lut, step_scale, *, block_k, stages, values, config):
    """XLA emulation of mosaic_forward._sparse_forward with FP8 values: per LUT entry t, S = q8 k8_j^T * scale[t] (keys
    >= N masked), online base-2 softmax, P * 448 to e4m3, acc += P8 V8_j with V8 read back from the interleaved V^T;
    o = acc * v_scale / 448 / l, lse = m + log2 l: the Triton int8_fp8 kernel's arithmetic."""
    assert values is not None and q8.dtype == k8.dtype == jnp.int8 and stages >= 1
    v8t, v_scale = values
    b, n, h, d = v.shape
    nq, topk = lut.shape[2], lut.shape[3]
    nk = -(-n // block_k)
    inv = np.argsort(np.asarray(quantize.P8_KEY_ORDER))
    v8 = v8t.reshape(b, h, d, nk * block_k // 16, 16)[..., inv].astype(jnp.float32)
    v8 = jnp.swapaxes(v8.reshape(b, h, d, nk, block_k), 2, 3)  # (B, H, Nk, D, block_k)
    qb = jnp.pad(q8.astype(jnp.float32), ((0, 0), (0, nq * 128 - n), (0, 0), (0, 0)))
    qb = jnp.transpose(qb.reshape(b, nq, 128, h, d), (0, 3, 1, 2, 4))  # (B, H, Nq, 128, D)
    kb = jnp.pad(k8.astype(jnp.float32), ((0, 0), (0, nk * block_k - n), (0, 0), (0, 0)))
    kb = jnp.transpose(kb.reshape(b, nk, block_k, h, d), (0, 3, 1, 2, 4))  # (B, H, Nk, block_k, D)
    m = jnp.full((b, h, nq, 128), -jnp.inf)
    l_i = jnp.zeros((b, h, nq, 128))
    acc = jnp.zeros((b, h, nq, 128, d))
    for t in range(topk):
        j = lut[..., t]  # (B, H, Nq)
        kj = jnp.take_along_axis(kb, j[..., None, None], axis=2)
        vj = jnp.take_along_axis(v8, j[..., None, None], axis=2)  # (B, H, Nq, D, block_k)
        s = jnp.einsum("bhqrd,bhqkd->bhqrk", qb, kj) * step_scale[..., t][..., None, None]
        valid = (j[..., None] * block_k + jnp.arange(block_k)) < n  # (B, H, Nq, block_k)
        s = jnp.where(valid[..., None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[..., None])
        l_i = l_i * corr + jnp.sum(p, axis=-1)
        p8 = (p * 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32)
        acc = acc * corr[..., None] + jnp.einsum("bhqrk,bhqdk->bhqrd", p8, vj)
        m = m_new
    o = acc * (v_scale[:, :, None, None, :] / 448.0) / l_i[..., None]
    o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(b, nq * 128, h, d)[:, :n]
    return o.astype(v.dtype), (m + jnp.log2(l_i)).reshape(b, h, nq * 128)


def test_mosaic_int8_fp8_path_with_an_emulated_kernel(seed, monkeypatch):
    """The int8_fp8 Mosaic forward (GPU only) = Q pass + per-LUT-entry scales + interleaved FP8 V pass + the Mosaic
    kernel + LSE shift + the Triton linear epilogue. With an XLA emulation of the kernel (it reads V back through
    P8_KEY_ORDER: values in natural order would scramble the keys), output and gradients equal the Triton int8_fp8
    path's (same quantised operands, same online arithmetic)."""
    calls = []

    def kernel(*args, **kw):
        calls.append(kw)
        return _emulated_fp8_kernel(*args, **kw)

    q, k, v = random_qkv(seed, (1, 200, 2, 64), jnp.float32)  # ragged N, 2 query blocks
    lut, _, mass = sla.route(q, k, sla.SLA2Config(block_q=128, block_k=64, topk_ratio=0.5))
    kw = dict(block_q=128, block_k=64, quant="int8_fp8")
    do = jax.random.normal(jax.random.PRNGKey(seed + 3), q.shape)
    (o_ref, g_ref), (o, g) = lowbit_triton_and_emulated_mosaic(
        q, k, v, lut, mass, do, kw, kernel, monkeypatch
    )
    assert calls and all(c["values"] is not None for c in calls), "the FP8 mosaic path was not taken"
    assert rel_err(o, o_ref) < 1e-3, rel_err(o, o_ref)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, g_ref):
        assert rel_err(a, b) < 1e-3, (name, rel_err(a, b))
