"""Synthetic attention inputs for demos and benchmarks (never zeros): one definition, in the library's quickstart
(which ships in the wheel)."""

from sla2_jax.quickstart import random_qkv, structured_qkv  # noqa: F401
