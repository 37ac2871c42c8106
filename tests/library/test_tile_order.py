"""sla2_jax.tile_order: video tokens in space-time cubes, so that a block of consecutive tokens is one cube."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sla2_jax as sla


def test_tile_order_is_a_permutation_of_cubes_and_its_inverse_undoes_it():
    grid, tile = (8, 12, 16), (4, 4, 4)
    perm, inverse = sla.tile_order(grid, tile)
    n = 8 * 12 * 16
    assert perm.shape == inverse.shape == (n,) and perm.dtype == inverse.dtype == np.int32
    assert sorted(perm.tolist()) == list(range(n))
    assert (perm[inverse] == np.arange(n)).all() and (inverse[perm] == np.arange(n)).all()
    for start in range(0, n, 64):  # every 64-token block (b_k = 64) is one 4 x 4 x 4 cube
        t, h, w = np.unravel_index(perm[start : start + 64], grid)
        assert {max(x) - min(x) for x in (t, h, w)} == {3} and len(set(zip(t, h, w))) == 64
        assert min(t) % 4 == 0 and min(h) % 4 == 0 and min(w) % 4 == 0


def test_dense_attention_is_unchanged_by_the_order():
    """Permuting q, k, v into tile order and the output back gives dense attention's output (attention is
    permutation-equivariant): the order only changes which tokens share a block."""
    grid = (4, 4, 8)
    perm, inverse = sla.tile_order(grid, (2, 2, 4))
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 128, 2, 16))
    o = sla.dense_attention(q, k, v)
    o_tiles = sla.dense_attention(q[:, perm], k[:, perm], v[:, perm])[:, inverse]
    assert float(jnp.max(jnp.abs(o - o_tiles))) < 1e-5


@pytest.mark.parametrize("grid, tile, word", [
    ((4, 8, 8), (3, 4, 4), "not divisible by tile"),
    ((4, 8, 8), (0, 4, 4), "positive ints"),
    ((4, 8), (4, 4, 4), "positive ints"),
])
def test_bad_grid_or_tile_raises_value_error(grid, tile, word):
    with pytest.raises(ValueError, match=word):
        sla.tile_order(grid, tile)
