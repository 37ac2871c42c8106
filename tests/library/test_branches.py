"""The two branches on every pure-JAX backend against dense references: forward, gradients, ragged N, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import random_qkv, rel_err


# The library jitted once per call site (eager calls compile every op separately: 2-3x slower here); eager use is
# checked by test_sla2_attention_jits_and_matches_eager.
branches = jax.jit(
    sla.sparse_linear_branches,
    static_argnames=("block_q", "block_k", "feature_map", "linear_scope", "quant", "backend"),
)
dense_attention = jax.jit(sla.dense_attention, static_argnames=("chunk_size",))


def random_lut(seed, batch, heads, nq, nk, topk):
    """Random duplicate-free ascending LUT (B, H, Nq, k)."""
    keys = jax.random.uniform(jax.random.PRNGKey(seed), (batch, heads, nq, nk))
    return jnp.sort(jax.lax.top_k(keys, topk)[1], axis=-1).astype(jnp.int32)


def loop_reference(q, k, v, lut, block_q, block_k, linear_scope="complement", fmap="softmax", eps=1e-6):
    """Independent numpy implementation, one query row at a time (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    lut = np.asarray(lut)
    batch, n, heads, d = q.shape
    phi = {"softmax": lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True),
           "relu": lambda x: np.maximum(x, 0), "elu": lambda x: np.where(x > 0, x + 1, np.exp(x))}[fmap]
    o_s, o_l = np.zeros_like(q), np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                blocks = lut[b, h, i // block_q]
                sel = np.isin(np.arange(n) // block_k, blocks)
                logits = k[b, :, h] @ q[b, i, h] / np.sqrt(d)
                p = np.where(sel, np.exp(logits - logits[sel].max()), 0.0)
                o_s[b, i, h] = p @ v[b, :, h] / p.sum()
                lin = np.ones(n, bool) if linear_scope == "all" else ~sel
                a = (phi(k[b, :, h]) @ phi(q[b, i, h])) * lin
                o_l[b, i, h] = a @ v[b, :, h] / (a.sum() + eps)
    return o_s, o_l


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("fmap,scope", [("softmax", "complement"), ("elu", "all"), ("relu", "complement")])
def test_branches_match_loop_reference(seed, backend, fmap, scope):
    q, k, v = random_qkv(seed, (1, 75, 2, 16))
    lut = random_lut(seed + 1, 1, 2, 3, 5, 2)
    o_s, o_l = branches(q, k, v, lut, block_q=32, block_k=16, feature_map=fmap, linear_scope=scope, backend=backend)
    r_s, r_l = loop_reference(q, k, v, lut, 32, 16, scope, fmap)
    assert rel_err(o_s, r_s) < 1e-5
    assert rel_err(o_l, r_l) < 1e-5


@pytest.mark.parametrize("n,d,dtype", [(333, 64, jnp.float32), (200, 128, jnp.float32), (333, 128, jnp.bfloat16),
                                       (256, 64, jnp.float16)])
@pytest.mark.parametrize("scope", ["complement", "all"])
def test_xla_equals_reference_forward(seed, n, d, dtype, scope):
    q, k, v = random_qkv(seed, (2, n, 2, d), dtype)
    nq, nk = -(-n // 64), -(-n // 32)
    lut = random_lut(seed + 1, 2, 2, nq, nk, 3)
    ref = branches(q, k, v, lut, block_q=64, block_k=32, linear_scope=scope, backend="reference")
    out = branches(q, k, v, lut, block_q=64, block_k=32, linear_scope=scope, backend="xla")
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for o, r in zip(out, ref):
        assert o.dtype == dtype and o.shape == q.shape
        assert rel_err(o, r) < tol


@pytest.mark.parametrize("n,d", [(333, 64), (160, 128)])
@pytest.mark.parametrize("scope", ["complement", "all"])
def test_xla_gradients_equal_reference(seed, n, d, scope):
    q, k, v = random_qkv(seed, (1, n, 2, d))
    lut = random_lut(seed + 1, 1, 2, -(-n // 64), -(-n // 32), 2)
    g_s, g_l = jax.random.normal(jax.random.PRNGKey(seed + 2), (2, *q.shape))

    def loss(backend, q, k, v):
        o_s, o_l = sla.sparse_linear_branches(q, k, v, lut, block_q=64, block_k=32, linear_scope=scope,
                                              backend=backend)
        return jnp.sum(o_s * g_s) + jnp.sum(o_l * g_l)

    ref = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2)))(q, k, v)
    out = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2)))(q, k, v)
    for name, o, r in zip("qkv", out, ref):
        assert rel_err(o, r) < 1e-4, name


def test_all_blocks_selected_equals_dense(seed):
    q, k, v = random_qkv(seed, (1, 300, 3, 64))
    lut = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (1, 3, 5, 10))
    dense = dense_attention(q, k, v)
    for backend in ("reference", "xla"):
        o_s, o_l = branches(q, k, v, lut, block_q=64, block_k=32, backend=backend)
        assert rel_err(o_s, dense) < 1e-5
        assert float(jnp.max(jnp.abs(o_l))) == 0.0
    cfg = sla.SLA2Config(block_q=64, block_k=32, topk_ratio=1.0, backend="xla")
    assert rel_err(jax.jit(functools.partial(sla.sla2_attention, config=cfg))(q, k, v), dense) < 1e-4


def test_dense_attention_chunked_equals_unchunked(seed):
    q, k, v = random_qkv(seed, (2, 130, 2, 32))
    full = dense_attention(q, k, v)
    chunked = dense_attention(q, k, v, chunk_size=16)
    assert rel_err(chunked, full) < 1e-6
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32)
    expect = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    assert rel_err(full, expect) < 1e-5
    g1 = jax.jit(jax.grad(lambda q: jnp.sum(sla.dense_attention(q, k, v, chunk_size=16) ** 2)))(q)
    g2 = jax.jit(jax.grad(lambda q: jnp.sum(sla.dense_attention(q, k, v) ** 2)))(q)
    assert rel_err(g1, g2) < 1e-5


def test_xla_sparse_chunking_does_not_change_result(seed):
    from sla2_jax.xla_backend import xla_sparse
    q, k, v = random_qkv(seed, (1, 300, 2, 32))
    lut = random_lut(seed + 1, 1, 2, 10, 10, 3)
    a = xla_sparse(q, k, v, lut, block_q=32, block_k=32, scale=0.2, chunk_blocks=3)
    b = xla_sparse(q, k, v, lut, block_q=32, block_k=32, scale=0.2, chunk_blocks=10)
    assert rel_err(a, b) < 1e-6


def test_sla2_attention_jits_and_matches_eager(seed):
    q, k, v = random_qkv(seed, (1, 333, 2, 64), jnp.bfloat16)
    cfg = sla.SLA2Config(block_q=64, block_k=32, topk_ratio=0.2, backend="xla")
    eager = sla.sla2_attention(q, k, v, config=cfg)
    jitted = jax.jit(lambda q, k, v: sla.sla2_attention(q, k, v, config=cfg))(q, k, v)
    assert jitted.dtype == jnp.bfloat16
    assert rel_err(jitted, eager) < 1e-2
    ref = sla.sla2_attention(q, k, v, config=cfg.replace(backend="reference"))
    assert rel_err(jitted, ref) < 1e-2
