"""The benchmark's smoke run tells the truth: sparsities that select the same key blocks are measured once and the
output says so; the effective TFLOP/s column is printed only on a GPU."""

import json

from experiments import benchmark


def test_sparsities_with_the_same_top_k_collapse_with_a_note():
    kept, notes = benchmark.distinct_sparsities(1000, [0.9, 0.95, 0.97])  # 16 key blocks: k = 1 for all three
    assert kept == [0.9]
    assert notes == ["N=1000: sparsities 90%, 95%, 97% all select 1 of 16 key blocks (block sparsity 93.8%): one "
                     "computation, measured once as 90%"]
    kept, notes = benchmark.distinct_sparsities(32760, [0.9, 0.95, 0.97])  # 512 key blocks: k = 51, 25, 15
    assert kept == [0.9, 0.95, 0.97] and notes == []
    kept, notes = benchmark.distinct_sparsities(4000, [0.5, 0.9, 0.95, 0.97])  # 63 blocks: k = 31, 6, 3, 1
    assert kept == [0.5, 0.9, 0.95, 0.97] and notes == []


def test_tiny_run_measures_collapsed_sparsities_once_and_leaves_tflops_out_on_cpu(tmp_path, capsys):
    benchmark.main(["--tiny", "--backends", "xla", "--sparsities", "0.9,0.95,0.97", "--no-kernel-only",
                    "--no-error", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    data = json.load(open(tmp_path / "results.json"))
    names = [r["what"] for r in data["rows"]]
    assert "xla 90% module fwd" in names and not any("95%" in n or "97%" in n for n in names)
    assert data["meta"]["collapsed_sparsities"] and "all select 1 of 16 key blocks" in out
    header = next(line for line in out.splitlines() if line.startswith("workload"))
    assert "TFLOP/s" not in header and "effective TFLOP/s left out on cpu" in out


def test_print_table_shows_tflops_where_asked(capsys):
    row = {"workload": "wan-1.3b", "N": 32760, "what": "pallas 95% kernel fwd", "ms": 1.0, "eff_tflops": 312.4}
    benchmark.print_table([row], tflops=True)
    assert "TFLOP/s" in capsys.readouterr().out
    benchmark.print_table([row], tflops=False)
    out = capsys.readouterr().out
    assert "TFLOP/s" not in out and " 312 " not in out
