"""`SLA2Config`: the static settings of SLA2 / SLA attention, validated on creation."""

from __future__ import annotations

import dataclasses
import math

FEATURE_MAPS = ("softmax", "elu", "relu")
LINEAR_SCOPES = ("complement", "all")
ALPHA_MODES = ("block", "head", "mass")
QUANT_MODES = ("none", "int8", "int8_fp8")
BACKENDS = ("auto", "pallas", "xla", "reference")


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {choices}")


@dataclasses.dataclass(frozen=True)
class SLA2Config:
    """Static configuration of SLA2 attention (hashable, so it can be a jit static argument).

    Attributes:
      block_q: query rows per block (b_q), a power of two >= 16.
      block_k: key rows per block (b_k), a power of two >= 16.
      topk_ratio: fraction of key blocks each query block attends exactly, in (0, 1];
        sparsity = 1 - topk_ratio; k = max(1, floor(topk_ratio * Nk)).
      feature_map: phi of the linear branch: "softmax" (over the head dim), "elu" (elu+1) or "relu".
      linear_scope: "complement" (linear attention over the unselected blocks, the paper's form)
        or "all" (over all keys, the SLA `main` branch).
      alpha: granularity of the learnable mixing ratio: "block" (H x Nq, needs seq_len),
        "head" (H) or "mass" (follows the router's captured softmax mass).
      quant: "none", "int8" (Q and smoothed K in INT8 for the sparse branch) or "int8_fp8"
        (additionally P and V in float8_e4m3fn).
      backend: "auto" (pallas on GPU, xla elsewhere), "pallas", "xla" or "reference".
      soft_topk_tau: temperature of the soft top-k used to train the router.
      eps: added to the linear branch's denominator.
      kernel: a ``pallas_kernels.KernelConfig`` (which kernels and launch parameters the pallas backend uses),
        or None for the measured defaults of the call's shape and GPU (``pallas_kernels.heuristic_config``).
    """

    block_q: int = 128
    block_k: int = 64
    topk_ratio: float = 0.05
    feature_map: str = "softmax"
    linear_scope: str = "complement"
    alpha: str = "block"
    quant: str = "none"
    backend: str = "auto"
    soft_topk_tau: float = 0.1
    eps: float = 1e-6
    kernel: object = None

    def __post_init__(self):
        for field in ("block_q", "block_k"):
            value = getattr(self, field)
            if not is_power_of_two(value) or value < 16:
                raise ValueError(f"{field}={value!r} must be a power of two >= 16")
        ratio = self.topk_ratio
        if not isinstance(ratio, (int, float)) or not (0.0 < ratio <= 1.0) or math.isnan(ratio):
            raise ValueError(f"topk_ratio={ratio!r} must be in (0, 1]")
        _check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        _check_choice("linear_scope", self.linear_scope, LINEAR_SCOPES)
        _check_choice("alpha", self.alpha, ALPHA_MODES)
        _check_choice("quant", self.quant, QUANT_MODES)
        _check_choice("backend", self.backend, BACKENDS)
        if not self.soft_topk_tau > 0:
            raise ValueError(f"soft_topk_tau={self.soft_topk_tau!r} must be > 0")
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps!r} must be > 0")
        if self.kernel is not None:
            from sla2_jax.backends import check_kernel_config  # imports pallas_kernels only for a given kernel

            check_kernel_config(self.kernel)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.topk_ratio

    def num_selected(self, num_key_blocks: int) -> int:
        """k = max(1, floor(topk_ratio * Nk)), never more than Nk."""
        return min(num_key_blocks, max(1, int(math.floor(self.topk_ratio * num_key_blocks + 1e-9))))

    def replace(self, **changes) -> "SLA2Config":
        return dataclasses.replace(self, **changes)
