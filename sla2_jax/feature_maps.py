"""Feature maps phi of the linear branch, applied row-wise over the head dim."""

from __future__ import annotations

import jax
import jax.numpy as jnp

FEATURE_MAP_KINDS = ("softmax", "elu", "relu")


def softmax_phi(x32):
    """softmax over the head dim of a float32 array (..., D)."""
    return jax.nn.softmax(x32, axis=-1)


def elu_phi(x32):
    """elu(x) + 1 of a float32 array (..., D)."""
    return jax.nn.elu(x32) + 1.0


def relu_phi(x32):
    """relu(x) of a float32 array (..., D)."""
    return jax.nn.relu(x32)


# One function object per kind: the Pallas front end takes it as a static argument (part of its jit cache key).
PHI_FUNCTIONS = {"softmax": softmax_phi, "elu": elu_phi, "relu": relu_phi}


def phi_function(kind: str):
    """The float32 feature map function of a kind name ("softmax", "elu", "relu")."""
    if kind not in PHI_FUNCTIONS:
        raise ValueError(f"feature_map={kind!r} is not one of {FEATURE_MAP_KINDS}")
    return PHI_FUNCTIONS[kind]


def feature_map_f32(x32, kind: str):
    """phi(x) of a float32 array (..., D), float32 out; the one formula used by XLA and by the Pallas front end."""
    return phi_function(kind)(x32)


def feature_map(x, kind: str):
    """phi(x) for x (..., D), computed in float32 and returned in x.dtype.

    kind: "softmax" (softmax over D), "elu" (elu(x) + 1) or "relu".
    """
    return feature_map_f32(x.astype(jnp.float32), kind).astype(x.dtype)
