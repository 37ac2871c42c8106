"""Evaluation of one trained model: validation loss, samples vs the dense model (PSNR, SSIM), attention error.

- Validation flow-matching loss on fixed videos (data.VAL_STREAM) with fixed, stratified t and fixed noise, so
  every model sees exactly the same inputs.
- Samples: Euler integration of the rectified-flow ODE from fixed noise seeds and labels (Wan-style shifted
  schedule), compared frame by frame with the dense model's samples from the same noise: PSNR and SSIM (Gaussian
  window 11, sigma 1.5, on [0, 1] pixels), as the Sparse VideoGen and Radial Attention papers report.
- Attention error per layer: the model's attention core applied to held-out Q/K/V captured from the dense model,
  relative L2 error ||O - O_dense|| / ||O_dense|| averaged over the captured samples.
- Kept mass per layer: the exact softmax mass of the dense attention (held-out Q/K/V) that falls in the key blocks
  the model's router selects, mean over query rows; for the dense model, the oracle (best k blocks) at 90/95/97%
  sparsity, i.e. how sparse its attention is at all.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import data as data_lib
from experiments.configs import Preset, RunSpec
from experiments.dit import VideoDiT
from experiments.train import write_json
from sla2_jax import diagnostics

SAMPLE_SEED = 777


# ----------------------------------------------------------------------------------------------------------------
# Image metrics (jnp).


def psnr(x, y, data_range: float = 2.0):
    """Peak signal-to-noise ratio per video. x, y (B, T, H, W, C) in [-1, 1] -> (B,) dB."""
    mse = jnp.mean((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=(1, 2, 3, 4))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def _gaussian_window(size: int, sigma: float):
    g = jnp.exp(-0.5 * ((jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2) / sigma) ** 2)
    return g / g.sum()


def ssim(x, y, data_range: float = 2.0, window: int = 11, sigma: float = 1.5):
    """Structural similarity (Wang et al. 2004) per video, averaged over frames, channels and valid positions.

    x, y (B, T, H, W, C) with values spanning `data_range`. The window shrinks to fit frames smaller than 11 px.
    Returns (B,).
    """
    x = x.astype(jnp.float32) / data_range
    y = y.astype(jnp.float32) / data_range
    B, T, H, W, C = x.shape
    size = min(window, H, W)
    g = _gaussian_window(size, sigma)

    def blur(img):  # (B, T, H, W, C) -> valid separable Gaussian filter
        img = img.transpose(0, 1, 4, 2, 3).reshape(-1, H, W)
        img = jax.vmap(lambda im: jax.vmap(lambda r: jnp.convolve(r, g, mode="valid"))(im))(img)  # along W
        img = jax.vmap(lambda im: jax.vmap(lambda c: jnp.convolve(c, g, mode="valid"), 1, 1)(im))(img)  # along H
        return img.reshape(B, T, C, H - size + 1, W - size + 1)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return jnp.mean(s, axis=(1, 2, 3, 4))


def relative_l2(o, ref):
    """||o - ref|| / ||ref|| per leading index. (S, ...) -> (S,)."""
    o, ref = o.astype(jnp.float32), ref.astype(jnp.float32)
    axes = tuple(range(1, o.ndim))
    return jnp.sqrt(jnp.sum((o - ref) ** 2, axes) / jnp.maximum(jnp.sum(ref**2, axes), 1e-20))


# ----------------------------------------------------------------------------------------------------------------
# Block-level softmax mass of the dense attention.


# Exact softmax mass of each key block, averaged over each query block's rows: (B, H, Nq, Nk) float32, any N.
block_attention_mass = diagnostics.block_attention_mass


def oracle_kept_mass(block_mass, sparsity: float) -> float:
    """Mean over rows of the mass in the best k = max(1, floor((1 - sparsity) * Nk)) key blocks. (B, H, Nq, Nk)."""
    nk = block_mass.shape[-1]
    k = max(1, int(np.floor(round(1.0 - sparsity, 6) * nk)))
    return float(jnp.mean(jnp.sum(jax.lax.top_k(block_mass, k)[0], axis=-1)))


@nnx.jit
def _router_lut(core, q, k):
    from sla2_jax.functional import route

    w_q = core.w_q[...] if hasattr(core, "w_q") else None
    w_k = core.w_k[...] if hasattr(core, "w_k") else None
    lut, _, _ = route(q, k, core.config, w_q=w_q, w_k=w_k)
    return lut


def kept_mass(model: VideoDiT, heldout: dict) -> list[float] | None:
    """Per layer: mean exact dense-attention mass in the blocks the model's router selects (None for dense)."""
    if "block_mass" not in heldout or model.blocks[0].attn.core is None:
        return None
    out = []
    for layer, blk in enumerate(model.blocks):
        q, k, bm = heldout["q"][layer], heldout["k"][layer], heldout["block_mass"][layer]
        masses = []
        for i in range(q.shape[0]):
            lut = _router_lut(blk.attn.core, q[i : i + 1], k[i : i + 1])
            masses.append(jnp.sum(jnp.take_along_axis(bm[i : i + 1], lut, axis=-1), axis=-1))
        out.append(float(jnp.mean(jnp.concatenate(masses))))
    return out


