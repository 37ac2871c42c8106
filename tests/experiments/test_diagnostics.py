"""sla2_jax.diagnostics: block attention mass and the oracle / router kept mass against a dense NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from sla2_jax import diagnostics


def _qkv(seed, n, heads=2, dim=16, batch=2):
    ks = jax.random.split(jax.random.PRNGKey(seed), 2)
    return tuple(jax.random.normal(kk, (batch, n, heads, dim), jnp.float32) * 1.5 for kk in ks)


def _numpy_block_mass(q, k, bq, bk):
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, N, H, D = q.shape
    s = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    nq, nk = -(-N // bq), -(-N // bk)
    out = np.zeros((B, H, nq, nk))
    for i in range(nq):
        for j in range(nk):
            out[:, :, i, j] = p[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk].sum(-1).mean(-1)
    return out


def test_block_attention_mass_matches_numpy_ragged():
    q, k = _qkv(0, 100)
    got = np.asarray(diagnostics.block_attention_mass(q, k, block_q=32, block_k=16))
    want = _numpy_block_mass(q, k, 32, 16)
    assert got.shape == (2, 2, 4, 7)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_kept_mass_report_matches_numpy():
    q, k = _qkv(1, 100)
    layers_q, layers_k = [q, q * 0.5], [k, k]
    rep = diagnostics.kept_mass_report(layers_q, layers_k, sparsities=(0.5, 0.75), block_q=32, block_k=16)
    assert rep["k"] == [3, 1] and rep["num_key_blocks"] == 7
    rows = np.array([32, 32, 32, 4])  # rows per query block (N = 100)
    for layer, (lq, lk) in enumerate(zip(layers_q, layers_k)):
        mass = _numpy_block_mass(lq, lk, 32, 16)
        lut = np.asarray(sla.topk_blocks(sla.block_scores(lq, lk, block_q=32, block_k=16), 1))
        for i, kk in enumerate(rep["k"]):
            oracle = np.sort(mass, -1)[..., -kk:].sum(-1)  # (B, H, Nq)
            want = (oracle * rows).sum(-1).mean() / 100
            assert rep["oracle"][layer][i] == pytest.approx(want, abs=1e-5)
        router = np.take_along_axis(mass, lut, -1).sum(-1)
        assert rep["router"][layer][1] == pytest.approx((router * rows).sum(-1).mean() / 100, abs=1e-5)
        assert all(o >= r - 1e-6 for o, r in zip(rep["oracle"][layer], rep["router"][layer]))
        assert rep["oracle"][layer][0] > rep["oracle"][layer][1]  # more blocks kept, more mass
    assert rep["mean_oracle"][0] == pytest.approx(np.mean([r[0] for r in rep["oracle"]]))
    table = diagnostics.format_kept_mass(rep)
    assert table.count("\n") == 4 and "| 50% | 3 of 7 |" in table


def test_router_weights_change_the_router_mass_only():
    q, k = _qkv(2, 64)
    base = diagnostics.kept_mass_report(q, k, sparsities=(0.75,), block_q=16, block_k=16)
    eye = diagnostics.kept_mass_report(q, k, sparsities=(0.75,), block_q=16, block_k=16, w_q=jnp.eye(16),
                                       w_k=jnp.eye(16))
    assert eye == base
    w = jax.random.normal(jax.random.PRNGKey(5), (16, 16))
    other = diagnostics.kept_mass_report(q, k, sparsities=(0.75,), block_q=16, block_k=16, w_q=w, w_k=w)
    assert other["oracle"] == base["oracle"] and other["router"] != base["router"]
    with pytest.raises(ValueError, match="sparsity"):
        diagnostics.kept_mass_report(q, k, sparsities=(1.0,), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="equal"):
        diagnostics.kept_mass_report([q], [k, k])
