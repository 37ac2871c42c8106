"""The video DiT on a 2 x 2 (data x context) mesh equals one device: the full training step (dense attention) and the
attention layer of the other context-parallel kinds (sla2 with QAT, sparse-only), forward and gradients. (The SLA2
module's training step on a data x context mesh is in test_context_parallel.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import configs, train
from experiments.dit import Attention, attention_spec, make_model
from helpers import rel_err

# 2 x 16 x 16 videos, 2x2 patches: 128 tokens (4 query blocks of 32, 8 key blocks of 16), one block, head_dim 64.
PRESET = dataclasses.replace(
    configs.get_preset("cpu-smoke"),
    data=configs.DataConfig(frames=2, height=16, width=16, max_shapes=2),
    model=configs.ModelConfig(patch=(1, 2, 2), dim=128, depth=1, num_heads=2),
)


def _one_device_mesh():
    return train.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "context"))


def _open_zero_init_gates(model):
    """Give the adaLN-zero layers (final projection, block gates) non-zero weights, so that the attention output
    reaches the loss and the attention parameters get gradients from the first step on."""
    for i, lin in enumerate([model.final, model.final_ada] + [b.ada for b in model.blocks]):
        lin.kernel[...] = jax.random.normal(jax.random.PRNGKey(100 + i), lin.kernel[...].shape) * 0.1


def _train_two_steps(run, mesh, batch, key):
    """Two steps (all parameters) of a fresh model on `mesh`. Returns the losses, initial and final parameters."""
    model = make_model(PRESET, run, context=train.context_parallel(mesh))
    _open_zero_init_gates(model)
    init = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    opt = train.make_optimizer(model, PRESET.stage2, nnx.Param)
    train.replicate(model, mesh)
    train.replicate(opt, mesh)
    sharded = train.shard_batch(batch, mesh)
    losses = [float(train._train_step(model, opt, sharded, jax.random.fold_in(key, i), nnx.Param)) for i in range(2)]
    return losses, init, nnx.state(model, nnx.Param)


def test_dit_train_step_data_x_context_equals_single_device():
    run = PRESET.run("dense")
    video = jax.random.uniform(jax.random.PRNGKey(1), (4, 2, 16, 16, 3), minval=-1.0, maxval=1.0)  # (B, T, H, W, C)
    batch = {"video": video, "label": jnp.arange(4, dtype=jnp.int32)}
    key = jax.random.PRNGKey(3)
    l1, init, p1 = _train_two_steps(run, _one_device_mesh(), batch, key)
    l2, _, p2 = _train_two_steps(run, train.make_mesh(2), batch, key)
    np.testing.assert_allclose(l2, l1, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        assert rel_err(a, b) < 1e-4
    # The attention projections were trained (the comparison above covers the attention's gradients).
    qkv = lambda params: np.asarray(params["blocks"][0]["attn"]["qkv"]["kernel"][...])
    assert not np.allclose(qkv(p1), qkv(init))


def _attention_layer_value_and_grads(run, mesh, x, g):
    """The DiT attention layer of `run` (context-parallel when the mesh has context > 1) on x (B, N, dim) float32:
    its output (B, N, dim) and the gradients of sum(output * g) w.r.t. its parameters and x."""
    spec = dataclasses.replace(attention_spec(PRESET, run), context=train.context_parallel(mesh))
    layer = Attention(PRESET.model.dim, PRESET.model.num_heads, x.shape[1], spec, jnp.float32, nnx.Rngs(5))
    train.replicate(layer, mesh)
    x = jax.device_put(x, NamedSharding(mesh, P("data", "context")))

    @nnx.jit
    def value_and_grads(layer, x):
        def loss(layer, x):
            out = layer(x)[0]
            return jnp.sum(out * g), out

        return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

    (_, out), grads = value_and_grads(layer, x)
    return out, grads


@pytest.mark.parametrize("run_name", ["sla2-95", "sparse-only-95"])
def test_dit_attention_layer_data_x_context_equals_single_device(run_name):
    """Ragged N = 120 (not a multiple of the blocks), head_dim 64."""
    run = PRESET.run(run_name)
    x = jax.random.normal(jax.random.PRNGKey(11), (4, 120, PRESET.model.dim))
    g = jax.random.normal(jax.random.PRNGKey(12), x.shape)
    out_1, grads_1 = _attention_layer_value_and_grads(run, _one_device_mesh(), x, g)
    out_p, grads_p = _attention_layer_value_and_grads(run, train.make_mesh(2), x, g)
    assert rel_err(out_p, out_1) < 1e-5
    leaves_1, leaves_p = jax.tree.leaves(grads_1), jax.tree.leaves(grads_p)
    assert len(leaves_p) == len(leaves_1) > 0
    for a, b in zip(leaves_p, leaves_1):
        assert rel_err(a, b) < 1e-5
