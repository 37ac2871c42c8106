"""Natural-image video data: a camera pans and zooms across a photograph while 1-3 textured sprites move on their
own paths. Generated on the fly from the photographs that ship inside scikit-image's wheel (`skimage.data`); no
downloads, no files.

Every video is a pure function of (seed, index), like `data.ProceduralVideos`: same pixels on any machine, so
training resumes exactly and validation sets need no files. Videos are float32 (T, H, W, 3) in [-1, 1].

Per video (all drawn from the video's key):
  background  one of the photographs of IMAGES (each centre-cropped to a square, resized to BANK_SIZE^2, grey
              ones made RGB), with a random per-channel gain (tint) and brightness
  camera      pans in one of 8 directions (the class label: 0 = right, then counter-clockwise in 45 degree steps),
              speed 1-6% of the view per frame; the view covers 30-80% of the photograph and zooms in or out by up
              to 5% per frame; bilinear sampling, mirrored at the photograph's edges
  sprites     1 to cfg.max_shapes soft-edged ellipses cut from another photograph (radius 8-20% of the frame,
              aspect 0.7-1.4), each bouncing off the frame edges on its own direction at 2-12% of the frame per
              frame; the texture moves rigidly with the sprite

Needs scikit-image (`pip install -e ".[experiments]"`). Loader interface: `NaturalVideos(cfg, stream)` has
`videos(indices)` and `batch(step, batch_size)` like `data.ProceduralVideos`; `data.make_source` picks it when
`cfg.source == "natural"`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.configs import DataConfig

IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "brick", "grass", "gravel", "camera", "coins", "moon", "clock", "cell",
)  # fmt: skip
BANK_SIZE = 256  # side of each photograph in the bank, pixels
NUM_DIRECTIONS = 8
NUM_CLASSES = NUM_DIRECTIONS


@functools.lru_cache(maxsize=2)
def image_bank(size: int = BANK_SIZE) -> np.ndarray:
    """The photographs of IMAGES as float32 (len(IMAGES), size, size, 3) in [-1, 1] (centre square crop, resized
    with anti-aliasing; grey images repeated over the channels, alpha dropped). Loaded once per process."""
    try:
        from skimage import data as skdata
        from skimage.transform import resize
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the natural-image videos need scikit-image: pip install -e ".[experiments]"') from e
    out = []
    for name in IMAGES:
        img = np.asarray(getattr(skdata, name)(), np.float32)
        if img.max() > 1.0:
            img = img / 255.0
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        img = img[..., :3]
        h, w = img.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = resize(img[top : top + side, left : left + side], (size, size), anti_aliasing=True)
        out.append(img * 2.0 - 1.0)
    return np.stack(out).astype(np.float32)


def _sample(image, ys, xs):
    """Bilinear samples of image (S, S, 3) at pixel coordinates ys, xs (same shape), mirrored at the edges.
    Returns (*ys.shape, 3)."""
    coords = [ys.reshape(-1), xs.reshape(-1)]
    chans = [jax.scipy.ndimage.map_coordinates(image[..., c], coords, order=1, mode="mirror") for c in range(3)]
    return jnp.stack(chans, -1).reshape(*ys.shape, 3)


def _render_one(key: jax.Array, bank: jax.Array, cfg: DataConfig) -> tuple[jax.Array, jax.Array]:
    """One video (T, H, W, 3) float32 in [-1, 1] and its int32 label (camera direction)."""
    T, H, W, S = cfg.frames, cfg.height, cfg.width, cfg.max_shapes
    n_img, side = bank.shape[0], bank.shape[1]
    k = jax.random.split(key, 16)
    # Camera: view size (fraction of the photograph), zoom rate, pan direction and speed.
    img = jax.random.randint(k[0], (), 0, n_img)
    direction = jax.random.randint(k[1], (), 0, NUM_DIRECTIONS)
    angle = direction * (2 * jnp.pi / NUM_DIRECTIONS) + jax.random.uniform(k[2], (), minval=-0.15, maxval=0.15)
    speed = jax.random.uniform(k[3], (), minval=0.01, maxval=0.06)  # view widths per frame
    view0 = jax.random.uniform(k[4], (), minval=0.3, maxval=0.8)
    zoom = jax.random.uniform(k[5], (), minval=-0.05, maxval=0.05)  # log view size per frame
    gain = 1.0 + jax.random.uniform(k[6], (3,), minval=-0.25, maxval=0.25)
    offset = jax.random.uniform(k[7], (), minval=-0.15, maxval=0.15)

    t = jnp.arange(T, dtype=jnp.float32)
    view = view0 * jnp.exp(zoom * t)  # (T,)
    # y grows downwards: direction 2 ("up") moves the camera towards smaller y.
    step = jnp.stack([-jnp.sin(angle), jnp.cos(angle)])  # (dy, dx)
    travel = jnp.cumsum(jnp.concatenate([jnp.zeros(1), speed * view[:-1]]))  # (T,) fraction of the photograph
    start = 0.5 - step * travel[-1] / 2 + jax.random.uniform(k[8], (2,), minval=-0.1, maxval=0.1)
    centre = start[None] + travel[:, None] * step[None]  # (T, 2): (y, x)

    aspect = W / H
    fy = (jnp.arange(H, dtype=jnp.float32) + 0.5) / H - 0.5  # (H,)
    fx = (jnp.arange(W, dtype=jnp.float32) + 0.5) / W - 0.5
    gy, gx = jnp.meshgrid(fy, fx, indexing="ij")  # (H, W), frame coordinates in [-0.5, 0.5]
    ys = (centre[:, 0, None, None] + gy[None] * view[:, None, None]) * side  # (T, H, W)
    xs = (centre[:, 1, None, None] + gx[None] * view[:, None, None] * aspect) * side
    frames = _sample(bank[img], ys, xs)

    # Sprites: textured ellipses bouncing inside the frame.
    count = jax.random.randint(k[9], (), 1, S + 1)
    radius = jax.random.uniform(k[10], (S,), minval=0.08, maxval=0.2)
    ratio = jax.random.uniform(k[11], (S,), minval=0.7, maxval=1.4)
    pos0 = jax.random.uniform(k[12], (S, 2), minval=0.0, maxval=1.0)
    s_angle = jax.random.uniform(k[13], (S,), minval=0.0, maxval=2 * jnp.pi)
    s_speed = jax.random.uniform(k[14], (S,), minval=0.02, maxval=0.12)
    tex = jax.random.split(k[15], 3)
    tex_img = jax.random.randint(tex[0], (S,), 0, n_img - 1)
    tex_img = jnp.where(tex_img >= img, tex_img + 1, tex_img)  # never the background's photograph
    tex_origin = jax.random.uniform(tex[1], (S, 2), minval=0.2, maxval=0.8)
    tex_scale = jax.random.uniform(tex[2], (S,), minval=0.4, maxval=1.0)  # photograph fraction per frame height

    lo, span = radius, jnp.maximum(1.0 - 2.0 * radius, 1e-3)
    vel = s_speed[:, None] * jnp.stack([jnp.sin(s_angle), jnp.cos(s_angle)], -1)  # (S, 2)
    raw = (pos0 * span[:, None])[None] + t[:, None, None] * vel[None]  # (T, S, 2)
    tri = jnp.abs(jnp.mod(raw, 2.0 * span[None, :, None]) - span[None, :, None])
    pos = lo[None, :, None] + span[None, :, None] - tri  # (T, S, 2) in [0, 1]: (y, x)
    py, px = gy + 0.5, gx + 0.5  # (H, W) in [0, 1]
    edge = 1.5 / max(H, W)
    for s in range(S):
        dy = py[None] - pos[:, s, 0, None, None]  # (T, H, W)
        dx = (px[None] - pos[:, s, 1, None, None]) * aspect
        dist = jnp.sqrt((dy * ratio[s]) ** 2 + (dx / ratio[s]) ** 2) - radius[s]
        mask = jax.nn.sigmoid(-dist / edge * 2.0) * (s < count)
        ty = (tex_origin[s, 0] + dy * tex_scale[s]) * side
        tx = (tex_origin[s, 1] + dx * tex_scale[s]) * side
        sprite = _sample(bank[tex_img[s]], ty, tx)
        frames = frames * (1 - mask[..., None]) + sprite * mask[..., None]
    frames = frames * gain + offset
    return jnp.clip(frames, -1.0, 1.0), direction.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def render_natural(cfg: DataConfig, seed: jax.Array, indices: jax.Array, bank: jax.Array) -> dict:
    """Videos for the given indices. seed: int scalar; indices: (B,) int; bank: `image_bank()`.
    Returns {"video": (B, T, H, W, 3) float32 in [-1, 1], "label": (B,) int32 in [0, NUM_CLASSES)}."""
    if cfg.channels != 3:
        raise ValueError(f"natural-image videos are RGB; got channels={cfg.channels}")
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
    video, label = jax.vmap(lambda key: _render_one(key, bank, cfg))(keys)
    return {"video": video, "label": label}


class NaturalVideos:
    """The natural-image source. `stream` offsets the indices (training, validation, capture never overlap)."""

    def __init__(self, cfg: DataConfig, stream: int = 0):
        self.cfg, self.stream = cfg, stream
        self.bank = jnp.asarray(image_bank())

    def videos(self, indices) -> dict:
        idx = jnp.asarray(indices, jnp.int32) + jnp.int32(self.stream % (2**31 - 1))
        # The seed is a traced argument: the static config is the same for every seed (one compilation).
        return render_natural(dataclasses.replace(self.cfg, seed=0), self.cfg.seed, idx, self.bank)

    def batch(self, step: int, batch_size: int) -> dict:
        return self.videos(np.arange(step * batch_size, (step + 1) * batch_size) % 1_000_000_000)
