"""The Mosaic forward with the linear branch in its epilogue (KernelConfig.epilogue "mosaic").

The Mosaic GPU kernel runs only on a Hopper GPU (experiments/dev/probe_mosaic_sparse.py checks it there). On CPU a
stand-in implementing the kernel's contract (mosaic_forward.sparse_linear_attention_mosaic) in dense float32 XLA
checks the wiring around it: which outputs each call asks for, the per-block states and alpha it is handed, and
the residuals the (Triton, interpret-mode) backward receives, against the dense reference.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import lowered_for_cuda
from pallas_kernels import KernelConfig, mosaic_forward, reference, sla2_fused_attention, sparse_linear_attention
from pallas_kernels.quantize import quantize_keys_with_mean, quantize_queries

# The dense references and the gradients run jitted: one program each instead of an op-by-op run (the same values
# to rounding, a fraction of the compile time). The stand-ins record their calls while the gradient is traced.
_STATIC = ("block_q", "block_k", "linear_scope", "sm_scale", "eps")
reference_branches = jax.jit(reference.reference_branches, static_argnames=_STATIC)
reference_fused = jax.jit(reference.reference_fused, static_argnames=_STATIC)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _inputs(seed, n, h, d, dtype, topk):
    """(q, k, v, phi(q), phi(k)) (1, N, H, D) dtype, an ascending LUT (block_q 128, block_k 64), weights, alpha."""
    rng = np.random.default_rng(seed)
    nq, nk = -(-n // 128), -(-n // 64)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32) for _ in range(3))
    k = k - jnp.mean(k, axis=1, keepdims=True)
    qp, kp = (jax.nn.softmax(x, axis=-1) for x in (q, k))
    lut = np.sort(np.stack([rng.permutation(nk)[:topk] for _ in range(h * nq)]), axis=-1)
    lut = jnp.asarray(lut.reshape(1, h, nq, topk), jnp.int32)
    w = jnp.asarray(rng.standard_normal((1, n, h, d)), jnp.float32)
    alpha = jnp.asarray(rng.uniform(0.1, 0.9, (1, h, nq)), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v, qp, kp)), lut, w, alpha


def _contract_stand_in(calls, calls_h=None):
    """XLA stand-in for mosaic_forward.sparse_linear_attention_mosaic: dense float32 sparse branch with the LUT's token
    mask (o_s, lse base 2), o_l = phi(Q_i) H_i / den with den = phi(Q_i) . Z_i + eps from the states it is given,
    o = alpha o_s + (1 - alpha) o_l; rows past N padded (lse 0, den 1). LinearInputs.q_phi None: phi(Q) =
    LinearInputs.feature_map of Q, rounded to Q's dtype (the kernel's epilogue)."""

    calls_h = [] if calls_h is None else calls_h

    def stand_in(q, k, v, lut, linear, *, outputs, block_k, sm_scale, stages, config):
        calls.append((tuple(outputs), stages))
        n = q.shape[1]
        nq, nk = lut.shape[2], -(-n // block_k)
        sel = jnp.any(lut[..., None] == jnp.arange(nk), axis=3)  # (B, H, Nq, Nk)
        mask = jnp.repeat(jnp.repeat(sel, 128, axis=2)[:, :, :n], block_k, axis=3)[..., :n]
        q_phi = linear.q_phi
        if q_phi is None:
            q_phi = linear.feature_map(q.astype(jnp.float32)).astype(q.dtype)
        q32, k32, v32, qp32 = (x.astype(jnp.float32) for x in (q, k, v, q_phi))
        s = jnp.where(mask, jnp.einsum("bnhd,bmhd->bhnm", q32, k32) * sm_scale, -jnp.inf)
        o_s = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v32)
        lse = jax.nn.logsumexp(s, axis=-1) * math.log2(math.e)
        block = jnp.arange(n) // 128
        state = block if linear.h.shape[2] > 1 else jnp.zeros_like(block)  # per query block, or one shared state
        calls_h.append(linear.h.shape)
        h_rows = linear.h.astype(jnp.float32)[:, :, state]  # (B, H, N, D, D)
        den = jnp.einsum("bnhd,bhnd->bhn", qp32, linear.z[:, :, state]) + linear.eps
        o_l = jnp.einsum("bnhd,bhnde->bnhe", qp32, h_rows) / jnp.transpose(den, (0, 2, 1))[..., None]
        vals = {"o_s": o_s, "o_l": o_l}
        if linear.alpha is not None:
            a = jnp.transpose(linear.alpha[:, :, block], (0, 2, 1))[..., None]
            vals["o"] = a * o_s + (1.0 - a) * o_l
        pad = ((0, 0), (0, 0), (0, nq * 128 - n))
        vals["lse"] = jnp.pad(lse, pad)
        vals["den"] = jnp.pad(den, pad, constant_values=1.0)
        return {x: vals[x].astype(q.dtype) if x in ("o", "o_s", "o_l") else vals[x] for x in outputs}

    return stand_in


@pytest.mark.parametrize("epilogue, in_ring", [("mosaic", True), ("mosaic", False), ("triton", True)])
def test_mosaic_epilogue_wiring_with_a_stand_in_kernel(epilogue, in_ring, monkeypatch):
    """KernelConfig.epilogue "mosaic": the fused kernel is asked for ("o",) in the primal, all five outputs under
    jax.grad (a ring of 4 stages when the third output tile goes through a V slot, KernelConfig.outputs_in_ring,
    else 3), ("o_s", "o_l") [+ lse, den] for the branches; outputs and the six gradients match the dense
    reference. "triton" (the fallback) never calls it. The GPU-only kernels are replaced by XLA stand-ins."""
    calls = []
    monkeypatch.setattr(mosaic_forward, "sparse_linear_attention_mosaic", _contract_stand_in(calls))
    monkeypatch.setattr(mosaic_forward, "sparse_attention_mosaic", _sparse_only_stand_in)
    config = KernelConfig(forward="mosaic", epilogue=epilogue, outputs_in_ring=in_ring)
    seed = int.from_bytes(os.urandom(4), "little")
    args, lut, w, alpha = _inputs(seed, 200, 2, 64, jnp.bfloat16, 2)
    kw = {"block_q": 128, "block_k": 64, "config": config}

    ref_kw = {"block_q": 128, "block_k": 64}
    assert _rel(sla2_fused_attention(*args, lut, alpha, **kw), reference_fused(*args, lut, alpha, **ref_kw)) < 2e-2, seed
    o_s, o_l = sparse_linear_attention(*args, lut, **kw)
    r_s, r_l = reference_branches(*args, lut, **ref_kw)
    assert _rel(o_s, r_s) < 2e-2 and _rel(o_l, r_l) < 2e-2, seed
    loss = lambda fn, **kw: lambda *x: jnp.sum(fn(*x[:5], lut, x[5], **kw).astype(jnp.float32) * w)
    g = jax.jit(jax.grad(loss(sla2_fused_attention, **kw), argnums=tuple(range(6))))(*args, alpha)
    rg = jax.jit(jax.grad(loss(reference_fused, block_q=128, block_k=64), argnums=tuple(range(6))))(*args, alpha)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, rg):
        assert _rel(a, b) < 3e-2, (seed, name, _rel(a, b))
    if epilogue == "triton":
        assert not calls
        return
    all_five = ("o", "o_s", "o_l", "lse", "den")
    assert calls[:2] == [(("o",), 4), (("o_s", "o_l"), 4)], calls
    assert (all_five, 4 if in_ring else 3) in calls, calls


def test_ring_holds_outputs_only_for_64_key_slots_and_two_stages():
    """A V slot can take a warpgroup's (64, D) output tile only when block_k is 64, and the two warpgroups' slots
    differ only with a ring of >= 2 stages; KernelConfig.outputs_in_ring turns it off."""
    ring = lambda block_k, stages, **kw: mosaic_forward.ring_holds_outputs(block_k, stages, KernelConfig(**kw))  # noqa: E731
    assert ring(64, 4) and ring(64, 2)
    assert not ring(64, 1)
    assert not ring(128, 4) and not ring(32, 4)
    assert not ring(64, 4, outputs_in_ring=False)


def _sparse_only_stand_in(q, k, v, lut, *, block_k, sm_scale, stages, config):
    """The plain Mosaic kernel's contract (o_s, lse) by the contract stand-in (for the "triton" epilogue path)."""
    out = _contract_stand_in([])(
        q, k, v, lut, _no_linear(q, lut), outputs=("o_s", "lse"), block_k=block_k, sm_scale=sm_scale, stages=stages,
        config=config,
    )
    return out["o_s"], out["lse"]


