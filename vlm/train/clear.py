"""CLEAR downstream: ABMIL over slice embeddings, cross-validated by patient.

Per outer fold, one :class:`~vlm.models.clear.ClearMIL` per endpoint is trained on the other
folds (Adam, early stopping on an inner validation split by patient, best state kept):

* ``locations``: 8 lesion locations, BCE with positive-class weights (the official task);
* ``emphysema``: emphysema class as 4 one-vs-rest BCE outputs (same head, same loss);
* ``survival``: the Cox head (one log-risk, negative partial likelihood);
* ``score``: emphysema score, the multilabel head with one output and an MSE loss on the
  standardised score (RadLens addition; CLEAR has no regression task).

Out-of-fold predictions come back in a :class:`CVPredictions`; metrics are computed by
:mod:`vlm.eval.volumes` so every representation is scored by the same code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm.data.ct_dataset import EMPHYSEMA_NAMES, CTDataset, Endpoints
from vlm.data.phantom_ct.tissues import LOCATION_CLASSES
from vlm.errors import ConfigError
from vlm.losses import cox_partial_likelihood
from vlm.models.clear import ClearConfig, ClearMIL, pad_bags, positive_class_weights, select_slices

logger = logging.getLogger(__name__)

ENDPOINTS = ("locations", "emphysema", "survival", "score")


@dataclass
class CVPredictions:
    """Out-of-fold predictions of one representation (rows = volumes)."""

    folds: list[np.ndarray]  # test indices of each fold (a partition of range(N))
    locations: np.ndarray  # (N, 8) scores
    emphysema: np.ndarray  # (N, 4) class scores
    risk: np.ndarray  # (N,) log-risk (higher = earlier event)
    score: np.ndarray  # (N,) predicted emphysema score
    info: dict[str, list[float]] = field(default_factory=dict)  # e.g. epochs per fold


def patient_folds(patients: Sequence[str], k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """k test folds that partition the volumes; all volumes of a patient share one fold."""
    uniq = sorted(set(patients))
    if k < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, not {k}")
    if len(uniq) < k:
        raise ConfigError(f"{len(uniq)} patients cannot fill {k} folds: use fewer folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of = {uniq[p]: r % k for r, p in enumerate(order)}
    return [np.array([i for i, p in enumerate(patients) if fold_of[p] == f], dtype=int)
            for f in range(k)]


def inner_split(patients: Sequence[str], idx: np.ndarray, frac: float = 0.2, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (train, val) by patient, about ``frac`` of patients to val."""
    uniq = sorted({patients[i] for i in idx})
    n_val = max(1, round(frac * len(uniq))) if len(uniq) > 1 else 0
    val_p = set(np.random.default_rng(seed).permutation(uniq)[:n_val].tolist())
    val = np.array([i for i in idx if patients[i] in val_p], dtype=int)
    return np.array([i for i in idx if patients[i] not in val_p], dtype=int), val


