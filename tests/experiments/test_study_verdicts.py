"""The study report's claim verdicts (experiments.study_report.verdict) on known CIs."""

from experiments.study_report import verdict

FLOOR = {"value": 1.0003, "lo": 0.9995, "hi": 1.0010}  # seed-to-seed spread 0.0010


def ci(lo, hi):
    return {"value": (lo + hi) / 2, "lo": lo, "hi": hi}


def test_a_bound_decides_by_the_ci():
    assert verdict(ci(1.01, 1.015), 1.02, FLOOR) == "holds"
    assert verdict(ci(1.11, 1.12), 1.02, FLOOR) == "does not hold"
    assert verdict(ci(1.01, 1.03), 1.02, FLOOR) == "not decided"


def test_a_win_smaller_than_the_seed_spread_is_said_so():
    assert verdict(ci(0.9997, 1.0), 1.0, FLOOR).startswith("holds, by less than the seed-to-seed spread")
    assert verdict(ci(0.94, 0.95), 1.0, FLOOR) == "holds"
    assert verdict(ci(0.9997, 1.0), 1.0, None) == "holds"  # no floor measured


def test_missing_and_unbounded_claims():
    assert verdict(None, 1.0, FLOOR) == "n/a (not run)"
    assert verdict(ci(0.98, 0.99), None, FLOOR) == "measured"
