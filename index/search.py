"""Numpy helpers shared by the collections: normalisation, exact subset search, re-ranking.

Public API: :func:`normalise`, :func:`exact_search`, :func:`rerank`.
"""

from __future__ import annotations

import numpy as np

from index.errors import DimensionError

#: Queries handled per block when gathering stored vectors (bounds temporary memory).
BLOCK = 256


def normalise(vectors: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """``vectors`` as a C-contiguous float32 ``(n, dim)`` array of unit rows.

    Raises:
        DimensionError: Wrong shape, non-finite values or an all-zero row.
    """
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        got = arr.shape[-1] if arr.ndim >= 1 and arr.size else arr.shape
        raise DimensionError(f"{what} expects {dim}-dimensional vectors, got {got} "
                             f"(shape {tuple(np.shape(vectors))}): use the index's model")
    if arr.shape[0] == 0:
        return np.ascontiguousarray(arr)
    if not np.isfinite(arr).all():
        raise DimensionError(f"{what}: vectors contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise DimensionError(f"{what}: a vector is all zeros and has no direction")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def _topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k positions and scores of ``scores`` (padding with -1 / -inf)."""
    nq, n = scores.shape
    pos = np.full((nq, k), -1, np.int64)
    val = np.full((nq, k), -np.inf, np.float32)
    kk = min(k, n)
    if kk == 0:
        return pos, val
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(
        np.arange(n), (nq, 1))
    ps = np.take_along_axis(scores, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    pos[:, :kk] = np.take_along_axis(part, order, 1)
    val[:, :kk] = np.take_along_axis(ps, order, 1)
    val[pos < 0] = -np.inf
    return pos, val


def exact_search(q: np.ndarray, vecs: np.ndarray, subset: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` over the rows ``subset`` of ``vecs``. Returns ``(slots, scores)``."""
    slots = np.full((q.shape[0], k), -1, np.int64)
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    if len(subset) == 0:
        return slots, scores
    best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
    best_i = np.full((q.shape[0], 0), -1, np.int64)
    step = max(4096, (64 << 20) // (4 * (vecs.shape[1] + q.shape[0])))
    for start in range(0, len(subset), step):
        part = subset[start:start + step]
        block = np.asarray(vecs[part], np.float32)
        sc = q @ block.T
        pos, val = _topk(sc, k)
        cand = np.where(pos >= 0, part[np.clip(pos, 0, None)], -1)
        best_s = np.concatenate([best_s, val], axis=1)
        best_i = np.concatenate([best_i, cand], axis=1)
        pos, val = _topk(best_s, k)
        best_i = np.take_along_axis(best_i, np.clip(pos, 0, None), 1)
        best_i[pos < 0] = -1
        best_s = val
    return best_i, best_s


def rerank(q: np.ndarray, vecs: np.ndarray, cand: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-score candidate slots ``cand`` (``-1`` = none) exactly; keep the best ``k``."""
    nq = q.shape[0]
    slots = np.full((nq, k), -1, np.int64)
    scores = np.full((nq, k), -np.inf, np.float32)
    for start in range(0, nq, BLOCK):
        c = cand[start:start + BLOCK]
        valid = c >= 0
        rows = np.asarray(vecs[np.where(valid, c, 0).ravel()], np.float32)
        rows = rows.reshape(c.shape[0], c.shape[1], -1)
        sc = np.einsum("qd,qkd->qk", q[start:start + BLOCK], rows)
        sc[~valid] = -np.inf
        pos, val = _topk(sc, k)
        got = np.take_along_axis(c, np.clip(pos, 0, None), 1)
        got[pos < 0] = -1
        got[~np.isfinite(val)] = -1
        slots[start:start + BLOCK] = got
        scores[start:start + BLOCK] = val
    return slots, scores
