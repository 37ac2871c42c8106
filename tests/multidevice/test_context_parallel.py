"""Context parallelism on 4 simulated CPU devices: equals the single-device result, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sla2_jax as sla
from helpers import random_qkv, rel_err

CFG = sla.SLA2Config(block_q=32, block_k=16, topk_ratio=0.25, backend="xla", alpha="mass")


def test_four_devices_are_simulated():
    assert len(jax.devices()) == 4


@pytest.fixture(scope="module")
def mesh_1x4():
    return Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "context"))


def test_forward_and_gradients_equal_single_device(mesh_1x4):
    q, k, v = random_qkv(11, (2, 256, 4, 32))
    w = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32)) * 0.1 + jnp.eye(32)
    alpha = jax.random.uniform(jax.random.PRNGKey(4), (2, 4, 8))
    sharding = NamedSharding(mesh_1x4, P(None, "context"))
    qs, ks, vs = (jax.device_put(x, sharding) for x in (q, k, v))

    def single(q, k, v, w):
        return sla.sla2_attention(q, k, v, config=CFG, w_q=w, w_k=w, alpha=alpha)

    def parallel(q, k, v, w):
        return sla.context_parallel_attention(q, k, v, mesh=mesh_1x4, seq_axis="context", config=CFG, w_q=w,
                                              w_k=w, alpha=alpha)

    out = jax.jit(parallel)(qs, ks, vs, w)
    assert out.sharding.spec[1] == "context"
    assert rel_err(out, jax.jit(single)(q, k, v, w)) < 1e-6
    g = jax.random.normal(jax.random.PRNGKey(5), q.shape)
    grads_1 = jax.jit(jax.grad(lambda *a: jnp.sum(single(*a) * g), argnums=(0, 1, 2)))(q, k, v, w)
    grads_p = jax.jit(jax.grad(lambda *a: jnp.sum(parallel(*a) * g), argnums=(0, 1, 2)))(qs, ks, vs, w)
    for a, b in zip(grads_p, grads_1):
        assert rel_err(a, b) < 1e-5


def test_training_free_mass_alpha_and_bf16(mesh_1x4):
    q, k, v = random_qkv(12, (1, 320, 8, 64), jnp.bfloat16)
    out = jax.jit(lambda *qkv: sla.context_parallel_attention(*qkv, mesh=mesh_1x4, seq_axis="context", config=CFG))(
        q, k, v
    )
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, jax.jit(lambda *qkv: sla.sla2_attention(*qkv, config=CFG))(q, k, v)) < 1e-2


def test_bad_mesh_inputs_raise(mesh_1x4):
    q, k, v = random_qkv(0, (1, 256, 6, 32))
    with pytest.raises(ValueError, match="heads"):
        sla.context_parallel_attention(q, k, v, mesh=mesh_1x4, seq_axis="context", config=CFG)
    q, k, v = random_qkv(0, (1, 250, 4, 32))
    with pytest.raises(ValueError, match="sequence length"):
        sla.context_parallel_attention(q, k, v, mesh=mesh_1x4, seq_axis="context", config=CFG)
    with pytest.raises(ValueError, match="seq_axis"):
        sla.context_parallel_attention(q, k, v, mesh=mesh_1x4, seq_axis="seq", config=CFG)


def _train_steps(block, x, y, steps=2):
    opt = nnx.Optimizer(block, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(block, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda b: jnp.mean((b(x) - y) ** 2))(block)
        opt.update(block, grads)
        return loss

    return [float(step(block, opt, x, y)) for _ in range(steps)], block


@pytest.mark.parametrize("attention", ["sla2", "dense"])
def test_training_step_on_2x2_data_context_mesh_equals_single_device(attention):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "context"))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 128, 64))
    y = jax.random.normal(jax.random.PRNGKey(1), (4, 128, 64))
    ctx = sla.ContextParallel(mesh, "context", "data")
    single = sla.SelfAttention(64, 4, attention=attention, config=CFG, rngs=nnx.Rngs(7))
    sharded = sla.SelfAttention(64, 4, attention=attention, config=CFG, context=ctx, rngs=nnx.Rngs(7))
    spec = NamedSharding(mesh, P("data", "context"))
    losses_1, single = _train_steps(single, x, y)
    losses_p, sharded = _train_steps(sharded, jax.device_put(x, spec), jax.device_put(y, spec))
    np.testing.assert_allclose(losses_p, losses_1, rtol=1e-5)
    assert rel_err(sharded.qkv.kernel[...], single.qkv.kernel[...]) < 1e-5
    if attention == "sla2":
        assert rel_err(sharded.core.alpha_w[...], single.core.alpha_w[...]) < 1e-5
