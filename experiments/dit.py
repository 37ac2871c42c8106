"""A small video DiT in Flax NNX with selectable attention (dense, SLA, SLA2, sparse-only).

Shapes: video (B, T, H, W, C) -> 3D patches (pt, ph, pw) -> tokens (B, N, dim), N = T/pt * H/ph * W/pw in raster
order (t, h, w), plus fixed 3D sin-cos position embeddings; then the tokens are put in ModelConfig.token_order
("tiles": 4 x 4 x 4 cubes of tokens by default, experiments/token_order.py) for the blocks, and back in raster
order before unpatchify, so every attention layer (and captured Q/K/V) sees blocks of that order while the dense
model's function does not depend on it. Each block is a DiT block with adaLN-zero modulation
from c = MLP(timestep embedding) + class embedding; attention uses RMS-normalised q and k (as Wan does). The
model predicts the rectified-flow velocity v = noise - x0 for x_t = (1 - t) x0 + t noise, t in [0, 1].

The attention kernel of every block ("core") is chosen by an `AttentionSpec`:
  dense   jax.nn.dot_product_attention (cuDNN on GPU in bf16)
  sla     sla2_jax.SLAAttention  (SLA v1: heuristic router, O_s + Proj(O_l))
  sla2    sla2_jax.SLA2Attention (learned router, alpha * O_s + (1 - alpha) * O_l)
  sparse  sparse branch alone: sla2_jax.sla2_attention with the heuristic router and alpha fixed to 1
The sla2_jax import is lazy so that the dense model works without it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import token_order
from experiments.configs import DataConfig, ModelConfig, Preset, RunSpec

_List = getattr(nnx, "List", list)

# Names of the SLA2 router and alpha parameters inside sla2_jax.SLA2Attention (used by nnx filters).
ROUTER_PARAM_NAMES = ("w_q", "w_k")
ALPHA_PARAM_NAMES = ("alpha_logit", "alpha_w", "alpha_b")
ATTENTIONS = ("dense", "sla", "sla2", "sparse")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which attention the blocks use; `config` is an sla2_jax.SLA2Config (None for dense); `context` an optional
    sla2_jax.ContextParallel (sequence-sharded attention over a mesh axis, Ulysses style; dense, sla2, sparse)."""

    kind: str = "dense"
    config: object = None
    context: object = None

    def __post_init__(self):
        if self.kind not in ATTENTIONS:
            raise ValueError(f"attention kind={self.kind!r} must be one of {ATTENTIONS}")
        if self.kind != "dense" and self.config is None:
            raise ValueError(f"attention kind={self.kind!r} needs an sla2_jax.SLA2Config")
        if self.context is not None and self.kind == "sla":
            raise ValueError("context parallelism supports the dense, sla2 and sparse attentions, not sla")


def attention_spec(preset: Preset, run: RunSpec, *, quant: str | None = None) -> AttentionSpec:
    """The AttentionSpec of a compared model. `quant` overrides run.quant (e.g. to capture without QAT)."""
    if run.attention == "dense":
        return AttentionSpec("dense")
    import sla2_jax as sla

    cfg = sla.SLA2Config(
        block_q=preset.block_q,
        block_k=preset.block_k,
        topk_ratio=round(1.0 - run.sparsity, 6),
        feature_map=preset.feature_map,
        linear_scope=run.linear_scope,
        alpha=run.alpha,
        quant=run.quant if quant is None else quant,
        backend=preset.backend,
    )
    return AttentionSpec(run.attention, cfg)


def _dense_core(q, k, v):
    """(B, N, H, D) softmax attention; cuDNN flash attention on GPU for 16-bit inputs."""
    impl = None
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class SparseOnlyAttention(nnx.Module):
    """Sparse branch alone (alpha fixed to 1): O = O_s with the SLA heuristic router. No parameters."""

    def __init__(self, config, context=None):
        self.config, self.context = config, context

    def __call__(self, q, k, v):
        import sla2_jax as sla

        alpha = jnp.ones((1, 1, 1), jnp.float32)
        if self.context is not None:
            ctx = self.context
            return sla.context_parallel_attention(
                q,
                k,
                v,
                mesh=ctx.mesh,
                seq_axis=ctx.seq_axis,
                config=self.config,
                batch_axis=ctx.batch_axis,
                alpha=alpha,
            )
        return sla.sla2_attention(q, k, v, config=self.config, alpha=alpha)


