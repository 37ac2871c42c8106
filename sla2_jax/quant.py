"""Fake quantisation with straight-through gradients for the low-bit sparse branch (SPEC section 5).

Forward: quantise-dequantise; backward: identity (the gradient flows as if no quantisation happened).
These functions are the reference that the real INT8/FP8 kernels are held to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sla2_jax.blocks import from_blocks, to_blocks

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def straight_through(x, x_quantised):
    """x_quantised in the forward pass, identity gradient to x in the backward pass."""
    return x + jax.lax.stop_gradient(x_quantised - x)


def int8_block_scales(x, block: int):
    """Per (batch, head, block) scales amax/127: (B, N, H, D) -> (B, H, Nb) float32 (never 0). The amax is over
    the block's finite rows: a row with a NaN / Inf entry does not set the scale of the other rows."""
    blocks = jnp.abs(to_blocks(x.astype(jnp.float32), block))
    finite = jnp.all(jnp.isfinite(blocks), axis=-1, keepdims=True)
    amax = jnp.max(jnp.where(finite, blocks, 0.0), axis=(3, 4))
    return jnp.maximum(amax, 1e-12) / INT8_MAX


def quantize_int8_blocks(x, block: int):
    """x (B, N, H, D) -> (int8 values (B, N, H, D), float32 scales (B, H, Nb)); round half to even, clip to 127."""
    scales = int8_block_scales(x, block)
    xb = to_blocks(x.astype(jnp.float32), block) / scales[..., None, None]
    q = jnp.clip(jnp.round(xb), -INT8_MAX, INT8_MAX)
    return from_blocks(q, x.shape[1]).astype(jnp.int8), scales


def fake_quant_int8_blocks(x, block: int):
    """INT8 quantise-dequantise with one scale per (batch, head, block), straight-through; (B, N, H, D), x.dtype."""
    scales = int8_block_scales(jax.lax.stop_gradient(x), block)
    xb = to_blocks(x.astype(jnp.float32), block)
    dq = jnp.clip(jnp.round(xb / scales[..., None, None]), -INT8_MAX, INT8_MAX) * scales[..., None, None]
    dq = from_blocks(dq, x.shape[1])
    return straight_through(x.astype(jnp.float32), dq).astype(x.dtype)


def fake_quant_fp8(x, scale=1.0):
    """float8_e4m3fn quantise-dequantise of x / scale (values beyond +-448 saturate), straight-through; x.dtype."""
    x32 = x.astype(jnp.float32)
    y = jnp.clip(x32 / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale
    return straight_through(x32, y).astype(x.dtype)


def fake_quant_fp8_channels(v):
    """V in FP8 with one scale per (batch, head, channel) = amax over the sequence / 448; (B, N, H, D)."""
    amax = jnp.max(jnp.abs(jax.lax.stop_gradient(v).astype(jnp.float32)), axis=1, keepdims=True)
    return fake_quant_fp8(v, jnp.maximum(amax, 1e-12) / FP8_E4M3_MAX)


def fake_quant_probabilities(p):
    """Unnormalised probabilities in [0, 1] to FP8 with the fixed scale 1/448 (SageAttention2), straight-through."""
    return fake_quant_fp8(p, 1.0 / FP8_E4M3_MAX)
