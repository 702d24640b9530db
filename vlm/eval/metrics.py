"""Retrieval and classification metrics (plain numpy, tested against direct computations)."""

from __future__ import annotations

import numpy as np


def recall_at_k(scores: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Exact-instance recall@k for a square score matrix whose diagonal holds the matches."""
    n = scores.shape[0]
    order = np.argsort(-scores, axis=1, kind="stable")
    rank = np.argmax(order == np.arange(n)[:, None], axis=1)  # 0-based rank of the match
    return {f"R@{k}": float((rank < k).mean()) for k in ks}


def average_precision_at_k(relevant: np.ndarray, k: int = 10) -> float:
    """AP@k of one ranked 0/1 relevance row (normalised by min(#relevant, k))."""
    total = int(relevant.sum())
    if total == 0:
        return 0.0
    rel = relevant[:k].astype(np.float64)
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / min(total, k))


def label_matched(scores: np.ndarray, query_labels: list[frozenset[str]],
                  item_labels: list[frozenset[str]], k: int = 10, random_rounds: int = 20,
                  seed: int = 0) -> dict[str, float]:
    """Label-matched retrieval: an item is relevant when its finding set equals the query's.

    Returns hit@k and mAP@k of the model's ranking and of a random ranking (the baseline).
    Queries with no relevant item are skipped.
    """
    rng = np.random.default_rng(seed)
    hits, aps, rhits, raps = [], [], [], []
    items = np.array([hash(s) for s in item_labels])
    for q, labels in enumerate(query_labels):
        rel_all = items == hash(labels)
        rel_all &= np.array([s == labels for s in item_labels])
        if not rel_all.any():
            continue
        ranked = rel_all[np.argsort(-scores[q], kind="stable")]
        hits.append(float(ranked[:k].any()))
        aps.append(average_precision_at_k(ranked, k))
        for _ in range(random_rounds):
            perm = rel_all[rng.permutation(len(rel_all))]
            rhits.append(float(perm[:k].any()))
            raps.append(average_precision_at_k(perm, k))
    return {f"hit@{k}": float(np.mean(hits)), f"mAP@{k}": float(np.mean(aps)),
            f"random_hit@{k}": float(np.mean(rhits)), f"random_mAP@{k}": float(np.mean(raps)),
            "queries": len(hits)}


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties averaged), NaN without both classes."""
    y = np.asarray(y).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))
