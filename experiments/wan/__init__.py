"""Wan2.1 text-to-video diffusion transformer in Flax NNX, with swappable SLA / SLA2 self-attention.

- `model`: `WanConfig` (1.3B and 14B presets), `WanModel`, the scanned forward used by the benchmark.
- `loading`: weights from / to the official Wan2.1 safetensors layout (`blocks.0.self_attn.q.weight`, ...) and
  diffusers' layout (`transformer/diffusion_pytorch_model*.safetensors` with its shard index and config.json).
- `safetensors_io`: a small pure-numpy reader and writer of the safetensors format.
- `sampling`: Wan's sampler: flow matching on the shifted schedule, classifier-free guidance, UniPC or Euler.
- `benchmark`: `python -m experiments.wan.benchmark --out DIR`, whole guided videos, dense vs SLA2.
- `make_parity_fixtures`: writes the test fixtures from diffusers (run under torch + diffusers, outside this
  project's environment); tests/experiments/test_wan_diffusers_parity.py holds the port to them.
"""

from experiments.wan.model import WanConfig, WanModel, wan_1_3b, wan_14b

__all__ = ["WanConfig", "WanModel", "wan_1_3b", "wan_14b"]
