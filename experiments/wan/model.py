"""Wan2.1 text-to-video diffusion transformer in Flax NNX, with a swappable self-attention.

Structure and parameter names follow the public Wan2.1 reference (`wan/modules/model.py`, class `WanModel`)
so that `experiments.wan.loading` can map the official checkpoints one to one. Written from the paper's
description and that reference's structure; no code copied. In float32 it computes what diffusers'
`WanTransformer3DModel` computes (relative error ~1e-6; tests/experiments/test_wan_diffusers_parity.py). One
difference of interface: this model zero-pads the text context to `text_len` itself, as the official code does;
diffusers' transformer takes the context as given and its pipeline pads the prompt embeddings to 512 tokens.

    x (B, C_in, F, H, W) latent video
      -> patch_embedding (Conv3d with stride = kernel = patch, done as reshape + linear) -> (B, N, dim) tokens
      -> num_layers x WanBlock(tokens, time modulation, text context, 3D RoPE)
      -> head (LayerNorm + modulation + linear) -> unpatchify -> (B, C_out, F, H, W)

    WanBlock, with (shift, scale, gate) x 2 from `modulation + time_projection(t)`:
      x += gate_msa * self_attn(norm1(x) * (1 + scale_msa) + shift_msa)      # q, k: RMSNorm + 3D RoPE
      x += cross_attn(norm3(x), text)                                        # dense, no RoPE
      x += gate_mlp * ffn(norm2(x) * (1 + scale_mlp) + shift_mlp)

Precision follows the reference: the residual stream, the time embedding, modulation and head are float32;
the linear layers and the attention compute in `WanConfig.dtype` (bfloat16 by default).

Self-attention is chosen by `WanConfig.attention`:
  "dense": `jax.nn.dot_product_attention` (cuDNN flash attention on GPU for bf16/f16 inputs, XLA otherwise);
  "sla2":  `sla2_jax.SLA2Attention(config=WanConfig.sla_config)` (learned router params w_q, w_k and alpha);
  "sla":   `sla2_jax.SLAAttention` (SLA v1 baseline with its Proj layer).
Cross-attention to the text tokens stays dense in every mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION_MODES = ("dense", "sla", "sla2")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Static shape and precision settings of a Wan2.1 T2V transformer (hashable).

    Attributes:
      dim: model width; num_heads * head_dim.
      ffn_dim: hidden width of the feed-forward network.
      num_heads: attention heads (self- and cross-attention).
      num_layers: transformer blocks.
      patch_size: (t, h, w) patch of the latent video (Conv3d kernel = stride).
      in_dim, out_dim: latent channels in and out (16 for the Wan VAE).
      text_dim: width of the text encoder's tokens (umT5-XXL: 4096).
      freq_dim: width of the sinusoidal timestep embedding.
      text_len: text tokens; shorter contexts are zero-padded to this length, as the reference does.
      eps: epsilon of every LayerNorm and RMSNorm.
      qk_norm: RMSNorm on q and k (over the full width, before splitting heads).
      cross_attn_norm: affine LayerNorm (norm3) before cross-attention (True for the released T2V models).
      rope_theta: RoPE base.
      attention: self-attention kind, one of "dense", "sla", "sla2".
      sla_config: `sla2_jax.SLA2Config` for "sla" / "sla2" (required there, ignored for "dense").
      seq_len: video tokens, needed only by SLA2 with alpha="block" (one alpha per query block).
      dtype: compute dtype of the linear layers and attention.
      param_dtype: storage dtype of the parameters.
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    attention: str = "dense"
    sla_config: Any = None
    seq_len: int | None = None
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim={self.freq_dim} must be even")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size={self.patch_size!r} must be three positive ints (t, h, w)")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_MODES}")
        if self.attention != "dense" and self.sla_config is None:
            raise ValueError(f"attention={self.attention!r} needs sla_config (an sla2_jax.SLA2Config)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)


def wan_1_3b(**overrides) -> WanConfig:
    """Wan2.1-T2V-1.3B: dim 1536, 30 layers, 12 heads x 128, FFN 8960."""
    return WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30).replace(**overrides)


def wan_14b(**overrides) -> WanConfig:
    """Wan2.1-T2V-14B: dim 5120, 40 layers, 40 heads x 128, FFN 13824."""
    return WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40).replace(**overrides)


def latent_tokens(cfg: WanConfig, latent_shape: tuple[int, int, int]) -> int:
    """Video tokens for a latent of (frames, height, width): 21x60x104 -> 21*30*52 = 32760 for 1.3B/480p."""
    f, h, w = latent_shape
    pt, ph, pw = cfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


# --------------------------------------------------------------------------------------------------
# Small layers
# --------------------------------------------------------------------------------------------------
def _xavier():
    return nnx.initializers.xavier_uniform()


def _linear(cfg: WanConfig, d_in: int, d_out: int, rngs: nnx.Rngs, *, dtype=None, std=None) -> nnx.Linear:
    """nn.Linear with Wan's init (xavier uniform, or normal(std) for the embeddings; zero bias)."""
    init = nnx.initializers.normal(std) if std is not None else _xavier()
    return nnx.Linear(d_in, d_out, use_bias=True, kernel_init=init, dtype=dtype or cfg.dtype,
                      param_dtype=cfg.param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """Wan's RMSNorm: normalise in float32, cast back to the input dtype, times `weight` (dim,)."""

    def __init__(self, dim: int, *, eps: float, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis computed in float32; optional affine `weight`, `bias` (dim,)."""

    def __init__(self, dim: int, *, eps: float, affine: bool, param_dtype):
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Timestep embedding and 3D RoPE
# --------------------------------------------------------------------------------------------------
def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Wan's timestep embedding: t (B,) -> (B, dim) float32 = [cos(t w_j), sin(t w_j)], w_j = 10000^(-j/half)."""
    half = dim // 2
    freqs = jnp.power(10000.0, -jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex RoPE channels per axis (frames, height, width): c = head_dim/2 split as
    [c - 2*(c//3), c//3, c//3], e.g. head_dim 128 -> (22, 21, 21)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> jax.Array:
    """Rotation angles of Wan's 3D RoPE: (N, head_dim/2) float32 for N = F*H*W tokens in (f, h, w) order.

    Each axis gets its own set of frequencies theta^(-j/n_axis), j < n_axis (n_axis from `rope_split`);
    a token at (f, h, w) rotates channel pair j of the frame set by f * freq_j, and so on.
    """
    angles = []
    for axis, (size, n) in enumerate(zip(grid, rope_split(head_dim))):
        inv_freq = 1.0 / jnp.power(theta, jnp.arange(n, dtype=jnp.float32) / n)
        pos = jnp.arange(size, dtype=jnp.float32)[:, None] * inv_freq[None, :]   # (size, n)
        shape = [1, 1, 1, n]
        shape[axis] = size
        angles.append(jnp.broadcast_to(pos.reshape(shape), (*grid, n)))
    return jnp.concatenate(angles, axis=-1).reshape(-1, head_dim // 2)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate adjacent channel pairs (2j, 2j+1) of x (B, N, H, D) by angles (N, D/2); float32 result."""
    b, n, h, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, n, h, d // 2, 2)
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    real, imag = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return out.reshape(b, n, h, d)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------
def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Exact attention on (B, N, H, D) tensors: cuDNN flash attention on GPU for bf16/f16, XLA otherwise."""
    use_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if use_cudnn else None)


def make_self_attention(cfg: WanConfig, rngs: nnx.Rngs):
    """The swappable attention core: None for dense, else an sla2_jax module called as f(q, k, v) -> o."""
    if cfg.attention == "dense":
        return None
    import sla2_jax as sla  # lazy: the dense model does not need the library

    if cfg.attention == "sla2":
        return sla.SLA2Attention(cfg.num_heads, cfg.head_dim, config=cfg.sla_config, seq_len=cfg.seq_len,
                                 rngs=rngs)
    return sla.SLAAttention(cfg.num_heads, cfg.head_dim, config=cfg.sla_config, rngs=rngs)


def _init_projections(module: nnx.Module, cfg: "WanConfig", rngs: nnx.Rngs) -> None:
    """The q, k, v, o linears and the optional RMSNorms on q and k (official names) of an attention module."""
    module.num_heads, module.head_dim = cfg.num_heads, cfg.head_dim
    module.q = _linear(cfg, cfg.dim, cfg.dim, rngs)
    module.k = _linear(cfg, cfg.dim, cfg.dim, rngs)
    module.v = _linear(cfg, cfg.dim, cfg.dim, rngs)
    module.o = _linear(cfg, cfg.dim, cfg.dim, rngs)
    module.qk_norm = cfg.qk_norm
    if cfg.qk_norm:
        module.norm_q = RMSNorm(cfg.dim, eps=cfg.eps, param_dtype=cfg.param_dtype)
        module.norm_k = RMSNorm(cfg.dim, eps=cfg.eps, param_dtype=cfg.param_dtype)


class WanSelfAttention(nnx.Module):
    """Self-attention over the video tokens: q, k, v, o linears, RMSNorm on q and k, 3D RoPE, then the
    attention core (`attn`: None = dense, or an SLA / SLA2 module)."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        _init_projections(self, cfg, rngs)
        self.attn = make_self_attention(cfg, rngs)

    def qkv(self, x: jax.Array, angles: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, N, dim) -> q, k, v (B, N, H, D) in the compute dtype; q and k normalised and rotated."""
        b, n, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.qk_norm:
            q, k = self.norm_q(q), self.norm_k(k)
        shape = (b, n, self.num_heads, self.head_dim)
        q = apply_rope(q.reshape(shape), angles).astype(v.dtype)
        k = apply_rope(k.reshape(shape), angles).astype(v.dtype)
        return q, k, v.reshape(shape)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """The swappable core alone: (B, N, H, D) -> (B, N, H, D)."""
        if self.attn is None:
            return dense_attention(q, k, v)
        return self.attn(q, k, v).astype(v.dtype)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        """x (B, N, dim), angles (N, D/2) -> (B, N, dim) in the compute dtype."""
        q, k, v = self.qkv(x, angles)
        o = self.attend(q, k, v)
        return self.o(o.reshape(x.shape[0], x.shape[1], -1))


class WanCrossAttention(nnx.Module):
    """Dense attention from the video tokens to the text tokens (no RoPE); RMSNorm on q and k."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        _init_projections(self, cfg, rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x (B, N, dim) video tokens, context (B, L, dim) embedded text -> (B, N, dim)."""
        b, n, _ = x.shape
        q, k, v = self.q(x), self.k(context), self.v(context)
        if self.qk_norm:
            q, k = self.norm_q(q), self.norm_k(k)
        heads = (self.num_heads, self.head_dim)
        o = dense_attention(q.reshape(b, n, *heads), k.reshape(b, -1, *heads), v.reshape(b, -1, *heads))
        return self.o(o.reshape(b, n, -1))


class WanFFN(nnx.Module):
    """fc1 (dim -> ffn_dim), GELU (tanh), fc2 (ffn_dim -> dim); official names ffn.0 and ffn.2."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg, cfg.dim, cfg.ffn_dim, rngs)
        self.fc2 = _linear(cfg, cfg.ffn_dim, cfg.dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class WanBlock(nnx.Module):
    """One transformer block; `modulation` (1, 6, dim) is added to the projected time embedding."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        p = cfg.param_dtype
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False, param_dtype=p)
        self.self_attn = WanSelfAttention(cfg, rngs)
        self.cross_attn_norm = cfg.cross_attn_norm
        if cfg.cross_attn_norm:
            self.norm3 = LayerNorm(cfg.dim, eps=cfg.eps, affine=True, param_dtype=p)
        self.cross_attn = WanCrossAttention(cfg, rngs)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, affine=False, param_dtype=p)
        self.ffn = WanFFN(cfg, rngs)
        self.modulation = nnx.Param(
            (jax.random.normal(rngs.params(), (1, 6, cfg.dim)) / math.sqrt(cfg.dim)).astype(p))

    def __call__(self, x: jax.Array, e0: jax.Array, context: jax.Array, angles: jax.Array) -> jax.Array:
        """x (B, N, dim) float32 residual, e0 (B, 6, dim) float32, context (B, L, dim), angles (N, D/2)."""
        mod = self.modulation[...].astype(jnp.float32) + e0
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i:i + 1] for i in range(6))
        y = self.self_attn(self.norm1(x) * (1 + scale_msa) + shift_msa, angles)
        x = x + y.astype(jnp.float32) * gate_msa
        h = self.norm3(x) if self.cross_attn_norm else x
        x = x + self.cross_attn(h, context).astype(jnp.float32)
        y = self.ffn(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x + y.astype(jnp.float32) * gate_mlp


class WanHead(nnx.Module):
    """Output head in float32: LayerNorm, modulation (1, 2, dim) + time embedding, linear to patch pixels."""

    def __init__(self, cfg: WanConfig, rngs: nnx.Rngs):
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, affine=False, param_dtype=cfg.param_dtype)
        # The reference zero-initialises head.head.weight; xavier here so that a random model's output
        # depends on every layer (tests compare outputs). Loaded checkpoints overwrite it anyway.
        self.head = _linear(cfg, cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim, rngs, dtype=jnp.float32)
        self.modulation = nnx.Param(
            (jax.random.normal(rngs.params(), (1, 2, cfg.dim)) / math.sqrt(cfg.dim)).astype(cfg.param_dtype))

    def __call__(self, x: jax.Array, e: jax.Array) -> jax.Array:
        """x (B, N, dim) float32, e (B, dim) float32 -> (B, N, prod(patch) * out_dim) float32."""
        mod = self.modulation[...].astype(jnp.float32) + e[:, None, :]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        return self.head(self.norm(x) * (1 + scale) + shift)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
def _list(items):
    return nnx.List(items) if hasattr(nnx, "List") else list(items)


class WanModel(nnx.Module):
    """Wan2.1 T2V transformer. `model(x, t, context)`:

      x: (B, in_dim, F, H, W) latent video, F, H, W divisible by patch_size.
      t: (B,) diffusion timesteps (0..1000).
      context: (B, L, text_dim) text-encoder tokens, L <= text_len (zero-padded to text_len).
      returns (B, out_dim, F, H, W) float32 (the flow-matching velocity).
    """

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        patch_in = cfg.in_dim * math.prod(cfg.patch_size)
        self.patch_embedding = _linear(cfg, patch_in, cfg.dim, rngs)
        self.text_embedding = _Mlp(cfg, cfg.text_dim, cfg.dim, act="gelu_tanh", dtype=cfg.dtype, rngs=rngs)
        self.time_embedding = _Mlp(cfg, cfg.freq_dim, cfg.dim, act="silu", dtype=jnp.float32, rngs=rngs)
        self.time_projection = _linear(cfg, cfg.dim, 6 * cfg.dim, rngs, dtype=jnp.float32)
        self.blocks = _list([WanBlock(cfg, rngs) for _ in range(cfg.num_layers)])
        self.head = WanHead(cfg, rngs)

    # The forward pass in three parts, so that the benchmark can scan over stacked blocks.
    def embed(self, x: jax.Array, t: jax.Array, context: jax.Array):
        """Returns (tokens (B, N, dim) f32, e (B, dim) f32, e0 (B, 6, dim) f32, context (B, L, dim),
        angles (N, D/2), grid (F', H', W'))."""
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"x must be (B, {cfg.in_dim}, F, H, W), got {x.shape}")
        b, c, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent (F, H, W)=({f}, {h}, {w}) is not divisible by patch_size={cfg.patch_size}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be ({b}, L, {cfg.text_dim}), got {context.shape}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than text_len={cfg.text_len}")
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {t.shape}")
        grid = (f // pt, h // ph, w // pw)
        # Conv3d(kernel = stride = patch) == linear on (c, pt, ph, pw)-flattened patches.
        patches = x.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        patches = patches.transpose(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, math.prod(grid), -1)
        tokens = self.patch_embedding(patches).astype(jnp.float32)

        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim))
        e0 = self.time_projection(jax.nn.silu(e)).reshape(b, 6, cfg.dim)

        pad = cfg.text_len - context.shape[1]
        context = jnp.pad(context, ((0, 0), (0, pad), (0, 0)))
        context = self.text_embedding(context)
        angles = rope_angles(grid, cfg.head_dim, cfg.rope_theta)
        return tokens, e, e0, context, angles, grid

    def unembed(self, tokens: jax.Array, e: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """Head and unpatchify: tokens (B, N, dim) -> (B, out_dim, F, H, W) float32."""
        cfg = self.cfg
        out = self.head(tokens, e)                              # (B, N, pt*ph*pw*out_dim)
        b = out.shape[0]
        pt, ph, pw = cfg.patch_size
        out = out.reshape(b, *grid, pt, ph, pw, cfg.out_dim)    # channel order (pt, ph, pw, c)
        out = out.transpose(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        tokens, e, e0, context, angles, grid = self.embed(x, t, context)
        for block in self.blocks:
            tokens = block(tokens, e0, context, angles)
        return self.unembed(tokens, e, grid)


class _Mlp(nnx.Module):
    """Linear, activation, linear: text_embedding.{0,2} (GELU tanh) and time_embedding.{0,2} (SiLU)."""

    def __init__(self, cfg: WanConfig, d_in: int, d_out: int, *, act: str, dtype, rngs: nnx.Rngs):
        self.act = act
        self.fc1 = _linear(cfg, d_in, d_out, rngs, dtype=dtype, std=0.02)
        self.fc2 = _linear(cfg, d_out, d_out, rngs, dtype=dtype, std=0.02)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        h = jax.nn.gelu(h, approximate=True) if self.act == "gelu_tanh" else jax.nn.silu(h)
        return self.fc2(h)


# --------------------------------------------------------------------------------------------------
# Scanned forward: all blocks' parameters stacked on a leading axis, one compiled block body
# --------------------------------------------------------------------------------------------------
def stack_blocks(model: WanModel):
    """(block graphdef, block state with every leaf stacked over layers (L, ...)) of `model.blocks`."""
    splits = [nnx.split(block) for block in model.blocks]
    graphdef = splits[0][0]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[state for _, state in splits])
    return graphdef, stacked


def forward_stacked(model: WanModel, block_graphdef, block_states, x: jax.Array, t: jax.Array,
                    context: jax.Array) -> jax.Array:
    """Same function as `model(x, t, context)` with the blocks given as stacked state and run by
    `jax.lax.scan` (one compiled block for all layers). `model.blocks` is not used (may be empty)."""
    tokens, e, e0, context, angles, grid = model.embed(x, t, context)

    def body(h, state):
        return nnx.merge(block_graphdef, state)(h, e0, context, angles), None

    tokens, _ = jax.lax.scan(body, tokens, block_states)
    return model.unembed(tokens, e, grid)


def init_stacked_blocks(cfg: WanConfig, key: jax.Array):
    """Randomly initialised blocks directly in stacked form (no per-layer copies on the host):
    returns (block graphdef, state with leaves (num_layers, ...))."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: WanBlock(cfg, nnx.Rngs(0))))

    @jax.jit
    def init(keys):
        return jax.vmap(lambda k: nnx.state(WanBlock(cfg, nnx.Rngs(k))))(keys)

    return graphdef, init(jax.random.split(key, cfg.num_layers))
