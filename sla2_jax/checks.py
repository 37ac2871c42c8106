"""Input validation shared by the public functions and every backend: fail early with a ValueError naming the
argument.

What is accepted does not depend on the backend: q, k, v (B, N, H, D) of equal shape and one dtype (bfloat16,
float16 or float32), any N >= 1 and any head dim D >= 1, alpha broadcastable to (B, H, Nq) with values in [0, 1].
Where the Pallas kernels cannot run an accepted call (head dim not in {32, 64, 128}, block sizes outside
[16, 256]), ``backends.kernel_unsupported_reason`` says why: "auto" then runs it on "xla" with a warning and an
explicit "pallas" raises ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sla2_jax.config import is_power_of_two

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_qkv(q, k, v) -> tuple[int, int, int, int]:
    """Checks q, k, v are (B, N, H, D) with equal shapes and one supported dtype; returns (B, N, H, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be a 4-D array (B, N, H, D); got shape {getattr(x, 'shape', None)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; supported: bfloat16, float16, float32")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must have one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype} "
                         "(cast them, e.g. k.astype(q.dtype))")
    if k.shape != q.shape:
        raise ValueError(f"k shape {k.shape} must equal q shape {q.shape}")
    if v.shape != q.shape:
        raise ValueError(f"v shape {v.shape} must equal q shape {q.shape}")
    batch, seq_len, heads, head_dim = q.shape
    if seq_len < 1:
        raise ValueError(f"q has sequence length {seq_len}; it must be >= 1")
    if head_dim < 1:
        raise ValueError(f"head_dim (q.shape[-1]) = {head_dim}; it must be >= 1")
    return batch, seq_len, heads, head_dim


def check_block_size(name: str, value) -> None:
    if not is_power_of_two(value) or value < 16:
        raise ValueError(f"{name}={value!r} must be a power of two >= 16")


def check_lut(lut, batch: int, heads: int, num_q_blocks: int, num_k_blocks: int) -> int:
    """Checks the LUT is int (B, H, Nq, k) with 1 <= k <= Nk; returns k."""
    if getattr(lut, "ndim", None) != 4:
        raise ValueError(f"lut must be a 4-D int array (B, H, Nq, k); got shape {getattr(lut, 'shape', None)}")
    if not jnp.issubdtype(lut.dtype, jnp.integer):
        raise ValueError(f"lut must have an integer dtype; got {lut.dtype}")
    if lut.shape[:3] != (batch, heads, num_q_blocks):
        raise ValueError(
            f"lut shape {lut.shape} does not match (B, H, Nq) = {(batch, heads, num_q_blocks)} of q")
    topk = lut.shape[3]
    if not 1 <= topk <= num_k_blocks:
        raise ValueError(f"lut selects {topk} key blocks per query block; must be in [1, Nk={num_k_blocks}]")
    return topk


def check_weight(name: str, w, heads: int, head_dim: int) -> None:
    """Router weights are (D, D) shared by the heads or (H, D, D) per head."""
    if w is None:
        return
    if tuple(w.shape) not in ((head_dim, head_dim), (heads, head_dim, head_dim)):
        raise ValueError(f"{name} must have shape (D, D) = {(head_dim, head_dim)} or (H, D, D); got {w.shape}")


def check_alpha(alpha, batch: int, heads: int, num_q_blocks: int) -> None:
    """alpha must broadcast to (B, H, Nq) and, when its values are known (a number or a concrete array, not a
    tracer inside jit / grad), lie in [0, 1]."""
    if alpha is None:
        return
    if not isinstance(alpha, jax.core.Tracer):
        values = np.asarray(alpha, np.float32)
        if values.size and not (np.all(values >= 0.0) and np.all(values <= 1.0)):
            bad = values[~((values >= 0.0) & (values <= 1.0))].ravel()[0]
            raise ValueError(f"alpha must lie in [0, 1]; got a value {bad} (alpha is the weight of the sparse branch)")
    shape = tuple(jnp.shape(alpha))
    target = (batch, heads, num_q_blocks)
    try:
        out = jnp.broadcast_shapes(shape, target)
    except ValueError:
        out = None
    if out != target:
        raise ValueError(f"alpha shape {shape} does not broadcast to (B, H, Nq) = {target}")