def _bags(bags: Sequence[torch.Tensor], idx: np.ndarray, max_slices: int,
          keep: Sequence[Sequence[int]] | None, generator: torch.Generator | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = []
    for i in idx:
        b = bags[int(i)]
        if b.shape[0] > max_slices:
            if keep is None:  # evaluation: evenly spaced, no labels used
                sel = torch.linspace(0, b.shape[0] - 1, max_slices).round().long()
            else:
                sel = select_slices(b.shape[0], max_slices, keep[int(i)], generator)
            b = b[sel]
        chosen.append(b)
    return pad_bags(chosen)


def _loss(kind: str, out_logits: torch.Tensor, y: torch.Tensor,
          pos_weight: torch.Tensor | None) -> torch.Tensor:
    if kind == "survival":
        return cox_partial_likelihood(out_logits[:, 0], y[:, 0], y[:, 1])
    if kind == "score":
        return F.mse_loss(out_logits[:, 0], y[:, 0])
    return F.binary_cross_entropy_with_logits(out_logits, y, pos_weight=pos_weight)


def fit_mil(bags: Sequence[torch.Tensor], targets: torch.Tensor, kind: str, cfg: ClearConfig,
            train_idx: np.ndarray, val_idx: np.ndarray, seed: int = 0,
            keep: Sequence[Sequence[int]] | None = None) -> tuple[ClearMIL, int]:
    """One ABMIL on ``train_idx``, early-stopped on ``val_idx``; returns (best model, epochs).

    ``targets`` (N, C): 0/1 labels, (time, event) for ``survival``, the standardised score.
    """
    torch.manual_seed(seed)
    n_out = targets.shape[1]
    mcfg = dataclasses.replace(cfg, task="cox" if kind == "survival" else "multilabel",
                               n_outputs=1 if kind in ("survival", "score") else n_out)
    model = ClearMIL(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pos_weight = (positive_class_weights(targets[train_idx])
                  if kind in ("locations", "emphysema") else None)
    g = torch.Generator().manual_seed(seed)
    val_x = _bags(bags, val_idx, cfg.max_slices, None, None) if len(val_idx) else None
    best, best_state, best_epoch, waited = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    bs = cfg.batch_size
    for epoch in range(cfg.epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g).numpy()]
        # the Cox likelihood needs risk sets: one batch per epoch when the fold is small
        step = len(order) if kind == "survival" else bs
        for s in range(0, len(order), step):
            chunk = order[s:s + step]
            if len(chunk) < 2:
                continue
            x, mask = _bags(bags, chunk, cfg.max_slices, keep, g)
            loss = _loss(kind, model(x, mask).logits, targets[chunk], pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val_x is None:
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch + 1
            continue
        model.eval()
        with torch.no_grad():
            val = float(_loss(kind, model(*val_x).logits, targets[val_idx], pos_weight))
        if kind == "survival" and int(targets[val_idx, 1].sum()) == 0:
            val = -epoch  # no event to judge by: keep the latest
        if val < best:
            best, best_state, best_epoch, waited = val, copy.deepcopy(model.state_dict()), \
                epoch + 1, 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), best_epoch


def endpoint_targets(ep: Endpoints) -> dict[str, torch.Tensor]:
    """Per-endpoint training targets (score standardised later, per fold)."""
    onehot = np.eye(len(EMPHYSEMA_NAMES), dtype=np.float32)[ep.emphysema_class]
    return {"locations": torch.tensor(ep.locations, dtype=torch.float32),
            "emphysema": torch.tensor(onehot),
            "survival": torch.tensor(np.stack([ep.time, ep.event], 1), dtype=torch.float32),
            "score": torch.tensor(ep.emphysema_score, dtype=torch.float32)[:, None]}


def train_clear(embeddings: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                labels: Endpoints, cfg: ClearConfig | None = None, folds: int = 5,
                seed: int = 0, endpoints: Sequence[str] = ENDPOINTS,
                lesion_slices: Sequence[Sequence[int]] | None = None) -> CVPredictions:
    """k-fold (by patient) ABMIL on per-volume slice embeddings; out-of-fold predictions.

    Args:
        embeddings: [(S_i, D)] in ``labels`` order, or {volume_id: (S_i, D)}.
        labels: endpoints of the same volumes (``CTDataset.endpoints()``).
        cfg: ABMIL settings (``in_dim`` is taken from the embeddings).
        lesion_slices: per volume, slices always kept in training when a volume has more than
            ``cfg.max_slices`` (lesion key slices).
    """
    bags = ([embeddings[v] for v in labels.volume_ids] if isinstance(embeddings, Mapping)
            else list(embeddings))
    if len(bags) != len(labels):
        raise ConfigError(f"{len(bags)} embedding bags for {len(labels)} volumes")
    bags = [b.float() for b in bags]
    unknown = set(endpoints) - set(ENDPOINTS)
    if unknown:
        raise ConfigError(f"unknown CLEAR endpoints {sorted(unknown)}: use {ENDPOINTS}")
    cfg = dataclasses.replace(cfg or ClearConfig(), in_dim=int(bags[0].shape[1]))
    n = len(bags)
    targets = endpoint_targets(labels)
    test_folds = patient_folds(labels.patients, folds, seed)
    pred = CVPredictions(test_folds, np.full((n, labels.locations.shape[1]), np.nan),
                         np.full((n, len(EMPHYSEMA_NAMES)), np.nan), np.full(n, np.nan),
                         np.full(n, np.nan), {f"epochs_{e}": [] for e in endpoints})
    for f, test in enumerate(test_folds):
        rest = np.setdiff1d(np.arange(n), test)
        tr, va = inner_split(labels.patients, rest, 0.2, seed + f)
        for kind in endpoints:
            y = targets[kind]
            mu = sd = 0.0
            if kind == "score":
                mu, sd = float(y[tr].mean()), float(y[tr].std().clamp_min(1e-6))
                y = (y - mu) / sd
            model, epochs = fit_mil(bags, y, kind, cfg, tr, va, seed * 1000 + f, lesion_slices)
            pred.info[f"epochs_{kind}"].append(float(epochs))
            with torch.no_grad():
                logits = model(*_bags(bags, test, cfg.max_slices, None, None)).logits.numpy()
            if kind == "locations":
                pred.locations[test] = 1.0 / (1.0 + np.exp(-logits))
            elif kind == "emphysema":
                pred.emphysema[test] = logits
            elif kind == "survival":
                pred.risk[test] = logits[:, 0]
            else:
                pred.score[test] = logits[:, 0] * sd + mu
    return pred


def train_clear_head(data: str | os.PathLike[str] | CTDataset,
                     slice_model: str | os.PathLike[str], out: str | os.PathLike[str],
                     cfg: ClearConfig | None = None, seed: int = 0) -> dict[str, Any]:
    """``radlens train clear``: one lesion-location ABMIL on a LeCL encoder's slice embeddings.

    Trained on the manifest's ``train`` split, early-stopped on ``val``, scored on ``test``;
    written as ``out/clear_mil.pt`` (put it in the LeCL run folder and
    :class:`~vlm.volume_encoder.VolumeEncoder` uses its attention and pooled embedding) with
    ``out/clear_mil.json`` (per-location test AUC, epochs, sizes).
    """
    from vlm.eval.metrics import roc_auc
    from vlm.train.lecl import extract_slice_embeddings
    from vlm.volume_encoder import save_clear_mil

    given = cfg or ClearConfig()
    if not (given.epochs >= 1 and given.batch_size >= 2 and math.isfinite(given.lr)
            and given.lr > 0):
        # --epochs 0 wrote an untrained head over a trained one, with exit 0; so did
        # --batch-size 1, as every one-bag batch is skipped (a step needs two bags)
        raise ConfigError(f"CLEAR training needs epochs >= 1, batch size >= 2 and a finite "
                          f"lr > 0 (got {given.epochs}, {given.batch_size}, {given.lr})")
    ds = data if isinstance(data, CTDataset) else CTDataset(data)
    split = np.array([r["split"] for r in ds.rows])
    tr, va, te = (np.flatnonzero(split == s) for s in ("train", "val", "test"))
    if len(tr) < 2 or len(va) < 1:
        raise ConfigError(f"{ds.root}: CLEAR needs >= 2 train and >= 1 val volumes in the "
                          f"manifest (found {len(tr)} train, {len(va)} val)")
    emb = extract_slice_embeddings(slice_model, ds)
    bags = [b.float() for b in emb.bags]
    ep = ds.endpoints()
    y = endpoint_targets(ep)["locations"]
    cfg = dataclasses.replace(cfg or ClearConfig(), in_dim=int(bags[0].shape[1]))
    lesion = [ds.lesion_slices(i) for i in range(len(ds))]
    model, epochs = fit_mil(bags, y, "locations", cfg, tr, va, seed, lesion)
    aucs: dict[str, float | None] = {}
    if len(te):
        with torch.no_grad():
            prob = torch.sigmoid(model(*_bags(bags, te, cfg.max_slices, None, None)).logits)
        for j, name in enumerate(LOCATION_CLASSES):
            auc = roc_auc(y[te, j].numpy(), prob[:, j].numpy())
            aucs[name] = None if np.isnan(auc) else round(float(auc), 4)
    scored = [a for a in aucs.values() if a is not None]
    summary = {"slice_model": str(Path(slice_model).resolve()), "endpoint": "locations",
               "train": len(tr), "val": len(va), "test": len(te), "epochs": epochs,
               "test_auc": aucs,
               "test_macro_auc": round(float(np.mean(scored)), 4) if scored else None,
               "config": dataclasses.asdict(model.cfg), "seed": seed}
    out = Path(out)
    save_clear_mil(model, out)
    (out / "clear_mil.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
