"""``benchmarks/search_precision.py`` on a tiny index: its JSON shape and its test against a
random ranking (the README's precision table comes from this script)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from index.ingest import ingest
from tests.tiny_cxr import make_tiny_cxr
from vlm.inference import Encoder
from vlm.models import create_model, get_tokenizer, save_checkpoint

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _script():
    sys.path.insert(0, str(BENCH))  # the script imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("search_precision",
                                                      BENCH / "search_precision.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_precision_rows_carry_a_p_value_against_a_random_ranking(tmp_path):
    model = tmp_path / "tiny"
    save_checkpoint(create_model("lrclr-tiny"), model, get_tokenizer("lrclr-tiny"), card="#")
    data = make_tiny_cxr(tmp_path / "data", n=30, size=64)
    ingest(Encoder(model), data, tmp_path / "idx", progress=False, workers=0,
           model_path=str(model))
    bench = _script()
    assert bench.main(["--index", str(tmp_path / "idx"), "--k", "5",
                       "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "search_precision.json").read_text())
    assert result["k"] == 5 and result["images"]["all"] == 30
    for row in result["queries"].values():
        for pool in ("all", "all_raw"):
            cell = row[pool]
            assert 0.0 <= cell["p_vs_random"] <= 1.0
            if cell["precision"] == 0.0:
                assert cell["p_vs_random"] == 1.0  # no hit: a random ranking does as well


def test_the_hypergeometric_p_is_small_only_for_hits_beyond_chance():
    from scipy.stats import hypergeom

    # 1 relevant in a top 10 drawn from 3,788 images with 104 relevant (the README's
    # "large right pleural effusion" row): about one random ranking in four does as well
    assert hypergeom.sf(0, 3788, 104, 10) == pytest.approx(0.243, abs=0.001)
    assert hypergeom.sf(9, 3788, 339, 10) < 1e-9  # 10 of 10 at a 9% base rate
