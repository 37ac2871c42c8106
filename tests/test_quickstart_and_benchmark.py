"""The README's main job and the benchmark command run end to end on CPU (small shapes)."""

import json
import math
import os

from experiments import benchmark, quickstart


def test_quickstart_prints_sparsity_error_and_timing(capsys):
    quickstart.main(["--seq-len", "300", "--heads", "2", "--block-q", "64", "--block-k", "32", "--iters", "1"])
    out = capsys.readouterr().out
    assert "block sparsity" in out and "relative L2 error" in out and "speedup" in out


def test_benchmark_tiny_writes_json_and_plot(tmp_path):
    benchmark.main(["--tiny", "--backends", "xla", "--sparsities", "0.9", "--no-kernel-only", "--quant", "int8",
                    "--out", str(tmp_path)])
    data = json.load(open(tmp_path / "results.json"))
    names = [r["what"] for r in data["rows"]]
    assert names[:2] == ["dense fwd", "dense fwd+bwd"]
    assert "xla 90% int8 module fwd" in names and "xla 90% int8 module fwd+bwd" in names
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["ms"] > 0 and math.isfinite(r["ms"])
    assert os.path.getsize(tmp_path / "speedup.png") > 1000
