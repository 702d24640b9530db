"""Volume evaluation: metrics against direct computations, probes, the five-row benchmark."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

import vlm  # noqa: F401  (torchvision shim before open_clip/timm)
from vlm.data.ct_dataset import CTDataset, Endpoints
from vlm.data.phantom_ct import generate_phantom_ct
from vlm.eval.metrics import roc_auc
from vlm.eval.volumes import (
    REPRESENTATIONS,
    c_index,
    endpoint_metrics,
    macro_auc,
    probe_cv,
    results_table,
    run_volume_benchmark,
)
from vlm.models.clear import ClearConfig
from vlm.train.clear import CVPredictions, patient_folds


def test_c_index_hand_example():
    # pairs (i earlier with event, j later): (0,1) (0,2) (0,3) (2,3); subject 1 is censored
    time_ = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 0, 1, 0])
    risk = np.array([0.9, 0.5, 0.2, 0.2])
    # (0,1): 0.9>0.5 yes; (0,2) yes; (0,3) yes; (2,3): tie -> 1/2  => 3.5 / 4
    assert c_index(time_, event, risk) == pytest.approx(3.5 / 4)
    assert c_index(time_, event, -np.array([4.0, 3.0, 2.0, 1.0])) == 0.0
    assert math.isnan(c_index(time_, np.zeros(4), risk))


def test_c_index_matches_brute_force():
    rng = np.random.default_rng(0)
    t = rng.integers(1, 8, 30).astype(float)
    e = rng.integers(0, 2, 30)
    r = rng.normal(size=30).round(1)
    num = den = 0.0
    for i, j in itertools.permutations(range(30), 2):
        if t[i] < t[j] and e[i]:
            den += 1
            num += 1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0
    assert c_index(t, e, r) == pytest.approx(num / den)


def test_macro_auc_skips_single_class_columns():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
    s = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.8], [0.4, 0.2, 0.1], [0.5, 0.4, 0.9]])
    expected = np.mean([roc_auc(y[:, 0], s[:, 0]), roc_auc(y[:, 2], s[:, 2])])
    assert macro_auc(y, s) == pytest.approx(expected)


def _endpoints(n: int, rng: np.random.Generator) -> Endpoints:
    return Endpoints([f"v{i}" for i in range(n)], [f"p{i // 2}" for i in range(n)],
                     (rng.random((n, 8)) < 0.4).astype(np.float32), rng.integers(0, 4, n),
                     rng.uniform(0, 40, n), rng.uniform(1, 60, n), rng.integers(0, 2, n))


def test_endpoint_metrics_and_probes_learn_informative_features():
    rng = np.random.default_rng(1)
    ep = _endpoints(60, rng)
    onehot = np.eye(4)[ep.emphysema_class]
    feats = np.c_[ep.locations, onehot, ep.emphysema_score / 10, -np.log(ep.time),
                  rng.normal(size=(60, 4))]
    folds = patient_folds(ep.patients, 3, seed=0)
    pred = probe_cv(feats, ep, folds)
    idx = np.concatenate(folds)
    m = endpoint_metrics(pred, ep, idx)
    assert m["location_auc"] > 0.95 and m["emphysema_auc"] > 0.95 and m["c_index"] > 0.8
    assert m["score_mae"] == pytest.approx(np.mean(np.abs(pred.score - ep.emphysema_score)))
    assert m["score_mae"] < 2.0
    direct = CVPredictions(folds, ep.locations, onehot, -ep.time, ep.emphysema_score)
    perfect = endpoint_metrics(direct, ep, idx)
    assert perfect == {"location_auc": 1.0, "emphysema_auc": 1.0, "c_index": 1.0,
                       "score_mae": 0.0}


def test_results_table_has_all_five_rows(tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "pct"
    generate_phantom_ct(data, n=10, shape=(32, 32, 32), seed=2, workers=1)
    result = run_volume_benchmark(data, tmp_path / "bench", budget_minutes=0.1, folds=3,
                                  lecl_preset="tiny", drasclr_preset="tiny", max_epochs=1,
                                  batch_size=32,
                                  clear_cfg=ClearConfig(epochs=2, patience=1, hidden_dim=16,
                                                        attention_dim=16, head_dim=16))
    assert set(result["representations"]) == set(REPRESENTATIONS)
    table = results_table(result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 5
    for label in REPRESENTATIONS.values():
        assert label in table
    assert (tmp_path / "bench" / "volume_benchmark.md").read_text() == table
    saved = json.loads((tmp_path / "bench" / "volume_benchmark.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    patients = {r["volume_id"]: r["patient_id"] for r in CTDataset(data).rows}
    fold_patients = [{patients[v] for v in f} for f in saved["fold_volumes"]]
    assert sum(len(f) for f in saved["fold_volumes"]) == 10
    assert all(not (a & b) for a, b in itertools.combinations(fold_patients, 2))
