"""Pallas GPU kernels of SLA / SLA2 attention: the forward and backward of the sparse (LUT) and linear branches,
a low-bit (INT8 / FP8) forward, and the router front end. Imports nothing from ``sla2_jax``.

Where things are:
  attention.py        the dispatcher and the custom_vjps; the entry points below
  config.py           KernelConfig (every kernel choice), heuristic_config(), the Triton launch tables
  mosaic_forward.py   the forward kernel on Hopper (Mosaic GPU); triton_forward.py elsewhere
  mosaic_dq.py, mosaic_dkv.py   the backward's loops on Hopper; triton_backward.py elsewhere
  linear_states.py    the linear branch's states and the transposed LUT; front_end.py the router front end
  quantize.py, common.py        leaves: INT8 / FP8 quantisation; shapes, loads, stores, validation
"""

from . import _triton  # noqa: F401  (filters the Triton-backend DeprecationWarning first)
from .attention import (
    key_block_sums,
    sla2_fused_attention,
    sla2_fused_attention_lowbit,
    sparse_linear_attention,
    sparse_linear_attention_lowbit,
)
from .config import KernelConfig, gpu_generation, heuristic_config, mosaic_supports
from .quantize import QUANT_MODES, QuantisedKeys, QuantisedQueries

__all__ = [
    "sparse_linear_attention",
    "sla2_fused_attention",
    "sparse_linear_attention_lowbit",
    "sla2_fused_attention_lowbit",
    "key_block_sums",
    "KernelConfig",
    "heuristic_config",
    "gpu_generation",
    "mosaic_supports",
    "QUANT_MODES",
    "QuantisedKeys",
    "QuantisedQueries",
]
