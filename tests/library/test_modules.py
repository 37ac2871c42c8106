"""Flax NNX modules: shapes, identity-initialised router, alpha modes, soft routing gradients, training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sla2_jax as sla
from helpers import random_qkv, rel_err

CFG = sla.SLA2Config(block_q=32, block_k=16, topk_ratio=0.25, backend="xla")


@pytest.mark.parametrize("alpha", ["block", "head", "mass"])
def test_sla2_module_matches_functional(seed, alpha):
    q, k, v = random_qkv(seed, (2, 150, 2, 32))
    cfg = CFG.replace(alpha=alpha)
    module = sla.SLA2Attention(2, 32, config=cfg, seq_len=150, rngs=nnx.Rngs(0))
    out = module(q, k, v)
    assert out.shape == q.shape
    if alpha == "mass":  # w=1, b=0: alpha = captured mass = the functional default
        expect = sla.sla2_attention(q, k, v, config=cfg)
    else:  # alpha_logit = 0: alpha = 0.5
        expect = sla.sla2_attention(q, k, v, config=cfg, alpha=0.5)
    assert rel_err(out, expect) < 1e-5


def test_block_alpha_needs_seq_len():
    """The error says exactly what to pass: seq_len=N, or alpha 'mass' / 'head' for any N."""
    what_to_pass = r"pass seq_len=N .*SLA2Config\(alpha='mass'\) or alpha='head', which work for any N"
    with pytest.raises(ValueError, match=what_to_pass):
        sla.SLA2Attention(2, 32, config=CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=what_to_pass):
        sla.SelfAttention(64, 2, config=CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=what_to_pass):
        sla.SelfAttention(64, 2, rngs=nnx.Rngs(0))  # the default SLA2Config() has alpha="block"
    module = sla.SLA2Attention(2, 32, config=CFG, seq_len=64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"built for seq_len=64, q has N=96; build it with seq_len=96, or use "
                                         r"SLA2Config\(alpha='mass'\) or alpha='head'"):
        module(*random_qkv(0, (1, 96, 2, 32)))
    call = nnx.jit(lambda module, *qkv: module(*qkv))  # one program per N, not op by op (compile-bound)
    for alpha in ("mass", "head"):  # any N
        module = sla.SLA2Attention(2, 32, config=CFG.replace(alpha=alpha), rngs=nnx.Rngs(0))
        for n in (40, 96):
            assert call(module, *random_qkv(0, (1, n, 2, 32))).shape == (1, n, 2, 32)
    with pytest.raises(ValueError, match=r"\(H, D\)"):
        module(*random_qkv(0, (1, 64, 4, 32)))


def test_soft_routing_gives_router_gradients_and_hard_does_not(seed):
    q, k, v = random_qkv(seed, (1, 128, 2, 32))
    target = sla.dense_attention(q, k, v)
    module = sla.SLA2Attention(2, 32, config=CFG.replace(alpha="head"), routing="soft", rngs=nnx.Rngs(0))

    def loss(m):
        return jnp.mean((m(q, k, v) - target) ** 2)

    grads = nnx.jit(nnx.grad(loss))(module)
    assert float(jnp.abs(grads.w_q[...]).sum()) > 0 and float(jnp.abs(grads.w_k[...]).sum()) > 0
    assert float(jnp.abs(grads.alpha_logit[...]).sum()) > 0
    module.routing = "hard"
    grads = nnx.jit(nnx.grad(loss))(module)
    assert float(jnp.abs(grads.w_q[...]).sum()) == 0.0  # hard top-k: no gradient to the router


def test_soft_routing_reference_equals_xla(seed):
    q, k, v = random_qkv(seed, (1, 128, 2, 32))
    outs = []
    for backend in ("reference", "xla"):
        module = sla.SLA2Attention(2, 32, config=CFG.replace(alpha="mass", backend=backend), routing="soft",
                                   rngs=nnx.Rngs(0))
        outs.append(module(q, k, v))
    assert rel_err(outs[1], outs[0]) < 1e-5


def test_router_training_reduces_mse(seed):
    """Stage-1 style: train w_q, w_k and alpha with soft top-k on MSE to dense attention; loss drops, params move."""
    q, k, v = random_qkv(seed, (2, 128, 2, 32))
    target = sla.dense_attention(q, k, v)
    module = sla.SLA2Attention(2, 32, config=CFG.replace(alpha="head"), routing="soft", rngs=nnx.Rngs(0))
    w0 = module.w_q[...]
    opt = nnx.Optimizer(module, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(module, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(q, k, v) - target) ** 2))(module)
        opt.update(module, grads)
        return loss

    losses = [float(step(module, opt)) for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0]
    assert float(jnp.abs(module.w_q[...] - w0).max()) > 0


def test_sla_v1_module_is_sparse_attention_at_init_and_proj_trains(seed):
    q, k, v = random_qkv(seed, (1, 128, 2, 32))
    module = sla.SLAAttention(2, 32, config=CFG, rngs=nnx.Rngs(0))
    lut, _, _ = sla.route(q, k, CFG)
    o_s, _ = sla.sparse_linear_branches(q, k, v, lut, block_q=32, block_k=16, backend="xla")
    assert rel_err(module(q, k, v), o_s) < 1e-6
    target = sla.dense_attention(q, k, v)
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean((m(q, k, v) - target) ** 2)))(module)
    assert float(jnp.abs(grads.proj_kernel[...]).sum()) > 0


@pytest.mark.parametrize("attention", ["dense", "sla", "sla2"])
def test_self_attention_block_trains(seed, attention):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 96, 64))
    y = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 96, 64))
    block = sla.SelfAttention(64, 2, attention=attention, config=CFG.replace(alpha="mass"), rngs=nnx.Rngs(seed))
    before = block.qkv.kernel[...]
    opt = nnx.Optimizer(block, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(block, opt):
        loss, grads = nnx.value_and_grad(lambda b: jnp.mean((b(x) - y) ** 2))(block)
        opt.update(block, grads)
        return loss

    losses = [float(step(block, opt)) for _ in range(5)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert float(jnp.abs(block.qkv.kernel[...] - before).max()) > 0


@pytest.mark.parametrize("attention", ["dense", "sla", "sla2"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_self_attention_returns_the_input_dtype(attention, dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 96, 64)).astype(dtype)
    block = sla.SelfAttention(64, 2, attention=attention, config=CFG.replace(alpha="mass"), rngs=nnx.Rngs(0))
    y = block(x)
    assert y.dtype == dtype and y.shape == x.shape
    if dtype == jnp.bfloat16:  # close to the float32 computation on the same (bf16-representable) input
        assert rel_err(y, block(x.astype(jnp.float32))) < 5e-2


def test_quant_module_runs_and_differs_slightly(seed):
    q, k, v = random_qkv(seed, (1, 128, 2, 32))
    base = sla.SLA2Attention(2, 32, config=CFG.replace(alpha="mass"), rngs=nnx.Rngs(0))(q, k, v)
    low = sla.SLA2Attention(2, 32, config=CFG.replace(alpha="mass", quant="int8"), rngs=nnx.Rngs(0))(q, k, v)
    assert 0 < rel_err(low, base) < 0.02
