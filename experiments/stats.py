"""Statistics of paired evaluations: bootstrap confidence intervals of loss ratios and per-t-bin means.

Every model is evaluated on the same (video, t, noise) triples, so per-triple losses are paired: the ratio of two
models' mean losses is estimated far more precisely by resampling triples jointly than by comparing two
independent means.
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap_ratio(losses, ref_losses, *, num_resamples: int = 4000, level: float = 0.95, seed: int = 0):
    """Ratio mean(losses) / mean(ref_losses) with a paired percentile-bootstrap confidence interval.

    Args:
      losses, ref_losses: (n,) per-triple losses of a model and of the reference on the same triples.
      num_resamples: bootstrap resamples (triples drawn with replacement, the same draw for both models).
      level: coverage of the interval (0.95: the 2.5% and 97.5% percentiles).
      seed: of the resampling (fixed, so reports are reproducible).
    Returns:
      {"ratio": float, "lo": float, "hi": float, "n": int}.
    """
    x, y = np.asarray(losses, np.float64), np.asarray(ref_losses, np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"losses and ref_losses must be (n,) with n >= 2; got {x.shape} and {y.shape}")
    rng = np.random.default_rng(seed)
    ratios = np.empty(num_resamples)
    for start in range(0, num_resamples, 256):  # chunks of resamples: memory 256 x n
        stop = min(start + 256, num_resamples)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        ratios[start:stop] = x[idx].mean(1) / y[idx].mean(1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    return {"ratio": float(x.mean() / y.mean()), "lo": float(lo), "hi": float(hi), "n": int(x.size)}


def t_bins(num_bins: int) -> np.ndarray:
    """Edges (num_bins + 1,) of equal-width bins of t in [0, 1]."""
    return np.linspace(0.0, 1.0, num_bins + 1)


def per_bin_means(losses, t, edges) -> list:
    """Mean loss per t bin. losses, t: (n,); edges: (m + 1,) increasing. Returns m floats (None for an empty bin);
    t equal to the last edge falls in the last bin."""
    losses, t = np.asarray(losses, np.float64), np.asarray(t, np.float64)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    return [float(losses[which == b].mean()) if np.any(which == b) else None for b in range(len(edges) - 1)]
