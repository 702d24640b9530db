"""Seeded synthetic clustered unit vectors for the index tests, and a small real index (a
plain folder of tiny radiographs ingested with the untrained tiny model) to maintain."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

#: images in the ``plain_archive`` folder
PLAIN_N = 10


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


@pytest.fixture(scope="session")
def plain_archive(tmp_path_factory) -> Path:
    """A plain folder (no data set manifest, as a PACS export is) of PLAIN_N tiny DICOM
    radiographs, patients P000, P001, ..."""
    from tests.tiny_cxr import make_tiny_cxr

    root = make_tiny_cxr(tmp_path_factory.mktemp("plain_archive"), n=PLAIN_N, size=48)
    (root / "manifest.jsonl").unlink()
    return root / "dicom"


@pytest.fixture(scope="session")
def plain_built(plain_archive, tiny_model, tmp_path_factory) -> Path:
    from index.ingest import ingest
    from vlm.inference import Encoder

    out = tmp_path_factory.mktemp("plain_built") / "idx"
    report = ingest(Encoder(tiny_model), plain_archive, out, workers=0, batch_size=4,
                    progress=False)
    assert report.added == PLAIN_N and not report.failed
    return out


@pytest.fixture
def plain_index(plain_built, tmp_path) -> Path:
    """A fresh copy of ``plain_built`` for a test to change."""
    shutil.copytree(plain_built, tmp_path / "idx")
    return tmp_path / "idx"
