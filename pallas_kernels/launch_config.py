"""Launch configurations (num_warps, num_stages) of the Pallas kernels, one table per GPU generation.

Block sizes are not tuned here: ``block_q``/``block_k`` are the SLA blocks that define the LUT, so the kernels
tile exactly by them. Keys: (kernel, head_dim, block_q, block_k) -> (num_warps, num_stages, rows). Missing keys fall
back to ``_DEFAULT``. ``experiments/autotune_kernels.py`` measures the candidates on a GPU and rewrites the
table of that GPU's generation between the AUTOTUNE markers below.
"""

from __future__ import annotations

import contextlib

import jax

# kernel names: "fwd" (forward), "dq" (backward over the LUT), "dkv" (backward over the transposed LUT),
# "sum" (pre-pass / gradient totals: row-chunked sums of outer products)
_DEFAULT = {"fwd": (4, 2, 64), "dq": (4, 2, 64), "dkv": (4, 2, 64), "sum": (4, 2, 128)}

# AUTOTUNE-BEGIN
TABLES: dict[str, dict[tuple[str, int, int, int], tuple[int, int, int]]] = {
    "hopper": {
        ("fwd", 128, 128, 64): (8, 3, 64),
        ("dq", 128, 128, 64): (8, 2, 128),
        ("dkv", 128, 128, 64): (4, 2, 64),
        ("sum", 128, 128, 64): (4, 2, 128),
        ("fwd", 64, 128, 64): (4, 3, 64),
        ("dq", 64, 128, 64): (4, 2, 64),
        ("dkv", 64, 128, 64): (4, 2, 64),
    },
    "ampere": {},
    "other": {},
}
# AUTOTUNE-END


def gpu_generation() -> str:
    """'hopper' (H100/H200/H800/GH200), 'ampere' (A100/A10/RTX 30), 'blackwell', or 'other'."""
    try:
        kind = jax.devices()[0].device_kind.lower()
    except Exception:  # pragma: no cover - no devices
        return "other"
    if any(t in kind for t in ("h100", "h200", "h800", "h20", "gh200")):
        return "hopper"
    if any(t in kind for t in ("a100", "a10", "a30", "a40", "rtx 30", "a800")):
        return "ampere"
    if any(t in kind for t in ("b200", "b100", "gb200", "rtx 50", "5090")):
        return "blackwell"
    return "other"


_OVERRIDES: dict[str, tuple[int, int, int]] = {}


@contextlib.contextmanager
def override_launch_config(**configs: tuple[int, int, int]):
    """Temporarily force configs, e.g. ``override_launch_config(fwd=(8, 3, 128))`` (read at trace time:
    use a fresh ``jax.jit`` inside the block). For the autotuner."""
    old = dict(_OVERRIDES)
    _OVERRIDES.update(configs)
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


def launch_config(
    kernel: str, head_dim: int, block_q: int, block_k: int, generation: str | None = None
) -> tuple[int, int, int]:
    """(num_warps, num_stages, rows) for ``kernel`` in {'fwd', 'dq', 'dkv', 'sum'}; rows = query rows per
    program (dq) or per loop step (dkv), a power of two <= block_q; for 'fwd' the keys per loop step
    (a multiple of block_k: LUT entries handled per online-softmax rescale); ignored by 'sum'."""
    if kernel in _OVERRIDES:
        return _OVERRIDES[kernel]
    gen = generation or gpu_generation()
    table = TABLES.get(gen, {})
    return table.get((kernel, head_dim, block_q, block_k), _DEFAULT[kernel])
