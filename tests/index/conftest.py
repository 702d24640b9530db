"""Seeded synthetic clustered unit vectors for the index tests."""

from __future__ import annotations

import numpy as np
import pytest


def clustered(n: int, dim: int, *, clusters: int = 50, seed: int = 0,
              spread: float = 0.35) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (float32, seeded)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)]
    x = x + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim) * 2
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near(x: np.ndarray, n: int, *, seed: int = 1, noise: float = 0.1) -> np.ndarray:
    """``n`` queries drawn near rows of ``x``."""
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), n, replace=False)]
    q = q + noise * rng.standard_normal(q.shape).astype(np.float32) / np.sqrt(x.shape[1])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k row numbers by inner product."""
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of ``truth`` rows present in ``found`` rows."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1]
                          for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="session")
def data_64() -> np.ndarray:
    return clustered(20_000, 64, seed=0)
