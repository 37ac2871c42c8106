"""Soft routing over every key block (sla2_jax.soft_routing, SLA2Attention routing="soft_dense"): equals the hard
branches at a 0/1 mask, and the stage-1 loss's gradient reaches the router through a key block no query block
selects, which the "soft" form (hard top-k blocks + log M) does not do through its sparse branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sla2_jax as sla
from sla2_jax import soft_routing


def _qkv(seed, n, heads, dim):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return tuple(jax.random.normal(kk, (1, n, heads, dim), jnp.float32) for kk in ks)


@pytest.mark.parametrize("scope", ["complement", "all"])
def test_hard_mask_gives_the_hard_branches(scope):
    q, k, v = _qkv(0, 100, 2, 16)  # ragged: 7 query blocks, 7 key blocks of 16
    lut = sla.topk_blocks(sla.block_scores(q, k, block_q=16, block_k=16), 2)
    mask = sla.selection_mask(lut, 7)
    o_s, o_l = sla.sparse_linear_branches(q, k, v, lut, block_q=16, block_k=16, linear_scope=scope, backend="xla")
    s = soft_routing.soft_dense_sparse_branch(q, k, v, mask, block_q=16, block_k=16)
    lin = soft_routing.soft_linear_branch(q, k, v, mask, block_q=16, block_k=16, linear_scope=scope)
    np.testing.assert_allclose(s, o_s, atol=2e-5)
    np.testing.assert_allclose(lin, o_l, atol=2e-5)


ROUTER = nnx.Any(nnx.PathContains("w_q"), nnx.PathContains("w_k"))


@nnx.jit
def _loss_grads(layer, q, k, v, target):
    def loss(layer):
        return jnp.mean((layer(q, k, v) - target) ** 2) / jnp.mean(target**2)

    return nnx.grad(loss, argnums=nnx.DiffState(0, ROUTER))(layer)


def _router_grads(routing, v, alpha_logit, q, k, target):
    """Gradient of the stage-1 loss (relative MSE to `target`) w.r.t. the router's (w_q, w_k)."""
    cfg = sla.SLA2Config(block_q=64, block_k=16, topk_ratio=0.25, alpha="head", backend="xla", soft_topk_tau=1.0)
    layer = sla.SLA2Attention(1, 16, config=cfg, routing=routing, rngs=nnx.Rngs(0))
    layer.alpha_logit[...] = jnp.full((1,), alpha_logit, jnp.float32)
    grads = _loss_grads(layer, q, k, v, target)
    return np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(grads)])


def test_gradient_reaches_the_router_through_an_unselected_block():
    q, k, v = _qkv(1, 128, 1, 16)  # 2 query blocks of 64, 8 key blocks of 16, 2 selected per query block
    target = sla.dense_attention(q, k, v)  # fixed: only the model's input V changes below
    lut = np.asarray(sla.topk_blocks(sla.block_scores(q, k, block_q=64, block_k=16), 2))
    unselected = sorted(set(range(8)) - set(lut.ravel().tolist()))
    assert unselected, lut
    j = unselected[0]
    # Change the values of key block j alone: only a gradient path through block j can notice it.
    v2 = v.at[:, 16 * j : 16 * (j + 1)].add(jax.random.normal(jax.random.PRNGKey(9), (1, 16, 1, 16)))

    def change(routing, alpha_logit):
        a = _router_grads(routing, v, alpha_logit, q, k, target)
        b = _router_grads(routing, v2, alpha_logit, q, k, target)
        assert np.abs(a).max() > 1e-4  # the router learns at all
        return np.abs(a - b).max() / np.abs(a).max()

    # alpha = 1 (sparse branch alone): the "soft" form never looks at block j; "soft_dense" does, and so does its
    # straight-through form, whose forward pass never attends block j.
    assert change("soft", 30.0) < 1e-6
    assert change("soft_dense", 30.0) > 1e-3
    assert change("soft_dense_st", 30.0) > 1e-3
    # With the linear branch in the mix (alpha = 0.5), "soft" reaches block j only through the linear branch's
    # mask-weighted subtraction of its state: so the claim holds for the sparse branch, not for the whole loss.
    assert change("soft", 0.0) > 1e-3
    assert change("soft_dense", 0.0) > 1e-3


def test_mask_gradient_of_the_sparse_branch_at_unselected_blocks():
    q, k, v = _qkv(2, 128, 1, 16)
    scores = sla.block_scores(q, k, block_q=64, block_k=16)
    mask = sla.soft_topk(scores, 2, 1.0)
    lut = sla.topk_blocks(scores, 2)
    hard = np.asarray(sla.selection_mask(lut, 8)).astype(bool)

    def f(m):
        return jnp.sum(soft_routing.soft_dense_sparse_branch(q, k, v, m, block_q=64, block_k=16) ** 2)

    g = np.asarray(jax.grad(f)(mask))
    assert np.all(np.abs(g[~hard]) > 0)  # every unselected (query block, key block) pair gets a gradient


def test_soft_dense_module_runs_ragged_and_matches_hard_routing_at_low_temperature():
    q, k, v = _qkv(3, 100, 2, 16)
    cfg = sla.SLA2Config(block_q=16, block_k=16, topk_ratio=0.3, alpha="head", backend="xla", soft_topk_tau=1e-6)
    soft = sla.SLA2Attention(2, 16, config=cfg, routing="soft_dense", rngs=nnx.Rngs(0))
    hard = sla.SLA2Attention(2, 16, config=cfg, routing="hard", rngs=nnx.Rngs(0))
    o_soft, o_hard = soft(q, k, v), hard(q, k, v)
    assert o_soft.shape == q.shape and o_soft.dtype == q.dtype
    np.testing.assert_allclose(o_soft, o_hard, atol=1e-3)


def test_straight_through_forward_is_the_hard_routed_output():
    q, k, v = _qkv(4, 100, 2, 16)
    cfg = sla.SLA2Config(block_q=16, block_k=16, topk_ratio=0.3, alpha="head", backend="xla")
    st = sla.SLA2Attention(2, 16, config=cfg, routing="soft_dense_st", rngs=nnx.Rngs(0))
    hard = sla.SLA2Attention(2, 16, config=cfg, routing="hard", rngs=nnx.Rngs(0))
    soft = sla.SLA2Attention(2, 16, config=cfg, routing="soft_dense", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(st(q, k, v), hard(q, k, v), atol=2e-5)
    assert np.abs(np.asarray(soft(q, k, v) - hard(q, k, v))).max() > 1e-3  # tau = 0.1: the soft form differs
