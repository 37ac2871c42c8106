"""Block layout helpers: (B, N, H, D) <-> (B, H, Nb, block, D), ragged N padded with zeros."""

from __future__ import annotations

import jax.numpy as jnp


def num_blocks(seq_len: int, block: int) -> int:
    """ceil(seq_len / block)."""
    return -(-seq_len // block)


def to_blocks(x, block: int):
    """(B, N, H, D) -> (B, H, Nb, block, D); rows past N are zero."""
    batch, seq_len, heads, dim = x.shape
    nb = num_blocks(seq_len, block)
    x = jnp.pad(x, ((0, 0), (0, nb * block - seq_len), (0, 0), (0, 0)))
    return x.reshape(batch, nb, block, heads, dim).transpose(0, 3, 1, 2, 4)


def from_blocks(x, seq_len: int):
    """(B, H, Nb, block, D) -> (B, N, H, D), dropping the padded rows."""
    batch, heads, nb, block, dim = x.shape
    x = x.transpose(0, 2, 3, 1, 4).reshape(batch, nb * block, heads, dim)
    return x[:, :seq_len]


def valid_rows(seq_len: int, block: int):
    """Bool (Nb, block): True where the row index is < seq_len."""
    nb = num_blocks(seq_len, block)
    return (jnp.arange(nb * block) < seq_len).reshape(nb, block)


def block_counts(seq_len: int, block: int):
    """Float32 (Nb,): number of valid rows of each block (the last one may be partial)."""
    return valid_rows(seq_len, block).sum(-1).astype(jnp.float32)


def expand_blocks(x, block: int, seq_len: int):
    """Per-block values (B, H, Nb) -> per-row values (B, N, H, 1), for broadcasting onto (B, N, H, D)."""
    rows = jnp.repeat(x, block, axis=-1)[..., :seq_len]  # (B, H, N)
    return jnp.moveaxis(rows, -1, 1)[..., None]