def add_block_mass(heldout: dict, block_q: int, block_k: int) -> dict:
    """heldout with "block_mass": per layer (S, H, Nq, Nk) float32 from `block_attention_mass`."""
    heldout["block_mass"] = [
        jnp.concatenate(
            [block_attention_mass(q[i : i + 1], k[i : i + 1], block_q=block_q, block_k=block_k) for i in range(len(q))]
        )
        for q, k in zip(heldout["q"], heldout["k"])
    ]
    return heldout


# ----------------------------------------------------------------------------------------------------------------
# Model evaluation.


@nnx.jit
def _forward(model: VideoDiT, x, t, label):
    return model(x, t, label)


@nnx.jit
def _core_apply(core, q, k, v):
    return core(q, k, v)


def sample_schedule(steps: int, shift: float) -> np.ndarray:
    """Times 1 -> 0 (steps + 1 points) with the shift t' = s t / (1 + (s - 1) t) that Wan's sampler uses."""
    t = np.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


def euler_sample(model: VideoDiT, noise, label, steps: int, shift: float = 1.0):
    """Integrate dx/dt = v(x, t) from t = 1 (noise (B,T,H,W,C)) to t = 0. Returns the video (B,T,H,W,C)."""
    ts = sample_schedule(steps, shift)
    x = noise
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        v = _forward(model, x, jnp.full((x.shape[0],), t_cur, jnp.float32), label)
        x = x + (t_next - t_cur) * v
    return x


def sample_inputs(preset: Preset):
    """Fixed noise (num_samples, T, H, W, C) and labels (num_samples,) shared by every model."""
    d = preset.data
    n = preset.eval.num_samples
    noise = jax.random.normal(jax.random.PRNGKey(SAMPLE_SEED), (n, d.frames, d.height, d.width, d.channels))
    labels = jnp.arange(n, dtype=jnp.int32) % data_lib.num_classes(d)
    return noise, labels


def validation_loss(model: VideoDiT, preset: Preset) -> float:
    """Mean flow-matching loss over the fixed validation set (stratified t, fixed noise)."""
    cfg = preset.eval
    source = data_lib.make_source(preset.data, data_lib.VAL_STREAM)
    n = cfg.val_batches * cfg.val_batch_size
    t_all = (np.arange(n) + 0.5) / n
    t_all = np.random.default_rng(0).permutation(t_all).astype(np.float32)
    losses = []
    chunk = preset.eval.num_samples  # same batch shape as sampling: one compiled forward per model
    for i in range(cfg.val_batches):
        batch = source.batch(i, cfg.val_batch_size)
        noise = jax.random.normal(jax.random.PRNGKey(10_000 + i), batch["video"].shape)
        t = jnp.asarray(t_all[i * cfg.val_batch_size : (i + 1) * cfg.val_batch_size])
        for s in range(0, cfg.val_batch_size, chunk):
            sl = slice(s, s + chunk)
            tb = t[sl][:, None, None, None, None]
            x_t = (1.0 - tb) * batch["video"][sl] + tb * noise[sl]
            pred = _forward(model, x_t, t[sl], batch["label"][sl])
            losses.append(float(jnp.mean((pred - (noise[sl] - batch["video"][sl])) ** 2)))
    return float(np.mean(losses))


EVAL_SEED = 4242
T_DISTS = ("train", "uniform")


def paired_triples(n: int, t_dist: str) -> np.ndarray:
    """The t of the n evaluation triples (video i of data.VAL_STREAM, t[i], noise of key i): (n,) float32.

    "train": logit-normal, the training distribution (`dit.sample_t`), drawn per triple from a fixed key;
    "uniform": stratified uniform, (j + 0.5) / n in a fixed random order. Every model sees the same triples."""
    if t_dist == "train":
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(EVAL_SEED), i))(jnp.arange(n))
        return np.asarray(jax.vmap(lambda k: jax.nn.sigmoid(jax.random.normal(k, ())))(keys), np.float32)
    if t_dist == "uniform":
        return np.random.default_rng(EVAL_SEED).permutation((np.arange(n) + 0.5) / n).astype(np.float32)
    raise ValueError(f"t_dist={t_dist!r} is not one of {T_DISTS}")


