"""The video DiT's training step on a 2 x 2 (data x context) mesh equals the one-device step."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import configs, data as data_lib, train
from experiments.dit import make_model
from helpers import rel_err


@pytest.mark.parametrize("run_name", ["dense", "sla2-95", "sparse-only-95"])
def test_dit_train_step_data_x_context_equals_single_device(run_name):
    preset = configs.get_preset("cpu-smoke")
    run = preset.run(run_name)
    batch = data_lib.ProceduralVideos(preset.data, data_lib.TRAIN_STREAM).batch(0, 4)
    key = jax.random.PRNGKey(3)
    results = []
    for mesh in (train.make_mesh(1), train.make_mesh(2)):
        single = mesh.shape["context"] == 1
        mesh = train.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "context")) if single else mesh
        model = make_model(preset, run, context=train.context_parallel(mesh))
        opt = train.make_optimizer(model, preset.stage2, nnx.Param)
        train.replicate(model, mesh)
        train.replicate(opt, mesh)
        losses = [float(train._train_step(model, opt, train.shard_batch(batch, mesh), jax.random.fold_in(key, i),
                                          nnx.Param)) for i in range(2)]
        results.append((losses, nnx.state(model, nnx.Param)))
    (l1, p1), (l2, p2) = results
    np.testing.assert_allclose(l2, l1, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        assert rel_err(a, b) < 1e-4
