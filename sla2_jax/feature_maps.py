"""Feature maps phi of the linear branch, applied row-wise over the head dim."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

FEATURE_MAP_KINDS = ("softmax", "elu", "relu")


def _rows(x, like):
    """x (...,) broadcast over the last axis of like (..., D)."""
    return lax.broadcast_in_dim(x, like.shape, tuple(range(like.ndim - 1)))


# The formulas below use only operations every backend lowers (XLA, Pallas Triton, Pallas Mosaic GPU, which has
# no expm1 and no keepdims reductions): the kernels apply these same functions to their tiles.
def softmax_phi(x32):
    """softmax over the head dim of a float32 array (..., D), shifted by the row max as jax.nn.softmax (the shift's
    gradient is zero up to rounding: softmax is shift-invariant)."""
    e = jnp.exp(x32 - _rows(jnp.max(x32, axis=-1), x32))
    return e / _rows(jnp.sum(e, axis=-1), x32)


def elu_phi(x32):
    """elu(x) + 1 of a float32 array (..., D): x + 1 for x > 0, exp(x) otherwise."""
    return jnp.where(x32 > 0, x32 + 1.0, jnp.exp(jnp.minimum(x32, 0.0)))


def relu_phi(x32):
    """relu(x) of a float32 array (..., D) (gradient 0 at 0, as jax.nn.relu)."""
    return jnp.where(x32 > 0, x32, 0.0)


# Each map's vjp written out, as a ``vjp(x32, d_phi32) -> dx32`` attribute of the map: autodiff's vjp of the formulas
# above uses operations Pallas Mosaic GPU does not lower (add_any, keepdims reshapes), so the Mosaic backward kernels
# that apply phi's vjp in their epilogue take these. Equal to jax.vjp of the maps except where autodiff splits a tie
# (elu at exactly 0: 1 here, the continuous derivative; autodiff of the min gives 0.5).
def _softmax_phi_vjp(x32, d_phi32):
    p = softmax_phi(x32)
    return p * (d_phi32 - _rows(jnp.sum(p * d_phi32, axis=-1), x32))


def _elu_phi_vjp(x32, d_phi32):
    return jnp.where(x32 > 0, d_phi32, d_phi32 * jnp.exp(jnp.minimum(x32, 0.0)))


def _relu_phi_vjp(x32, d_phi32):
    return jnp.where(x32 > 0, d_phi32, 0.0)


softmax_phi.vjp = _softmax_phi_vjp
elu_phi.vjp = _elu_phi_vjp
relu_phi.vjp = _relu_phi_vjp

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
