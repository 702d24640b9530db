"""faiss-gpu when a CUDA GPU is visible, faiss-cpu otherwise; callers use the same API.

Everything here is a no-op (returns ``None``/``False``) without a GPU, so the rest of
:mod:`index` never branches on the faiss build.

Public API: :func:`gpu_available`, :func:`to_gpu`, :func:`gpu_clustering_index`,
:func:`search_filtered`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)

#: Set to ``0`` to keep everything on the CPU even when a GPU is visible.
GPU_ENV = "RADLENS_INDEX_GPU"

_resources: Any = None


def gpu_available() -> bool:
    """True when this faiss build sees a GPU and ``RADLENS_INDEX_GPU`` is not ``0``."""
    if os.environ.get(GPU_ENV, "1") == "0":
        return False
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return bool(get and get() > 0)
    except Exception:  # pragma: no cover - broken CUDA runtime
        return False


def _gpu_resources() -> Any:
    global _resources
    if _resources is None:
        _resources = faiss.StandardGpuResources()
    return _resources


def to_gpu(index: faiss.Index) -> faiss.Index | None:
    """A GPU clone of ``index`` for searching, or ``None`` (no GPU, or a type GPUs lack).

    Fast-scan PQ and HNSW have no GPU version; those stay on the CPU.
    """
    if not gpu_available() or index.ntotal == 0:
        return None
    try:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index, co)
    except Exception as exc:  # faiss raises RuntimeError for unsupported types
        logger.info("index %s stays on the CPU: %s", type(index).__name__,
                    str(exc).splitlines()[0] if str(exc) else exc)
        return None


def gpu_clustering_index(dim: int) -> faiss.Index | None:
    """An inner-product flat index on the GPU to run k-means for IVF training, or ``None``."""
    if not gpu_available():
        return None
    try:
        return faiss.index_cpu_to_gpu(_gpu_resources(), 0, faiss.IndexFlatIP(dim))
    except Exception as exc:  # pragma: no cover - needs a GPU
        logger.warning("IVF training stays on the CPU: %s", exc)
        return None


def search_filtered(index: Any, q: np.ndarray, kf: int, mask: np.ndarray | None, nprobe: int,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
    """Search a GPU index, which takes no ``IDSelector``: over-fetch, drop slots outside
    ``mask``, and double the fetch until ``kf`` rows are found or nothing more can be fetched.

    Returns ``(distances, slots)`` like faiss.
    """
    if hasattr(index, "nprobe"):
        index.nprobe = nprobe
    limit = min(2048, n)  # faiss-gpu's largest k
    fetch = min(kf, limit)
    while True:
        d, i = index.search(q, fetch)
        if mask is not None:
            bad = (i >= 0) & ~mask[np.clip(i, 0, None)]
            i = np.where(bad, -1, i)
            d = np.where(bad, -np.inf, d)
            order = np.argsort(i < 0, axis=1, kind="stable")
            i, d = np.take_along_axis(i, order, 1), np.take_along_axis(d, order, 1)
        if fetch >= limit or (i[:, :kf] >= 0).all():
            pad = max(0, kf - i.shape[1])
            i = np.pad(i[:, :kf], ((0, 0), (0, pad)), constant_values=-1)
            d = np.pad(d[:, :kf], ((0, 0), (0, pad)), constant_values=-np.inf)
            return d, i
        fetch = min(2 * fetch, limit)
