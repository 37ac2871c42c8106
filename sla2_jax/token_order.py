"""Token order for block-sparse attention over video: which tokens share a block.

SLA2 routes whole blocks of consecutive tokens (b_q queries, b_k keys). For a video DiT whose tokens come in raster
order (t, h, w), a 64-token block is a strip of image rows of one frame, so a query that attends to its neighbours
in other frames needs one key block per frame. In tile order the (T, H, W) token grid is cut into cubes of
tile = (t, h, w) tokens (cubes in raster order, tokens in raster order inside each cube), and a block of
t * h * w tokens is one space-time cube. Permute after the position embeddings and undo the permutation before
unpatchify: a dense model then computes the same function, and its attention is sparser per block.
"""

from __future__ import annotations

import numpy as np


def check_triple(name: str, value) -> tuple:
    """value as a tuple of three positive ints (t, h, w) in tokens; ValueError naming `name` otherwise."""
    value = tuple(value)
    if len(value) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in value):
        raise ValueError(f"{name}={value!r} must be three positive ints (t, h, w) in tokens")
    return value


def tile_order(grid, tile=(4, 4, 4)):
    """(perm, inverse): int32 numpy arrays (N,) with N = T * H * W for a token grid (T, H, W) in raster order.

    x[:, perm] puts the tokens of x (B, N, ...) in tile order; y[:, inverse] puts them back. tile: three positive
    ints (t, h, w) in tokens that divide the grid axis by axis (ValueError otherwise); with b_k = 64 the default
    4 x 4 x 4 makes every key block one cube.
    """
    grid, tile = check_triple("grid", grid), check_triple("tile", tile)
    if any(g % n for g, n in zip(grid, tile)):
        raise ValueError(f"token grid (t, h, w) = {grid} is not divisible by tile {tile}; choose a tile that divides "
                         "every axis of the grid")
    (T, H, W), (a, b, c) = grid, tile
    idx = np.arange(T * H * W, dtype=np.int32).reshape(T // a, a, H // b, b, W // c, c)
    perm = idx.transpose(0, 2, 4, 1, 3, 5).reshape(-1)
    return perm, np.argsort(perm).astype(np.int32)
