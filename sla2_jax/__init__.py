"""sla2_jax: SLA2 (sparse-linear attention with learnable routing and QAT) and SLA in JAX / Flax NNX.

Public API: SLA2Config, dense_attention, block_scores, topk_blocks, soft_topk, sparse_linear_branches, combine,
sla2_attention, SLA2Attention, SLAAttention, SelfAttention, context_parallel_attention, kept_mass_report (how
much softmax mass the best key blocks hold in your model, to choose the sparsity) and tile_order (video tokens in
space-time cubes, so that a block is a cube). All attention tensors are (B, N, H, D). The guide: docs/guide.md.
"""

from sla2_jax.backends import resolve_backend
from sla2_jax.branches import sparse_linear_branches
from sla2_jax.combine import alpha_from_mass, combine, sla_v1_combine
from sla2_jax.config import SLA2Config
from sla2_jax.context_parallel import context_parallel_attention
from sla2_jax.dense import dense_attention
from sla2_jax.diagnostics import block_attention_mass, format_kept_mass, kept_mass_report
from sla2_jax.feature_maps import feature_map
from sla2_jax.functional import route, sla2_attention
from sla2_jax.modules import ContextParallel, SelfAttention, SLA2Attention, SLAAttention
from sla2_jax.quant import fake_quant_fp8, fake_quant_int8_blocks, quantize_int8_blocks
from sla2_jax.routing import block_scores, captured_mass, pool_blocks, selection_mask, smooth_keys, soft_topk, topk_blocks
from sla2_jax.token_order import tile_order

__all__ = [
    "SLA2Config", "dense_attention", "block_scores", "topk_blocks", "soft_topk", "selection_mask",
    "captured_mass", "pool_blocks", "smooth_keys", "sparse_linear_branches", "combine", "alpha_from_mass",
    "sla_v1_combine", "sla2_attention", "route", "SLA2Attention", "SLAAttention", "SelfAttention", "ContextParallel",
    "context_parallel_attention", "kept_mass_report", "format_kept_mass", "block_attention_mass", "feature_map", "fake_quant_int8_blocks", "fake_quant_fp8", "quantize_int8_blocks", "resolve_backend",
    "tile_order",
]
__version__ = "0.1.0"
