"""``benchmarks/erase_cost.py`` on a small synthetic index: each run erases exactly one
study's three rows, leaves an index that verifies, and the JSON carries the reference beside
the erasure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_erase_cost_reports_reference_erasure_and_verify(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])  # the script imports _common
    spec = importlib.util.spec_from_file_location("erase_cost", BENCH / "erase_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--rows", "900", "--repeats", "2", "--out", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "erase_cost.json").read_text())
    assert (tmp_path / "erase_cost.png").is_file()
    assert printed["rows"] == 900 and printed["factory"] == "Flat"
    assert set(printed["median"]) == {"reference", "erase", "verify"}
    assert all(len(v) == 2 and min(v) > 0 for v in printed["runs"].values())
    assert printed["erase_vs_remove"] == round(
        printed["median"]["erase"]["seconds"] / printed["median"]["reference"]["seconds"], 2)
