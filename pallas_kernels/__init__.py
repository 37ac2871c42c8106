"""Pallas GPU kernels (Triton backend) for SLA / SLA2 sparse + linear attention.

On a non-GPU default backend the same kernels run in Pallas interpret mode (``interpret=None``).
The Triton backend's DeprecationWarning (jax >= 0.11) is filtered once, in ``_triton``.
"""

from . import _triton  # noqa: F401  (filters the Triton-backend DeprecationWarning first)
from .launch_config import gpu_generation
from .sparse_linear import sla2_fused_attention, sparse_linear_attention

__all__ = ["sparse_linear_attention", "sla2_fused_attention", "gpu_generation"]