@nnx.jit
def _per_video_loss(model: VideoDiT, video, label, t, noise):
    """Flow-matching loss per video: (B,) float32."""
    tb = t[:, None, None, None, None]
    pred = model((1.0 - tb) * video + tb * noise, t, label)
    return jnp.mean((pred - (noise - video)) ** 2, axis=(1, 2, 3, 4))


def paired_losses(model: VideoDiT, preset: Preset, n: int, t_dist: str, batch_size: int, progress=None) -> dict:
    """Per-triple flow-matching losses on the fixed evaluation triples (`paired_triples`).

    Returns {"loss": (n,) float32, "t": (n,) float32}; batch_size must divide n. progress: optional callable
    progress(num_done) (a progress bar's update)."""
    if n % batch_size:
        raise ValueError(f"batch_size={batch_size} must divide n={n}")
    source = data_lib.make_source(preset.data, data_lib.VAL_STREAM)
    t_all = paired_triples(n, t_dist)
    base = jax.random.PRNGKey(EVAL_SEED + 1)
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        batch = source.videos(idx)
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), batch["video"].shape[1:]))(
            jnp.asarray(idx)
        )
        out.append(_per_video_loss(model, batch["video"], batch["label"], jnp.asarray(t_all[idx]), noise))
        if progress is not None:
            progress(batch_size)
    return {"loss": np.asarray(jnp.concatenate(out), np.float32), "t": t_all}


def attention_errors(model: VideoDiT, heldout: dict) -> list[float]:
    """Per-layer mean relative L2 error of the model's attention cores on held-out captured Q/K/V (0 for dense)."""
    errs = []
    for layer, blk in enumerate(model.blocks):
        core = blk.attn.core
        if core is None:
            errs.append(0.0)
            continue
        q, k, v, ref = (heldout[n][layer] for n in ("q", "k", "v", "o"))
        e = [
            relative_l2(_core_apply(core, q[i : i + 1], k[i : i + 1], v[i : i + 1]), ref[i : i + 1])
            for i in range(q.shape[0])
        ]
        errs.append(float(jnp.mean(jnp.concatenate(e))))
    return errs


def evaluate_run(
    eval_dir: str,
    preset: Preset,
    run: RunSpec,
    model: VideoDiT,
    *,
    heldout: dict | None,
    dense_samples: np.ndarray | None,
) -> dict:
    """All metrics of one model; writes <eval_dir>/<run>.json and <run>_samples.npy. Returns the metrics."""
    t0 = time.time()
    noise, labels = sample_inputs(preset)
    samples = np.asarray(euler_sample(model, noise, labels, preset.eval.sample_steps, preset.eval.sample_shift))
    os.makedirs(eval_dir, exist_ok=True)
    np.save(os.path.join(eval_dir, f"{run.name}_samples.npy"), samples)
    metrics = {
        "run": run.name,
        "attention": run.attention,
        "sparsity": run.sparsity,
        "alpha": run.alpha,
        "quant": run.quant,
        "val_loss": validation_loss(model, preset),
        "sample_range": [float(samples.min()), float(samples.max())],
    }
    if dense_samples is not None:
        metrics["psnr"] = float(jnp.mean(psnr(jnp.asarray(samples), jnp.asarray(dense_samples))))
        metrics["ssim"] = float(jnp.mean(ssim(jnp.asarray(samples), jnp.asarray(dense_samples))))
    if heldout is not None:
        layer_errs = attention_errors(model, heldout)
        metrics["attn_rel_err_per_layer"] = layer_errs
        metrics["attn_rel_err"] = float(np.mean(layer_errs))
        masses = kept_mass(model, heldout)
        if masses is not None:
            metrics["kept_mass_per_layer"] = masses
            metrics["kept_mass"] = float(np.mean(masses))
        elif "block_mass" in heldout:
            metrics["oracle_kept_mass_per_layer"] = {
                f"{round(100 * s)}": [oracle_kept_mass(bm, s) for bm in heldout["block_mass"]]
                for s in (0.9, 0.95, 0.97)
            }
    metrics["eval_seconds"] = time.time() - t0
    write_json(os.path.join(eval_dir, f"{run.name}.json"), metrics)
    return metrics
