"""One validation for every backend: the same inputs are refused (ValueError naming the argument) or accepted by
"xla", "reference" and "pallas" (the kernels in interpret mode on CPU); where the kernels cannot run an accepted
call, "pallas" says why and "auto" would fall back to "xla"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import random_qkv, rel_err

CFG = sla.SLA2Config(block_q=32, block_k=16, topk_ratio=0.3, alpha="mass")
BACKENDS = ("xla", "reference", "pallas")
SHAPE = (1, 100, 2, 32)  # ragged N: 4 query blocks, 7 key blocks


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_are_refused_by_every_backend(backend):
    q, k, v = random_qkv(0, SHAPE)
    cfg = CFG.replace(backend=backend)
    with pytest.raises(ValueError, match=r"q, k, v must have one dtype; got q float32, k bfloat16, v float32"):
        sla.sla2_attention(q, k.astype(jnp.bfloat16), v, config=cfg)
    with pytest.raises(ValueError, match="one dtype"):
        sla.sparse_linear_branches(q, k, v.astype(jnp.float16), jnp.zeros((1, 2, 4, 2), jnp.int32),
                                   block_q=32, block_k=16, backend=backend)
    with pytest.raises(ValueError, match="one dtype"):
        sla.dense_attention(q.astype(jnp.bfloat16), k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1.7, -0.1, float("nan"), np.array([[[0.5], [1.2]]], np.float32)])
def test_alpha_outside_0_1_is_refused_by_every_backend(backend, alpha):
    q, k, v = random_qkv(0, SHAPE)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        sla.sla2_attention(q, k, v, config=CFG.replace(backend=backend), alpha=alpha)


def test_alpha_in_range_is_accepted_by_every_backend_with_one_result():
    q, k, v = random_qkv(1, SHAPE)
    alpha = jnp.array([[[0.0, 0.25, 1.0, 0.5]]], jnp.float32)  # (1, 1, Nq): broadcast over the heads
    outs = {b: sla.sla2_attention(q, k, v, config=CFG.replace(backend=b), alpha=alpha) for b in BACKENDS}
    for b in ("reference", "pallas"):
        assert rel_err(outs[b], outs["xla"]) < 1e-3, b
    for a in (0.0, 1.0):
        np.testing.assert_allclose(sla.sla2_attention(q, k, v, config=CFG.replace(backend="xla"), alpha=a),
                                   sla.sla2_attention(q, k, v, config=CFG.replace(backend="pallas"), alpha=a),
                                   atol=2e-3)


def test_traced_alpha_is_not_checked_by_value_under_jit_and_grad():
    """Inside jit / grad the values are unknown: alpha is used as given (the shape is still checked)."""
    q, k, v = random_qkv(2, SHAPE)
    cfg = CFG.replace(backend="xla")
    f = jax.jit(lambda a: sla.sla2_attention(q, k, v, config=cfg, alpha=a))
    assert jnp.all(jnp.isfinite(f(jnp.float32(0.3))))
    g = jax.grad(lambda a: jnp.sum(sla.sla2_attention(q, k, v, config=cfg, alpha=a)))(jnp.float32(0.3))
    assert jnp.isfinite(g)
    with pytest.raises(ValueError, match="alpha shape"):
        jax.jit(lambda a: sla.sla2_attention(q, k, v, config=cfg, alpha=a))(jnp.ones((2, 5)))


@pytest.mark.parametrize("head_dim", [8, 48, 256])
def test_head_dims_the_kernels_lack_run_on_xla_and_pallas_says_why(head_dim):
    q, k, v = random_qkv(3, (1, 100, 2, head_dim))
    out = sla.sla2_attention(q, k, v, config=CFG.replace(backend="xla"))
    ref = sla.sla2_attention(q, k, v, config=CFG.replace(backend="reference"))
    assert out.shape == q.shape and rel_err(out, ref) < 1e-4
    with pytest.raises(ValueError, match=rf"backend='pallas' cannot run this call: .*head_dim.*{head_dim}"):
        sla.sla2_attention(q, k, v, config=CFG.replace(backend="pallas"))
    assert sla.resolve_backend("auto", q, k, v, block_q=32, block_k=16) == "xla"  # on CPU, with no warning


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes_dtypes_and_head_dim_zero_are_refused_by_every_backend(backend):
    q, k, v = random_qkv(0, SHAPE)
    cfg = CFG.replace(backend=backend)
    with pytest.raises(ValueError, match="v shape"):
        sla.sla2_attention(q, k, v[:, :50], config=cfg)
    with pytest.raises(ValueError, match="q has dtype int32"):
        sla.sla2_attention(*[x.astype(jnp.int32) for x in (q, k, v)], config=cfg)
    with pytest.raises(ValueError, match="head_dim"):
        sla.sla2_attention(*[x[..., :0] for x in (q, k, v)], config=cfg)
    with pytest.raises(ValueError, match="w_k"):
        sla.sla2_attention(q, k, v, config=cfg, w_k=jnp.eye(16))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_one_dtype_inputs_are_accepted_by_every_backend_and_keep_the_dtype(dtype):
    q, k, v = random_qkv(4, SHAPE, dtype)
    outs = {b: sla.sla2_attention(q, k, v, config=CFG.replace(backend=b)) for b in BACKENDS}
    for b, out in outs.items():
        assert out.dtype == dtype and out.shape == q.shape, b
    assert rel_err(outs["pallas"], outs["xla"]) < 2e-2
