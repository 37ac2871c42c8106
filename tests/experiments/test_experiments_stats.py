"""Paired bootstrap CI of a loss ratio and per-t-bin means on cases with known answers."""

import numpy as np
import pytest

from experiments import stats


def test_constant_ratio_gives_a_degenerate_interval():
    ref = np.random.default_rng(0).exponential(size=300) + 0.1
    r = stats.paired_bootstrap_ratio(1.1 * ref, ref, num_resamples=500)
    assert r["ratio"] == pytest.approx(1.1) and r["lo"] == pytest.approx(1.1) and r["hi"] == pytest.approx(1.1)
    assert r["n"] == 300


def test_interval_matches_normal_theory_for_a_mean():
    # Reference losses all 1: the ratio is the model's mean loss, whose 95% interval is mean +- 1.96 sd / sqrt(n).
    rng = np.random.default_rng(1)
    x = rng.normal(1.05, 0.2, size=4000)
    r = stats.paired_bootstrap_ratio(x, np.ones_like(x), num_resamples=4000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert r["lo"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert r["hi"] == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_paired_interval_covers_the_true_ratio_95_percent_of_the_time():
    # Paired losses with a common per-triple difficulty: true ratio E[x] / E[y] = 1.05 * 1.5 / 1.5.
    rng = np.random.default_rng(2)
    hits, widths = 0, []
    for _ in range(200):
        y = rng.exponential(1.0, size=200) + 0.5
        x = 1.05 * y + rng.normal(0.0, 0.1, size=200)
        r = stats.paired_bootstrap_ratio(x, y, num_resamples=1000, seed=int(rng.integers(1 << 30)))
        hits += r["lo"] <= 1.05 <= r["hi"]
        widths.append(r["hi"] - r["lo"])
    assert 0.89 <= hits / 200 <= 0.99
    # Pairing removes the shared difficulty: far narrower than the ratio of two independent means would be.
    assert np.mean(widths) < 0.05


def test_per_bin_means_and_bad_input():
    t = np.array([0.05, 0.15, 0.12, 0.95, 1.0])
    losses = np.array([1.0, 2.0, 4.0, 8.0, 10.0])
    assert stats.per_bin_means(losses, t, stats.t_bins(4)) == pytest.approx([7 / 3, None, None, 9.0])
    assert stats.per_bin_means(losses, t, stats.t_bins(10))[1] == 3.0
    with pytest.raises(ValueError, match="n >= 2"):
        stats.paired_bootstrap_ratio(np.ones(3), np.ones(4))
