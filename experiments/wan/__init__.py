"""Wan2.1 text-to-video diffusion transformer in Flax NNX, with swappable SLA / SLA2 self-attention.

- `model`: `WanConfig` (1.3B and 14B presets), `WanModel`, the scanned forward used by the benchmark.
- `loading`: weights from / to the official Wan2.1 safetensors layout (`blocks.0.self_attn.q.weight`, ...).
- `safetensors_io`: a small pure-numpy reader and writer of the safetensors format.
- `benchmark`: `python -m experiments.wan.benchmark`, one denoising step of the 1.3B shape, dense vs SLA2.
"""

from experiments.wan.model import WanConfig, WanModel, wan_1_3b, wan_14b

__all__ = ["WanConfig", "WanModel", "wan_1_3b", "wan_14b"]
