"""Procedural video data: coloured shapes that bounce or orbit over a background, generated on the fly.

Every video is a pure function of (seed, index): `render_videos(cfg, seed, indices)` gives the same pixels on any
machine, so training resumes exactly and validation sets need no files. Videos are float32 (T, H, W, C) in
[-1, 1]; the label is `shape_kind * 2 + motion_kind` (shape: circle / square / triangle, motion: bounce / orbit),
NUM_CLASSES = 6. All shapes of one video share the kind and the motion; count, colours, sizes, speeds, phases and
the background (solid, horizontal or vertical gradient) vary.

Loader interface: a `VideoSource` has `batch(step, batch_size) -> {"video": (B,T,H,W,C), "label": (B,)}`;
`batches(source, batch_size, start_step)` iterates it. `ProceduralVideos` is the procedural source,
`natural_video.NaturalVideos` the natural-image one (camera pans over photographs), `make_source` picks one by
`DataConfig.source`, and `NpyFolderVideos` shows how a folder of real clips plugs in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import DataConfig

NUM_SHAPES = 3  # circle, square, triangle
NUM_MOTIONS = 2  # bounce, orbit
NUM_CLASSES = NUM_SHAPES * NUM_MOTIONS

# Offsets of the index streams, so that training, validation, capture and sampling never share a video.
TRAIN_STREAM = 0
VAL_STREAM = 1_000_000_000
CAPTURE_STREAM = 1_500_000_000
HELDOUT_STREAM = 1_800_000_000


def _render_one(key: jax.Array, cfg: DataConfig) -> tuple[jax.Array, jax.Array]:
    """One video (T, H, W, C) float32 in [-1, 1] and its int32 label."""
    T, H, W, C, S = cfg.frames, cfg.height, cfg.width, cfg.channels, cfg.max_shapes
    k = jax.random.split(key, 12)
    shape_kind = jax.random.randint(k[0], (), 0, NUM_SHAPES)
    motion_kind = jax.random.randint(k[1], (), 0, NUM_MOTIONS)
    count = jax.random.randint(k[2], (), 1, S + 1)
    active = jnp.arange(S) < count  # (S,)
    radius = jax.random.uniform(k[3], (S,), minval=0.08, maxval=0.22)  # fraction of the frame
    color = jax.random.uniform(k[4], (S, C), minval=-1.0, maxval=1.0)
    pos0 = jax.random.uniform(k[5], (S, 2), minval=0.0, maxval=1.0)
    speed = jax.random.uniform(k[6], (S,), minval=0.02, maxval=0.12)  # frame widths per frame
    angle = jax.random.uniform(k[7], (S,), minval=0.0, maxval=2 * jnp.pi)
    orbit_r = jax.random.uniform(k[8], (S,), minval=0.1, maxval=0.3)
    # Background: solid colour, or a gradient between two colours along y or x.
    bg_kind = jax.random.randint(k[9], (), 0, 3)
    bg_a, bg_b = jax.random.uniform(k[10], (2, C), minval=-1.0, maxval=1.0) * 0.7

    t = jnp.arange(T, dtype=jnp.float32)[:, None]  # (T, 1)
    # Bounce: position moves linearly and reflects off the walls at [r, 1 - r] (a triangle wave).
    lo, span = radius, jnp.maximum(1.0 - 2.0 * radius, 1e-3)
    vel = speed[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)  # (S, 2)
    raw = (pos0 * span[:, None])[None] + t[:, :, None] * vel[None]  # (T, S, 2)
    tri = jnp.abs(jnp.mod(raw, 2.0 * span[None, :, None]) - span[None, :, None])
    bounce = lo[None, :, None] + span[None, :, None] - tri
    # Orbit: circle around a centre with angular speed speed / orbit_r.
    centre = 0.5 + (pos0 - 0.5) * 0.4
    phase = angle[None] + t * (speed / orbit_r)[None] * jnp.where(jnp.arange(S) % 2 == 0, 1.0, -1.0)[None]
    orbit = centre[None] + orbit_r[None, :, None] * jnp.stack([jnp.cos(phase), jnp.sin(phase)], -1)
    pos = jnp.where(motion_kind == 0, bounce, orbit)  # (T, S, 2): (x, y)

    ys = (jnp.arange(H, dtype=jnp.float32) + 0.5) / H
    xs = (jnp.arange(W, dtype=jnp.float32) + 0.5) / W
    gy, gx = jnp.meshgrid(ys, xs, indexing="ij")  # (H, W)
    grad = jnp.where(bg_kind == 1, gy, gx)[..., None]
    background = jnp.where(bg_kind == 0, bg_a, bg_a * (1 - grad) + bg_b * grad)  # (H, W, C)
    frames = jnp.broadcast_to(background, (T, H, W, C))

    edge = 1.5 / max(H, W)  # soft edge, ~1.5 pixels
    for s in range(S):
        dx = gx[None] - pos[:, s, 0][:, None, None]  # (T, H, W)
        dy = gy[None] - pos[:, s, 1][:, None, None]
        r = radius[s]
        d_circle = jnp.sqrt(dx * dx + dy * dy) - r
        d_square = jnp.maximum(jnp.abs(dx), jnp.abs(dy)) - 0.85 * r
        # Upward triangle: inside when -r <= dy <= r and |dx| <= (dy + r) / 2 (y grows downwards).
        d_tri = jnp.maximum(jnp.abs(dy) - r, jnp.abs(dx) - (dy + r) * 0.5)
        d = jnp.select([shape_kind == 0, shape_kind == 1], [d_circle, d_square], d_tri)
        mask = jax.nn.sigmoid(-d / edge * 2.0) * active[s]
        frames = frames * (1 - mask[..., None]) + color[s] * mask[..., None]
    label = (shape_kind * NUM_MOTIONS + motion_kind).astype(jnp.int32)
    return jnp.clip(frames, -1.0, 1.0), label


@functools.partial(jax.jit, static_argnames=("cfg",))
def render_videos(cfg: DataConfig, seed: jax.Array, indices: jax.Array) -> dict:
    """Videos for the given indices. seed: int scalar; indices: (B,) int. Returns video (B,T,H,W,C), label (B,)."""
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    video, label = jax.vmap(lambda k: _render_one(k, cfg))(keys)
    return {"video": video, "label": label}


class VideoSource(Protocol):
    """Anything that gives deterministic batches by step number."""

    def batch(self, step: int, batch_size: int) -> dict: ...


class ProceduralVideos:
    """The procedural source. `stream` offsets the indices (training, validation, capture never overlap)."""

    def __init__(self, cfg: DataConfig, stream: int = TRAIN_STREAM):
        self.cfg, self.stream = cfg, stream

    def videos(self, indices) -> dict:
        idx = jnp.asarray(indices, jnp.int32) + jnp.int32(self.stream % (2**31 - 1))
        # The seed is a traced argument: the static config is the same for every seed (one compilation).
        return render_videos(dataclasses.replace(self.cfg, seed=0), self.cfg.seed, idx)

    def batch(self, step: int, batch_size: int) -> dict:
        return self.videos(np.arange(step * batch_size, (step + 1) * batch_size) % 1_000_000_000)


class NpyFolderVideos:
    """A folder of `*.npy` clips, each (T, H, W, C) uint8 or float in [-1, 1], with optional `labels.txt`
    (one int per file in sorted order; labels are 0 when missing). Batches cycle through the files in a fixed
    order, so resuming at a step gives the same batch. A template for real data; not used by the recipe."""

    def __init__(self, folder: str, cfg: DataConfig):
        self.files = sorted(f for f in os.listdir(folder) if f.endswith(".npy"))
        if not self.files:
            raise ValueError(f"folder={folder!r} holds no .npy clips")
        self.folder, self.cfg = folder, cfg
        path = os.path.join(folder, "labels.txt")
        self.labels = (
            np.loadtxt(path, dtype=np.int32).reshape(-1)
            if os.path.exists(path)
            else np.zeros(len(self.files), np.int32)
        )

    def batch(self, step: int, batch_size: int) -> dict:
        idx = [(step * batch_size + i) % len(self.files) for i in range(batch_size)]
        clips = []
        for i in idx:
            x = np.load(os.path.join(self.folder, self.files[i]))
            want = (self.cfg.frames, self.cfg.height, self.cfg.width, self.cfg.channels)
            if x.shape != want:
                raise ValueError(f"clip {self.files[i]} has shape {x.shape}, expected {want}")
            clips.append(x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32))
        return {"video": jnp.asarray(np.stack(clips)), "label": jnp.asarray(self.labels[idx])}


def make_source(cfg: DataConfig, stream: int = TRAIN_STREAM) -> VideoSource:
    """The generated source of `cfg.source` ("shapes" or "natural") on index stream `stream`."""
    if cfg.source == "natural":
        from experiments.natural_video import NaturalVideos

        return NaturalVideos(cfg, stream)
    return ProceduralVideos(cfg, stream)


def num_classes(cfg: DataConfig) -> int:
    """Number of class labels of `cfg.source` (shapes: shape x motion kind; natural: camera direction)."""
    if cfg.source == "natural":
        from experiments.natural_video import NUM_CLASSES as natural_classes

        return natural_classes
    return NUM_CLASSES


def batches(source: VideoSource, batch_size: int, start_step: int = 0) -> Iterator[dict]:
    """Endless iterator of batches, starting at `start_step` (for resuming)."""
    step = start_step
    while True:
        yield source.batch(step, batch_size)
        step += 1
