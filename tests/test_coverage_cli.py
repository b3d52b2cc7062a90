"""``curvlab factors`` reports coverage: one warning line below 100 %, ``--strict`` refuses (exit 2,
nothing written), ``--json`` and ``curvlab info`` show it."""

from __future__ import annotations

import json

from curvlab.commands import main

SMALL_MLP = ["--model", "mlp", "--model-arg", "widths=16", "--examples", "32", "--quiet"]


def test_partial_coverage_warns_in_one_line_and_is_recorded(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["factors", *SMALL_MLP, "--layers", "fc", "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(
        "curvlab: warning: coverage 14.0 % of 1,210 trainable parameters; skipped: hidden.0.weight")
    coverage = json.loads(captured.out)["coverage"]
    assert coverage["covered_parameters"] == 16 * 10 + 10 and coverage["total_parameters"] == 1210
    assert [s["name"] for s in coverage["skipped"]] == ["hidden.0.weight", "hidden.0.bias"]
    assert all(s["reason"] == "hidden.0: not selected by --layers" for s in coverage["skipped"])
    assert coverage["covered"] == [{"name": "fc.weight", "parameters": 160, "entries": ["fc"]},
                                   {"name": "fc.bias", "parameters": 10, "entries": ["fc"]}]
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "  coverage 14.0 % of 1,210 trainable parameters, 2 skipped:" in text
    assert "    hidden.0.weight (1,024): hidden.0: not selected by --layers" in text
    assert main(["info", str(out), "--json"]) == 0
    recorded = json.loads(capsys.readouterr().out)["steps"][0]["coverage"]
    assert recorded == {k: coverage[k] for k in ("covered_parameters", "total_parameters", "skipped")}


def test_strict_refuses_partial_coverage_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["factors", *SMALL_MLP, "--layers", "fc", "--strict", "-o", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("curvlab: error: --strict: coverage 14.0 % of 1,210 trainable parameters")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_full_coverage_says_nothing(tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert main(["factors", *SMALL_MLP, "--strict", "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    coverage = json.loads(captured.out)["coverage"]
    assert coverage["covered_parameters"] == coverage["total_parameters"] == 1210
    assert coverage["skipped"] == []
