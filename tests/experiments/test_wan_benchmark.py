"""The end-to-end Wan benchmark (experiments/wan/benchmark.py): its --tiny smoke run on CPU writes one consistent
summary (JSON + Markdown) with no speedup claims, collapsed sparsities are named, per-configuration processes
(--isolate) report back, and a full GPU run's summary carries the per-video speedup."""

import json
import os

import pytest

from experiments.wan import benchmark


def _table_rows(markdown: str) -> list[str]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| config"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _read(out):
    with open(os.path.join(out, benchmark.RESULTS_JSON)) as f:
        data = json.load(f)
    with open(os.path.join(out, benchmark.RESULTS_MD)) as f:
        return data, f.read()


def test_tiny_run_writes_one_consistent_summary(tmp_path, capsys):
    out = str(tmp_path / "tiny")
    benchmark.main(["--tiny", "--out", out, "--only", "dense", "sla2-97", "--steps", "2", "--no-attention-breakdown"])
    printed = capsys.readouterr().out
    data, markdown = _read(out)
    header, rows = data["header"], data["results"]
    assert [r["name"] for r in rows] == ["dense", "sla2-97"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert len(r["step_s"]) == 2 and r["final_finite"] is True
        assert r["video_s"] > 0 and r["compile_s"] > 0
        assert "video_speedup" not in r                       # a smoke run claims no speedup
    assert header["steps"] == 2 and header["calls_per_step"] == 2 and header["tiny"] is True
    assert header["notes"][0].startswith("SMOKE RUN")
    assert "SMOKE RUN" in markdown and "speedup" not in _table_rows(markdown)[0]
    # what is printed is the file's summary, and nothing else speaks of a speedup
    assert markdown.strip() in printed
    assert all("speedup" not in line or "no speedup is reported" in line for line in printed.splitlines())
    # a valid Markdown table: header, separator, one row per configuration, no blank lines, same column count
    table = _table_rows(markdown)
    assert len(table) == 2 + len(rows)
    assert len({line.count("|") for line in table}) == 1


def test_collapsed_sparsities_are_named_and_distinct_ones_are_not():
    tiny = benchmark.parse(["--tiny", "--out", "x"])
    selections = {name: benchmark._selection(cfg, cfg.seq_len) for name, cfg in benchmark.configurations(tiny)}
    assert selections["dense"] is None
    assert selections["sla2-90"] == selections["sla2-95"] == selections["sla2-97"] == (1, 16)
    full = benchmark.parse(["--out", "x"])
    selections = {name: benchmark._selection(cfg, cfg.seq_len) for name, cfg in benchmark.configurations(full)}
    assert [selections[f"sla2-{s}"] for s in (90, 95, 97)] == [(51, 512), (25, 512), (15, 512)]

    def notes(args, ks):
        header = {**benchmark.make_header(args, []), "platform": "cpu", "int8_note": "int8 note"}
        rows = [{"name": n, "k_of_nk": k, "quant": "none"} for n, k in ks.items()]
        benchmark.finish(header, rows)
        return [n for n in header["notes"] if "one computation under several labels" in n]

    collapsed = notes(tiny, {"sla2-90": "1/16", "sla2-95": "1/16", "sla2-97": "1/16"})
    assert collapsed == ["sla2-90, sla2-95, sla2-97 select the same 1/16 key blocks per query block at 256 tokens: "
                         "one computation under several labels."]
    assert notes(full, {"sla2-90": "51/512", "sla2-95": "25/512", "sla2-97": "15/512"}) == []


def test_full_gpu_summary_reports_the_video_speedup():
    args = benchmark.parse(["--out", "x"])
    header = {**benchmark.make_header(args, ["--out", "x"]), "platform": "gpu", "device": "H100", "int8_note": "-"}
    rows = [{"name": "dense", "k_of_nk": None, "quant": None, "video_s": 50.0, "step_s_min": 0.9, "step_s_max": 1.1},
            {"name": "sla2-97", "k_of_nk": "15/512", "quant": "none", "video_s": 20.0, "step_s_min": 0.3,
             "step_s_max": 0.5}]
    benchmark.finish(header, rows)
    assert [r["video_speedup"] for r in rows] == [1.0, 2.5]
    assert not any(n.startswith("SMOKE") for n in header["notes"])
    assert any("2.5x per video over dense" in n for n in header["notes"])
    markdown = benchmark.markdown(header, rows)
    assert "| speedup |" in _table_rows(markdown)[0] and "| 2.50x |" in markdown
    # the same rows from a CPU run: no speedup anywhere
    header["platform"] = "cpu"
    benchmark.finish(header, rows)
    assert all("video_speedup" not in r for r in rows) and "speedup |" not in benchmark.markdown(header, rows)


def test_isolated_configuration_reports_from_its_child(tmp_path, monkeypatch):
    """--isolate: the parent starts `python -m experiments.wan.benchmark <its argv> --child NAME --child-out F`
    per configuration and collects F. The child runs in this process here (a real process start costs CI time);
    the command line it gets is the one a real child would."""
    commands = []

    def fake_run(command):
        commands.append(command)
        assert command[1:3] == ["-m", "experiments.wan.benchmark"]
        benchmark.main(command[3:])
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    out = str(tmp_path / "iso")
    benchmark.main(["--tiny", "--isolate", "--out", out, "--only", "dense", "--steps", "1", "--guidance", "1",
                    "--no-attention-breakdown"])
    assert len(commands) == 1 and commands[0][-4:-2] == ["--child", "dense"]
    data, markdown = _read(out)
    assert data["header"]["isolated"] is True and data["header"]["platform"] == "cpu"
    (row,) = data["results"]
    assert "error" not in row, row.get("error")
    assert row["name"] == "dense" and len(row["step_s"]) == 1 and row["final_finite"] is True
    assert "each configuration's own process" in markdown and data["header"]["calls_per_step"] == 1
    # a child that dies leaves an error row, and the summary is still written
    monkeypatch.setattr(benchmark.subprocess, "run", lambda command: type("Died", (), {"returncode": -9})())
    benchmark.main(["--tiny", "--isolate", "--out", out, "--only", "dense"])
    data, markdown = _read(out)
    assert data["results"] == [{"name": "dense", "error": "child process exited with -9"}]
    assert "dense: ERROR child process exited with -9" in markdown


def test_bad_arguments():
    with pytest.raises(SystemExit):
        benchmark.parse(["--tiny", "--out", "x", "--steps", "0"])
    with pytest.raises(SystemExit, match="unknown configurations"):
        benchmark.configurations(benchmark.parse(["--tiny", "--out", "x", "--only", "sla2-99"]))


def test_resume_keeps_finished_configurations_and_refuses_other_settings(tmp_path, monkeypatch):
    """--resume runs only what an earlier call in --out did not finish (children faked: no jax work here)."""
    commands, dying = [], {"sla2-97"}

    def fake_run(command):
        name = command[command.index("--child") + 1]
        commands.append(name)
        if name in dying:
            return type("Died", (), {"returncode": 1})()
        row = {"name": name, "k_of_nk": None, "quant": None, "video_s": 2.0, "step_s_min": 0.1, "step_s_max": 0.2}
        with open(command[command.index("--child-out") + 1], "w") as f:
            json.dump({"header": {"platform": "gpu", "device": "fake", "int8_note": "-"}, "row": row}, f)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    out = str(tmp_path / "r")
    argv = ["--tiny", "--isolate", "--out", out, "--only", "dense", "sla2-97", "--steps", "2"]
    benchmark.main(argv)
    assert commands == ["dense", "sla2-97"]
    dying.clear()
    benchmark.main(argv + ["--resume"])
    assert commands == ["dense", "sla2-97", "sla2-97"]           # only the failed one ran again
    data, markdown = _read(out)
    assert [r["name"] for r in data["results"]] == ["dense", "sla2-97"]
    assert all("error" not in r for r in data["results"])
    assert "; then " in data["header"]["command"]
    with pytest.raises(SystemExit, match="different run.*steps"):
        benchmark.main(["--tiny", "--isolate", "--out", out, "--steps", "3", "--resume"])
