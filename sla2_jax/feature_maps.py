"""Feature maps phi of the linear branch, applied row-wise over the head dim."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def feature_map(x, kind: str):
    """phi(x) for x (..., D), computed in float32 and returned in x.dtype.

    kind: "softmax" (softmax over D), "elu" (elu(x) + 1) or "relu".
    """
    x32 = x.astype(jnp.float32)
    if kind == "softmax":
        y = jax.nn.softmax(x32, axis=-1)
    elif kind == "elu":
        y = jax.nn.elu(x32) + 1.0
    elif kind == "relu":
        y = jax.nn.relu(x32)
    else:
        raise ValueError(f"feature_map={kind!r} is not one of ('softmax', 'elu', 'relu')")
    return y.astype(x.dtype)
