"""Non-finite inputs, as in dense attention: a NaN / Inf in one query row damages only that row's output on every
backend (the router's block means, the captured mass and alpha of the other rows of its block stay finite); a NaN
in K or V reaches every output row, as it does in dense attention (docs/guide.md, "Non-finite inputs")."""

import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla
from helpers import random_qkv

CFG = sla.SLA2Config(block_q=32, block_k=16, topk_ratio=0.3, alpha="mass")
SHAPE = (1, 100, 2, 32)
ROW, HEAD = 37, 1  # inside query block 1 (rows 32..63)


def _bad_rows(o):
    """(row, head) pairs of o (B=1) with a non-finite entry."""
    return [tuple(p) for p in np.argwhere(~np.isfinite(np.asarray(o, np.float32)).all(axis=-1))[:, 1:]]


@pytest.mark.parametrize("backend, quant", [("xla", "none"), ("reference", "none"), ("pallas", "none"),
                                            ("xla", "int8"), ("pallas", "int8")])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_query_row_damages_only_its_own_output_row(backend, quant, value):
    q, k, v = random_qkv(0, SHAPE)
    cfg = CFG.replace(backend=backend, quant=quant)
    bad_q = q.at[0, ROW, HEAD, 5].set(value)
    assert _bad_rows(sla.dense_attention(bad_q, k, v)) == [(ROW, HEAD)]  # what dense attention does
    clean, out = sla.sla2_attention(q, k, v, config=cfg), sla.sla2_attention(bad_q, k, v, config=cfg)
    assert _bad_rows(out) == [(ROW, HEAD)]
    # the other rows: as without the bad row, up to the block mean that no longer counts it
    others = np.ones(SHAPE[1], bool)
    others[ROW] = False
    np.testing.assert_allclose(np.asarray(out)[0, others], np.asarray(clean)[0, others], atol=2e-3)
    untouched = np.ones(SHAPE[1], bool)
    untouched[32:64] = False  # other query blocks: bit for bit (xla, reference) or within rounding (kernels)
    np.testing.assert_allclose(np.asarray(out)[0, untouched], np.asarray(clean)[0, untouched], atol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_router_mass_stays_finite_for_the_block_of_a_nan_query_row(backend):
    q, k, _ = random_qkv(1, SHAPE)
    bad_q = q.at[0, ROW, HEAD].set(jnp.nan)  # the whole row
    lut, _, mass = sla.route(bad_q, k, CFG.replace(backend=backend))
    assert np.isfinite(np.asarray(mass)).all()
    lut_xla, _, mass_xla = sla.route(bad_q, k, CFG.replace(backend="xla"))
    np.testing.assert_array_equal(lut, lut_xla)
    np.testing.assert_allclose(mass, mass_xla, rtol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("tensor", ["k", "v"])
def test_nan_in_k_or_v_reaches_every_row_as_in_dense_attention(backend, tensor):
    q, k, v = random_qkv(2, SHAPE)
    if tensor == "k":
        k = k.at[0, 50, HEAD, 0].set(jnp.nan)
    else:
        v = v.at[0, 50, HEAD, 0].set(jnp.nan)
    every_row_of_head = [(n, HEAD) for n in range(SHAPE[1])]
    assert _bad_rows(sla.dense_attention(q, k, v)) == every_row_of_head
    assert _bad_rows(sla.sla2_attention(q, k, v, config=CFG.replace(backend=backend))) == every_row_of_head