def make_core(spec: AttentionSpec, num_heads: int, head_dim: int, seq_len: int, rngs: nnx.Rngs):
    """The attention core module for one block, or None for dense (a plain function is used)."""
    if spec.kind == "dense":
        return None
    import sla2_jax as sla

    if spec.kind == "sla2":
        return sla.SLA2Attention(
            num_heads, head_dim, config=spec.config, seq_len=seq_len, context=spec.context, rngs=rngs
        )
    if spec.kind == "sla":
        return sla.SLAAttention(num_heads, head_dim, config=spec.config, rngs=rngs)
    return SparseOnlyAttention(spec.config, spec.context)


class Attention(nnx.Module):
    """Multi-head self-attention with qk RMS-norm (gains initialised to qk_norm_init). x (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, num_heads: int, seq_len: int, spec: AttentionSpec, dtype, rngs: nnx.Rngs,
                 qk_norm_init: float = 1.0):
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        gain = nnx.initializers.constant(qk_norm_init)
        self.q_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, scale_init=gain, rngs=rngs)
        self.k_norm = nnx.RMSNorm(self.head_dim, dtype=dtype, scale_init=gain, rngs=rngs)
        self.out = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.core = make_core(spec, num_heads, self.head_dim, seq_len, rngs)
        self.context = spec.context

    def qkv_heads(self, x):
        """x (B, N, dim) -> q, k, v each (B, N, H, D), q and k normalised."""
        B, N, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, N, 3 * self.num_heads, self.head_dim), 3, axis=2)
        return self.q_norm(q), self.k_norm(k), v

    def __call__(self, x, capture: bool = False):
        B, N, dim = x.shape
        q, k, v = self.qkv_heads(x)
        if self.core is not None:
            o = self.core(q, k, v)
        else:
            from sla2_jax.context_parallel import attend_in_context

            o = attend_in_context(_dense_core, q, k, v, self.context)
        y = self.out(o.astype(x.dtype).reshape(B, N, dim))
        return y, ((q, k, v) if capture else None)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nnx.Module):
    def __init__(self, dim, num_heads, mlp_ratio, seq_len, spec, dtype, rngs, qk_norm_init=1.0):
        self.norm1 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, seq_len, spec, dtype, rngs, qk_norm_init)
        self.norm2 = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, dtype=dtype, rngs=rngs)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)
        zeros = nnx.initializers.zeros_init()
        self.ada = nnx.Linear(dim, 6 * dim, kernel_init=zeros, bias_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x, c, capture=False):
        """x (B, N, dim), c (B, dim) -> (B, N, dim), captured (q, k, v) or None."""
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(self.ada(nnx.silu(c)), 6, axis=-1)
        a, qkv = self.attn(_modulate(self.norm1(x), sh1, sc1), capture)
        x = x + g1[:, None] * a
        h = self.fc2(nnx.gelu(self.fc1(_modulate(self.norm2(x), sh2, sc2)), approximate=True))
        return x + g2[:, None] * h, qkv


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """t (B,) in [0, 1] -> (B, dim) sinusoidal embedding of 1000 t."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_3d(grid: tuple[int, int, int], dim: int) -> np.ndarray:
    """Fixed position embedding (N, dim) for a (T', H', W') token grid in raster order."""
    parts = [dim // 3 // 2 * 2] * 2
    parts = [dim - sum(parts)] + parts  # time gets the remainder
    embs = []
    for axis, (n, d) in enumerate(zip(grid, parts)):
        pos = np.arange(n, dtype=np.float64)
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / max(d // 2, 1))
        e = np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], 1)  # (n, d)
        shape = [1, 1, 1, d]
        shape[axis] = n
        embs.append(np.broadcast_to(e.reshape(shape), (*grid, d)))
    return np.concatenate(embs, -1).reshape(-1, dim).astype(np.float32)