def _no_linear(q, lut):
    b, _, h, d = q.shape
    nq = lut.shape[2]
    return mosaic_forward.LinearInputs(q, jnp.zeros((b, h, nq, d, d), jnp.bfloat16), jnp.ones((b, h, nq, d)), None, 1.0)


@pytest.mark.parametrize("int8", [False, True])
def test_linear_inputs_of_the_wrong_shape_are_refused_before_the_kernel(int8):
    """Both Mosaic entry points with the linear epilogue (16-bit and INT8 scores) check H_i, Z_i against (B, H, Nq,
    D, D) / (B, H, Nq, D) in the shared kernel builder and say which shapes they got."""
    sm = mosaic_forward
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    lut = jnp.zeros((1, 2, 2, 1), jnp.int32)
    bad = sm.LinearInputs(q, jnp.zeros((1, 2, 2, 64, 32), jnp.bfloat16), jnp.zeros((1, 2, 2, 64)), None, 1e-6)
    with pytest.raises(ValueError, match=r"h \(1, 2, 2, 64, 32\)"):
        if int8:
            keys = quantize_keys_with_mean(q, 64)
            queries = quantize_queries(q, 128, keys.mean, 1.0, method="xla")
            sm.sparse_linear_attention_mosaic_int8(q, q, q, lut, keys, bad, outputs=("o_s",), queries=queries)
        else:
            sm.sparse_linear_attention_mosaic(q, q, q, lut, bad, outputs=("o_s",))


