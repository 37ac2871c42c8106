"""The one place that imports the Pallas Triton backend.

The Triton backend of Pallas is deprecated upstream since jax 0.11 (it still works in 0.10-0.12); its
DeprecationWarning is filtered here, once, so that importing ``pallas_kernels`` stays quiet.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

# Later uses of deprecated names inside jax.experimental.pallas.triton may warn again at call time.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\.experimental\.pallas.*")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\._src\.pallas.*")

CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

__all__ = ["pl", "plgpu", "CompilerParams"]
