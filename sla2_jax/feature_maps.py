"""Feature maps phi of the linear branch, applied row-wise over the head dim."""

from __future__ import annotations

import jax
import jax.numpy as jnp

FEATURE_MAP_KINDS = ("softmax", "elu", "relu")


def feature_map_f32(x32, kind: str):
    """phi(x) of a float32 array (..., D), float32 out; the one formula used by XLA and by the Pallas prep kernel."""
    if kind == "softmax":
        return jax.nn.softmax(x32, axis=-1)
    if kind == "elu":
        return jax.nn.elu(x32) + 1.0
    if kind == "relu":
        return jax.nn.relu(x32)
    raise ValueError(f"feature_map={kind!r} is not one of {FEATURE_MAP_KINDS}")


def feature_map(x, kind: str):
    """phi(x) for x (..., D), computed in float32 and returned in x.dtype.

    kind: "softmax" (softmax over D), "elu" (elu(x) + 1) or "relu".
    """
    return feature_map_f32(x.astype(jnp.float32), kind).astype(x.dtype)