def patchify(video, patch):
    """(B, T, H, W, C) -> (B, N, pt*ph*pw*C)."""
    B, T, H, W, C = video.shape
    pt, ph, pw = patch
    x = video.reshape(B, T // pt, pt, H // ph, ph, W // pw, pw, C)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), pt * ph * pw * C)


def unpatchify(tokens, patch, shape):
    """(B, N, pt*ph*pw*C) -> (B, T, H, W, C) for shape = (T, H, W, C)."""
    T, H, W, C = shape
    pt, ph, pw = patch
    B = tokens.shape[0]
    x = tokens.reshape(B, T // pt, H // ph, W // pw, pt, ph, pw, C)
    return x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, T, H, W, C)


class VideoDiT(nnx.Module):
    """Video DiT predicting the rectified-flow velocity. __call__(x_t (B,T,H,W,C), t (B,), label (B,))."""

    def __init__(self, cfg: ModelConfig, data: DataConfig, spec: AttentionSpec = AttentionSpec(), *, rngs: nnx.Rngs):
        pt, ph, pw = cfg.patch
        if data.frames % pt or data.height % ph or data.width % pw:
            raise ValueError(f"video {(data.frames, data.height, data.width)} is not divisible by patch {cfg.patch}")
        self.cfg, self.spec = cfg, spec
        self.video_shape = (data.frames, data.height, data.width, data.channels)
        self.grid = (data.frames // pt, data.height // ph, data.width // pw)
        self.seq_len = int(np.prod(self.grid))
        token_order.permutation(self.grid, cfg.token_order, tuple(cfg.tile))  # ValueError if the tile does not fit
        dtype = jnp.dtype(cfg.dtype)
        dim, patch_dim = cfg.dim, pt * ph * pw * data.channels
        self.patch_embed = nnx.Linear(patch_dim, dim, dtype=dtype, rngs=rngs)
        self.t_fc1 = nnx.Linear(256, dim, dtype=dtype, rngs=rngs)
        self.t_fc2 = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.y_embed = nnx.Embed(cfg.num_classes + 1, dim, dtype=dtype, rngs=rngs)  # last id: "no class"
        self.blocks = _List(
            [
                DiTBlock(dim, cfg.num_heads, cfg.mlp_ratio, self.seq_len, spec, dtype, rngs, cfg.qk_norm_init)
                for _ in range(cfg.depth)
            ]
        )
        zeros = nnx.initializers.zeros_init()
        self.final_norm = nnx.LayerNorm(dim, use_scale=False, use_bias=False, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.final_ada = nnx.Linear(dim, 2 * dim, kernel_init=zeros, bias_init=zeros, dtype=dtype, rngs=rngs)
        self.final = nnx.Linear(dim, patch_dim, kernel_init=zeros, bias_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x, t, label, capture: bool = False):
        """x (B,T,H,W,C), t (B,) float in [0,1], label (B,) int -> velocity (B,T,H,W,C) float32.

        With capture=True also returns the list (one per block) of (q, k, v), each (B, N, H, D), tokens in the
        model's token order.
        """
        if x.shape[1:] != self.video_shape:
            raise ValueError(f"x has shape {x.shape}, expected (B, *{self.video_shape})")
        dtype = jnp.dtype(self.cfg.dtype)
        h = self.patch_embed(patchify(x.astype(dtype), self.cfg.patch))
        h = h + jnp.asarray(sincos_3d(self.grid, self.cfg.dim), dtype)[None]
        perm, inverse = token_order.permutation(self.grid, self.cfg.token_order, tuple(self.cfg.tile))
        if perm is not None:
            h = h[:, perm]
        c = self.t_fc2(nnx.silu(self.t_fc1(timestep_embedding(t, 256).astype(dtype)))) + self.y_embed(label)
        captured = []
        for block in self.blocks:
            h, qkv = block(h, c, capture)
            captured.append(qkv)
        shift, scale = jnp.split(self.final_ada(nnx.silu(c)), 2, axis=-1)
        out = self.final(_modulate(self.final_norm(h), shift, scale))
        if inverse is not None:
            out = out[:, inverse]
        out = unpatchify(out.astype(jnp.float32), self.cfg.patch, self.video_shape)
        return (out, captured) if capture else out


def make_model(preset: Preset, run: RunSpec, *, seed: int = 0, quant: str | None = None, context=None) -> VideoDiT:
    """A fresh model for one compared run of a preset (weights random; load checkpoints on top). context: optional
    sla2_jax.ContextParallel for sequence-parallel attention."""
    spec = dataclasses.replace(attention_spec(preset, run, quant=quant), context=context)
    return VideoDiT(preset.model, preset.data, spec, rngs=nnx.Rngs(seed))


def sample_t(key, batch: int):
    """Training times: logit-normal (mean 0, std 1) as in SD3 / rectified-flow transformers. (B,) in (0, 1)."""
    return jax.nn.sigmoid(jax.random.normal(key, (batch,)))


def flow_matching_loss(model: VideoDiT, video, label, t, noise):
    """Rectified-flow loss: MSE between model(x_t, t) and the velocity noise - video. Scalar float32."""
    tb = t[:, None, None, None, None]
    x_t = (1.0 - tb) * video + tb * noise
    pred = model(x_t, t, label)
    return jnp.mean((pred - (noise - video)) ** 2)
