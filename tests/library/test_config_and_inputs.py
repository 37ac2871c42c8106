"""Config validation and bad inputs: clear ValueErrors naming the argument."""

import jax.numpy as jnp
import pytest

import sla2_jax as sla


@pytest.mark.parametrize("field,value", [
    ("block_q", 100), ("block_k", 8), ("topk_ratio", 0.0), ("topk_ratio", 1.5), ("feature_map", "tanh"),
    ("linear_scope", "some"), ("alpha", "row"), ("quant", "int4"), ("backend", "cuda"), ("soft_topk_tau", 0.0),
])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        sla.SLA2Config(**{field: value})


def test_config_is_frozen_and_hashable():
    cfg = sla.SLA2Config(topk_ratio=0.03)
    assert abs(cfg.sparsity - 0.97) < 1e-9
    assert hash(cfg) == hash(sla.SLA2Config(topk_ratio=0.03))
    with pytest.raises(Exception):
        cfg.topk_ratio = 0.1
    assert cfg.num_selected(512) == 15 and cfg.num_selected(10) == 1


def _qkv(shape=(1, 100, 2, 64), dtype=jnp.float32):
    return [jnp.ones(shape, dtype) for _ in range(3)]


def test_bad_qkv_shapes_and_dtypes():
    cfg = sla.SLA2Config(block_q=32, block_k=16)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k shape"):
        sla.sla2_attention(q, k[:, :50], v, config=cfg)
    with pytest.raises(ValueError, match="4-D"):
        sla.sla2_attention(q[0], k, v, config=cfg)
    with pytest.raises(ValueError, match="head_dim"):
        sla.sla2_attention(*_qkv((1, 100, 2, 0)), config=cfg)
    with pytest.raises(ValueError, match="dtype"):
        sla.sla2_attention(*[x.astype(jnp.int32) for x in (q, k, v)], config=cfg)
    with pytest.raises(ValueError, match="config"):
        sla.sla2_attention(q, k, v, config={"block_q": 32})


def test_bad_lut_alpha_and_weights():
    q, k, v = _qkv()
    lut = jnp.zeros((1, 2, 4, 2), jnp.int32)  # Nq = 4 for block_q = 32, Nk = 7 for block_k = 16
    with pytest.raises(ValueError, match="lut"):
        sla.sparse_linear_branches(q, k, v, lut[:, :, :3], block_q=32, block_k=16)
    with pytest.raises(ValueError, match="lut"):
        sla.sparse_linear_branches(q, k, v, lut.astype(jnp.float32), block_q=32, block_k=16)
    with pytest.raises(ValueError, match="block_q"):
        sla.sparse_linear_branches(q, k, v, lut, block_q=48, block_k=16)
    with pytest.raises(ValueError, match="backend"):
        sla.sparse_linear_branches(q, k, v, lut, block_q=32, block_k=16, backend="cuda")
    cfg = sla.SLA2Config(block_q=32, block_k=16)
    with pytest.raises(ValueError, match="alpha"):
        sla.sla2_attention(q, k, v, config=cfg, alpha=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="w_q"):
        sla.sla2_attention(q, k, v, config=cfg, w_q=jnp.eye(32))
    with pytest.raises(ValueError, match="k="):
        sla.topk_blocks(jnp.zeros((1, 1, 4, 7)), 8)