def test_scope_all_uses_one_shared_state_in_the_mosaic_epilogue(monkeypatch):
    """linear_scope "all" with bf16 states: the Mosaic forward's epilogue gets the totals as one (B, H, 1, D, D) bf16
    state shared by every query block (no per-block states) and the output and gradients match the dense reference;
    with state_dtype "float32" the Triton epilogue (hi + lo products) runs instead."""
    calls, shapes = [], []
    monkeypatch.setattr(mosaic_forward, "sparse_linear_attention_mosaic", _contract_stand_in(calls, shapes))
    monkeypatch.setattr(mosaic_forward, "sparse_attention_mosaic", _sparse_only_stand_in)
    seed = int.from_bytes(os.urandom(4), "little")
    args, lut, w, alpha = _inputs(seed, 200, 2, 64, jnp.bfloat16, 2)
    ref_kw = {"block_q": 128, "block_k": 64, "linear_scope": "all"}
    kw = dict(ref_kw, config=KernelConfig(forward="mosaic"))
    assert _rel(sla2_fused_attention(*args, lut, alpha, **kw), reference_fused(*args, lut, alpha, **ref_kw)) < 2e-2, seed
    loss = lambda fn, kw: lambda *x: jnp.sum(fn(*x[:5], lut, x[5], **kw).astype(jnp.float32) * w)  # noqa: E731
    g = jax.jit(jax.grad(loss(sla2_fused_attention, kw), argnums=tuple(range(6))))(*args, alpha)
    rg = jax.jit(jax.grad(loss(reference_fused, ref_kw), argnums=tuple(range(6))))(*args, alpha)
    for name, a, b in zip(("q", "k", "v", "q_phi", "k_phi", "alpha"), g, rg):
        assert _rel(a, b) < 3e-2, (seed, name, _rel(a, b))
    assert calls and shapes and all(shape == (1, 2, 1, 64, 64) for shape in shapes), shapes
    calls.clear()
    sla2_fused_attention(*args, lut, alpha, **dict(ref_kw, config=KernelConfig(forward="mosaic", state_dtype="float32")))
    assert not calls


def test_shared_state_kernel_lowers_for_cuda():
    """The Mosaic forward with one (B, H, 1, D, D) state lowers for CUDA on a CPU host and reads the state without
    a query-block offset (the lowered kernel differs from the per-block one)."""
    b, n, h, d = 1, 1000, 2, 128
    nq = -(-n // 128)
    q = jnp.zeros((b, n, h, d), jnp.bfloat16)
    lut = jnp.zeros((b, h, nq, 3), jnp.int32)

    def lowered(states):
        hs, zs = jnp.zeros((b, h, states, d, d), jnp.bfloat16), jnp.zeros((b, h, states, d))
        linear = mosaic_forward.LinearInputs(q, hs, zs, jnp.zeros((b, h, nq)), 1e-6)
        fn = lambda q, k, v, lut: mosaic_forward.sparse_linear_attention_mosaic(  # noqa: E731
            q, k, v, lut, linear, outputs=("o",), config=KernelConfig(forward="mosaic"))
        return lowered_for_cuda(fn, q, q, q, lut)

    assert lowered(1) != lowered(nq)
    with pytest.raises(ValueError, match="must be"):
        lowered(2)
