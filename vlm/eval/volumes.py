"""Cross-validated evaluation of CT volume representations on PhantomCT.

Five representations, scored on the same patient-grouped folds by the same metric code:

* ``clear_lecl``: LeCL slice encoder (w = 10) + CLEAR ABMIL heads (:mod:`vlm.train.clear`);
* ``clear_moco``: the same with plain MoCo v3 pre-training (w = 0);
* ``drasclr``: DrasCLR subject embedding (mean of lattice patch features) + linear probes;
* ``drasclr_plain``: DrasCLR with plain convolutions + linear probes;
* ``baseline``: mean-pooled slice embeddings of a randomly initialised tower + linear probes.

Endpoints: macro ROC AUC over the 8 lesion locations, one-vs-rest macro AUC of the emphysema
class, Harrell's C-index of the predicted risk (Cox head / L2 linear Cox), MAE of the emphysema
score. Per fold, classes without both labels in the test fold are left out of the macro mean;
``pooled`` is the same metric on all out-of-fold predictions together.

Self-supervised pre-training sees every volume (no labels), as a label-free transductive step;
all supervised fitting (ABMIL, probes, early stopping) sees only the training folds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm.data.ct_dataset import EMPHYSEMA_NAMES, CTDataset, Endpoints
from vlm.eval.metrics import roc_auc
from vlm.losses import cox_partial_likelihood
from vlm.models.clear import ClearConfig, LeCL
from vlm.train.clear import CVPredictions, patient_folds, train_clear

logger = logging.getLogger(__name__)

REPRESENTATIONS: dict[str, str] = {
    "clear_lecl": "CLEAR + LeCL (w=10)",
    "clear_moco": "CLEAR + MoCo v3 (w=0)",
    "drasclr": "DrasCLR (conditional conv)",
    "drasclr_plain": "DrasCLR (plain conv)",
    "baseline": "Random tower, mean-pooled slices",
}
#: ABMIL settings for a few dozen volumes: the official Adam 1e-4, batch 64, 32 epochs would give
#: one step per epoch here, so a larger rate and smaller batches (early stopping unchanged).
SMALL_DATA_CLEAR = ClearConfig(lr=1e-3, batch_size=16, epochs=64, patience=10)

METRICS: dict[str, str] = {
    "location_auc": "Location AUC (macro, 8)",
    "emphysema_auc": "Emphysema AUC (OvR macro)",
    "c_index": "Survival C-index",
    "score_mae": "Emphysema score MAE (%)",
}


# --------------------------------------------------------------------------- metrics

def c_index(time_: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: over pairs with t_i < t_j and event_i, P(risk_i > risk_j); ties count 1/2.

    NaN when no pair is comparable.
    """
    t, e, r = (np.asarray(a, dtype=float).ravel() for a in (time_, event, risk))
    comparable = (t[:, None] < t[None, :]) & (e[:, None] > 0)  # (N, N): i before j, i an event
    n = int(comparable.sum())
    if n == 0:
        return float("nan")
    conc = (r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :])
    return float((conc * comparable).sum() / n)


