"""``benchmarks/gpu_search.py`` (faiss-gpu against faiss-cpu through the index): its refusal
without a GPU and, with the GPU check forced on over faiss-cpu (every GPU clone then falls
back to the CPU, as it does for a type faiss-gpu lacks), its JSON for each device."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import index.gpu

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    spec = importlib.util.spec_from_file_location("gpu_search", BENCH / "gpu_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_without_a_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(index.gpu, "gpu_available", lambda: False)
    assert _script(monkeypatch).main(["--n", "100", "--out", str(tmp_path)]) == 1
    assert "sees no GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_json_reports_both_devices_per_configuration(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(index.gpu, "gpu_available", lambda: True)
    rc = _script(monkeypatch).main(["--n", "3000", "--dim", "32", "--nq", "40", "--single", "5",
                         "--nprobe", "64", "--configs", "flat,ivf_flat", "--out",
                         str(tmp_path)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "gpu_search.json").read_text())
    assert printed == saved and (tmp_path / "gpu_search.png").is_file()
    assert saved["n"] == 3000 and list(saved["configs"]) == ["flat", "ivf_flat"]
    flat = saved["configs"]["flat"]
    assert flat["cpu"]["factory"] == flat["gpu"]["factory"] == "Flat"
    assert flat["cpu"]["recall_at_10"] == flat["gpu"]["recall_at_10"] == 1.0
    ivf = saved["configs"]["ivf_flat"]
    assert ivf["cpu"]["factory"].startswith("IVF") and ivf["gpu"]["recall_at_10"] > 0.9
    assert ivf["gpu_speedup_batched"] == round(
        ivf["gpu"]["batched_qps"] / ivf["cpu"]["batched_qps"], 2)
