"""Token orders of a video DiT's sequence: which tokens share an attention block.

Block-sparse attention groups consecutive tokens into blocks (b_q queries, b_k keys). In the raster order (t, h, w)
of a (T, H, W) token grid a block of 64 tokens is a strip of image rows of one frame; in the "tiles" order the grid
is cut into (tt, th, tw) cubes, laid out in raster order of cubes, each cube's tokens in raster order inside it, so a
block of tt * th * tw tokens is one space-time cube (as video block-sparse methods such as VSA do). A model whose
position embeddings are added per token before the permutation computes the same function in either order.
"""

from __future__ import annotations

import functools

import numpy as np

from sla2_jax import tile_order
from sla2_jax.token_order import check_triple

TOKEN_ORDERS = ("raster", "tiles")


def check_tile(grid, tile) -> None:
    """ValueError unless `tile` is three positive ints that divide the token grid (T, H, W) axis by axis (grid
    None: the ints only)."""
    check_triple("tile", tile)
    if grid is not None:
        tile_order(grid, tile)


def tile_permutation(grid, tile=(4, 4, 4)) -> np.ndarray:
    """Indices (N,) into the raster-ordered tokens of `grid` that put them in tile order: x_tiles = x[:, perm]
    (``sla2_jax.tile_order``)."""
    return tile_order(grid, tile)[0]


@functools.lru_cache(maxsize=16)
def permutation(grid: tuple, order: str, tile: tuple = (4, 4, 4)):
    """(perm, inverse) for `order` ("raster": None, None), so that x[:, perm] is in `order` and y[:, inverse] is
    back in raster order. Cached: grid and tile are tuples; do not modify the returned arrays."""
    if order not in TOKEN_ORDERS:
        raise ValueError(f"token_order={order!r} must be one of {TOKEN_ORDERS}")
    if order == "raster":
        return None, None
    return tile_order(grid, tile)


def order_name(order: str, tile=(4, 4, 4)) -> str:
    """"raster" or e.g. "tiles 4x4x4" (how reports name an order)."""
    return order if order == "raster" else f"{order} {'x'.join(str(n) for n in tile)}"