def macro_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over the columns that hold both classes (NaN if none does)."""
    aucs = [roc_auc(y[:, c], scores[:, c]) for c in range(y.shape[1])]
    valid = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def endpoint_metrics(pred: CVPredictions, ep: Endpoints, idx: np.ndarray) -> dict[str, float]:
    """The four endpoint metrics on the volumes ``idx``."""
    onehot = np.eye(len(EMPHYSEMA_NAMES))[ep.emphysema_class[idx]]
    return {
        "location_auc": macro_auc(ep.locations[idx], pred.locations[idx]),
        "emphysema_auc": macro_auc(onehot, pred.emphysema[idx]),
        "c_index": c_index(ep.time[idx], ep.event[idx], pred.risk[idx]),
        "score_mae": float(np.mean(np.abs(pred.score[idx] - ep.emphysema_score[idx]))),
    }


def summarise(pred: CVPredictions, ep: Endpoints) -> dict[str, dict[str, Any]]:
    """{metric: {mean, std, folds, pooled}}: mean and spread over folds, NaN folds left out."""
    per_fold = [endpoint_metrics(pred, ep, f) for f in pred.folds]
    pooled = endpoint_metrics(pred, ep, np.concatenate(pred.folds))
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        vals = [r[m] for r in per_fold]
        ok = [v for v in vals if not math.isnan(v)]
        out[m] = {"mean": float(np.mean(ok)) if ok else float("nan"),
                  "std": float(np.std(ok)) if ok else float("nan"),
                  "folds": vals, "n_folds": len(ok), "pooled": pooled[m]}
    return out


# --------------------------------------------------------------------------- linear probes

def _fit_linear(x: torch.Tensor, loss_fn: Any, n_out: int, l2: float, steps: int = 100
                ) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], n_out)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=steps,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(lin(x)) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def probe_cv(features: np.ndarray, ep: Endpoints, folds: Sequence[np.ndarray],
             l2: float = 1e-2) -> CVPredictions:
    """L2 linear probes per fold on standardised features: logistic (locations, pos-weighted),
    softmax (emphysema class), ridge (score) and linear Cox (survival)."""
    feats = np.asarray(features, dtype=np.float64)
    n = feats.shape[0]
    pred = CVPredictions(list(folds), np.full((n, ep.locations.shape[1]), np.nan),
                         np.full((n, len(EMPHYSEMA_NAMES)), np.nan), np.full(n, np.nan),
                         np.full(n, np.nan))
    for test in folds:
        tr = np.setdiff1d(np.arange(n), test)
        mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-6
        x_tr = torch.tensor((feats[tr] - mu) / sd, dtype=torch.float32)
        x_te = torch.tensor((feats[test] - mu) / sd, dtype=torch.float32)
        y = torch.tensor(ep.locations[tr], dtype=torch.float32)
        pw = (len(tr) - y.sum(0)) / y.sum(0).clamp_min(1.0)
        lin = _fit_linear(x_tr, lambda z, y=y, pw=pw: F.binary_cross_entropy_with_logits(
            z, y, pos_weight=pw), y.shape[1], l2)
        cls = torch.tensor(ep.emphysema_class[tr])
        soft = _fit_linear(x_tr, lambda z, c=cls: F.cross_entropy(z, c), len(EMPHYSEMA_NAMES),
                           l2)
        tt = torch.tensor(ep.time[tr], dtype=torch.float32)
        ee = torch.tensor(ep.event[tr], dtype=torch.float32)
        cox = _fit_linear(x_tr, lambda z, t=tt, e=ee: cox_partial_likelihood(z[:, 0], t, e),
                          1, l2)
        a = np.c_[x_tr.double().numpy(), np.ones(len(tr))]
        reg = np.eye(a.shape[1]) * l2 * len(tr)
        reg[-1, -1] = 0.0
        w = np.linalg.solve(a.T @ a + reg, a.T @ ep.emphysema_score[tr])
        with torch.no_grad():
            pred.locations[test] = torch.sigmoid(lin(x_te)).numpy()
            pred.emphysema[test] = soft(x_te).numpy()
            pred.risk[test] = cox(x_te)[:, 0].numpy()
        pred.score[test] = np.c_[x_te.double().numpy(), np.ones(len(test))] @ w
    return pred


# --------------------------------------------------------------------------- report

def _finite(obj: Any) -> Any:
    """NaN -> None, so the JSON is strict."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def results_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per representation, mean ± sd over folds (pooled in brackets)."""
    reps = result["representations"]
    head = "| Representation | " + " | ".join(METRICS.values()) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for key, label in REPRESENTATIONS.items():
        if key not in reps:
            continue
        cells = []
        for m in METRICS:
            s = reps[key]["metrics"][m]
            digits = 2 if m == "score_mae" else 3
            cells.append(f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
                         f"[{s['pooled']:.{digits}f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    folds = result.get("folds", "?")
    lines.append("")
    lines.append(f"{result.get('n_volumes', '?')} volumes, {folds}-fold CV by patient; "
                 "mean ± sd over folds, [pooled out-of-fold]. Higher is better except MAE.")
    return "\n".join(lines) + "\n"


def evaluate_representations(volume_features: dict[str, np.ndarray],
                             slice_bags: dict[str, list[torch.Tensor]], ep: Endpoints,
                             folds: int = 5, seed: int = 0,
                             clear_cfg: ClearConfig | None = None,
                             lesion_slices: Sequence[Sequence[int]] | None = None
                             ) -> dict[str, Any]:
    """Score volume features (linear probes) and slice bags (CLEAR ABMIL) on one fold split."""
    test_folds = patient_folds(ep.patients, folds, seed)
    reps: dict[str, Any] = {}
    for name, bags in slice_bags.items():
        t0 = time.time()
        pred = train_clear(bags, ep, clear_cfg or SMALL_DATA_CLEAR, folds, seed,
                           lesion_slices=lesion_slices)
        reps[name] = {"metrics": summarise(pred, ep), "head": "ABMIL",
                      "eval_seconds": round(time.time() - t0, 1), "info": pred.info}
    for name, feats in volume_features.items():
        t0 = time.time()
        pred = probe_cv(feats, ep, test_folds)
        reps[name] = {"metrics": summarise(pred, ep), "head": "linear probe",
                      "eval_seconds": round(time.time() - t0, 1)}
    return {"n_volumes": len(ep), "folds": folds, "seed": seed,
            "fold_volumes": [[ep.volume_ids[i] for i in f] for f in test_folds],
            "representations": reps}


def run_volume_benchmark(data: str | os.PathLike[str], out: str | os.PathLike[str],
                         budget_minutes: float = 20.0, folds: int = 5, seed: int = 0,
                         lecl_preset: str = "small", drasclr_preset: str = "small",
                         lattice: tuple[int, int, int] = (4, 4, 4), max_epochs: int = 200,
                         batch_size: int = 32, clear_cfg: ClearConfig | None = None
                         ) -> dict[str, Any]:
    """Pre-train the four encoders at equal wall-clock budget, evaluate all five, write
    ``out/volume_benchmark.json`` and ``out/volume_benchmark.md``.

    Args:
        budget_minutes: total pre-training time, split equally between LeCL, MoCo v3, DrasCLR
            and plain DrasCLR (each also stops after ``max_epochs``).
        clear_cfg: ABMIL settings (default :data:`SMALL_DATA_CLEAR`).
    """
    from vlm.train import drasclr as dr
    from vlm.train import lecl as lc

    ds = CTDataset(data)  # not a PhantomCT folder: one line before OUT is created
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ep = ds.endpoints()
    patient_folds(ep.patients, folds, seed)  # a fold count the data cannot fill: refused now,
    # not after the whole pre-training budget (--folds 0 was a ZeroDivisionError at the end)
    every = list(range(len(ds)))
    val = [i for i, r in enumerate(ds.rows) if r["split"] == "val"]
    per = budget_minutes / 4.0
    train_info: dict[str, Any] = {}

    def loop_cfg(module: Any) -> Any:
        return module.default_train_config(epochs=max_epochs, batch_size=batch_size,
                                           max_minutes=per, seed=seed, log_every=1000)

    bags: dict[str, list[torch.Tensor]] = {}
    for name, w in (("clear_lecl", 10.0), ("clear_moco", 0.0)):
        folder = out / name
        t0 = time.time()
        summary = lc.train_lecl(ds, folder, lc.lecl_config(lecl_preset), w, loop_cfg(lc),
                                volumes=every, val_volumes=val)
        emb = lc.extract_slice_embeddings(folder / "last", ds)
        bags[name] = emb.bags
        train_info[name] = {"steps": summary["steps"], "train_seconds": summary["seconds"],
                            "total_seconds": round(time.time() - t0, 1)}
    feats: dict[str, np.ndarray] = {}
    for name, cond in (("drasclr", True), ("drasclr_plain", False)):
        folder = out / name
        t0 = time.time()
        summary = dr.train_drasclr(ds, folder, dr.drasclr_config(drasclr_preset, lattice=lattice),
                                   cond, loop_cfg(dr), volumes=every, val_volumes=val,
                                   lattice=lattice)
        feats[name] = dr.drasclr_volume_embeddings(folder / "last", ds)
        train_info[name] = {"steps": summary["steps"], "train_seconds": summary["seconds"],
                            "total_seconds": round(time.time() - t0, 1)}
    torch.manual_seed(seed)
    random_tower = LeCL(lc.lecl_config(lecl_preset))
    base = lc.extract_slice_embeddings(random_tower, ds)
    feats["baseline"] = torch.stack([b.mean(0) for b in base.bags]).numpy()
    train_info["baseline"] = {"steps": 0, "train_seconds": 0.0}

    lesion = [ds.lesion_slices(i) for i in range(len(ds))]
    result = evaluate_representations(feats, bags, ep, folds, seed, clear_cfg, lesion)
    for name, info in train_info.items():
        result["representations"][name]["pretraining"] = info
    result.update(budget_minutes=budget_minutes, lecl_preset=lecl_preset,
                  drasclr_preset=drasclr_preset, lattice=list(lattice),
                  shape=ds.rows[0]["shape"])
    (out / "volume_benchmark.json").write_text(json.dumps(_finite(result), indent=2) + "\n")
    table = results_table(result)
    (out / "volume_benchmark.md").write_text(table)
    logger.info("volume benchmark:\n%s", table)
    return result
