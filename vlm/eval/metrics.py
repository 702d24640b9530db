"""Retrieval and classification metrics (plain numpy, tested against direct computations)."""

from __future__ import annotations

from collections.abc import Callable

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
                  seed: int = 0, per_query: dict[str, list[float]] | None = None
                  ) -> dict[str, float]:
    """Label-matched retrieval: an item is relevant when its finding set equals the query's.

    Returns hit@k and mAP@k of the model's ranking and of a random ranking (the baseline).
    Queries with no relevant item are skipped. ``per_query``, if given, receives each scored
    query's ``query`` index, ``hit`` and ``ap`` (for confidence intervals).
    """
    rng = np.random.default_rng(seed)
    hits, aps, rhits, raps = [], [], [], []
    scored: list[float] = []
    items = np.array([hash(s) for s in item_labels])
    for q, labels in enumerate(query_labels):
        rel_all = items == hash(labels)
        rel_all &= np.array([s == labels for s in item_labels])
        if not rel_all.any():
            continue
        ranked = rel_all[np.argsort(-scores[q], kind="stable")]
        hits.append(float(ranked[:k].any()))
        aps.append(average_precision_at_k(ranked, k))
        scored.append(float(q))
        for _ in range(random_rounds):
            perm = rel_all[rng.permutation(len(rel_all))]
            rhits.append(float(perm[:k].any()))
            raps.append(average_precision_at_k(perm, k))
    if per_query is not None:
        per_query.update(query=scored, hit=hits, ap=aps)
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


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, rounds: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic(counts)``, where ``counts`` (length ``n``)
    says how often each of the ``n`` units (studies) was drawn in one resample with
    replacement. Resamples where the statistic is undefined (NaN: a finding with no positive
    drawn, say) are left out; None when fewer than half of them are defined."""
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(np.bincount(rng.integers(0, n, n), minlength=n))
                       for _ in range(rounds)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < rounds / 2:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def weighted_auc(y: np.ndarray, score: np.ndarray, weight: np.ndarray) -> float:
    """:func:`roc_auc` of a sample in which item i occurs ``weight[i]`` times (a bootstrap
    resample, without copying it): ties averaged, NaN without both classes."""
    y = np.asarray(y).astype(bool)
    w = np.asarray(weight, dtype=np.float64)
    pos, neg = float(w[y].sum()), float(w[~y].sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="stable")
    s, yy, ww = np.asarray(score)[order], y[order], w[order]
    # each positive beats the negatives below it and ties half of those level with it
    uniq, start = np.unique(s, return_index=True)
    neg_w = np.where(yy, 0.0, ww)
    neg_by_level = np.add.reduceat(neg_w, start)
    below = np.concatenate([[0.0], np.cumsum(neg_by_level)[:-1]])
    level_of = np.searchsorted(uniq, s)
    wins = below[level_of] + 0.5 * neg_by_level[level_of]
    return float((ww * yy * wins).sum() / (pos * neg))
