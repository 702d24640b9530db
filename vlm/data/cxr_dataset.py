"""PhantomCXR (or any archive with the same manifest) as model-ready arrays.

Images are decoded once with :mod:`vlm.io`, windowed, letterboxed to the model size and cached
as uint8 (a few hundred MB for thousands of studies) in ``<root>/.cache``; augmentation runs on
the cached array, seeded by (seed, epoch, index) so runs and resumes are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm.data.manifest import read_jsonl
from vlm.data.reports import report_text
from vlm.data.transforms import Preprocess, display_unit, letterbox
from vlm.errors import RadLensError
from vlm.models.config import PreprocessConfig

logger = logging.getLogger(__name__)


def row_text(row: dict[str, Any]) -> str:
    """The report text a model reads: FINDINGS + IMPRESSION (PhantomCXR field names)."""
    return report_text(row.get("findings_text") or row.get("findings_section"),
                       row.get("impression"))


def _worker_init() -> None:
    from vlm.interrupt import ignore_stop_signals

    torch.set_num_threads(1)
    # Ctrl-C stops the run in the main process, which cancels the queued images; SIGTERM is
    # left alone: nothing else would stop these workers if the main process died of it
    ignore_stop_signals(sigterm=False)


def _load_one(args: tuple[str, dict[str, Any]]) -> np.ndarray:
    from vlm.io import read_image

    path, cfg = args
    pre = PreprocessConfig(**cfg)
    unit = torch.as_tensor(display_unit(read_image(path), pre.window))
    x, _ = letterbox(unit, pre.image_size)
    return np.rint(x.numpy() * 255).astype(np.uint8)


class CXRDataset:
    """Rows of one split with cached images and report texts."""

    def __init__(self, root: str | os.PathLike[str], split: str | Sequence[str],
                 preprocess: PreprocessConfig, workers: int | None = None,
                 require_text: bool = True) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.jsonl"
        if not manifest.is_file():
            raise RadLensError(f"{self.root}: no manifest.jsonl (generate data with "
                               "'radlens data phantom-cxr --out DIR')")
        splits = {split} if isinstance(split, str) else set(split)
        rows = [r for r in read_jsonl(manifest) if r.get("split") in splits]
        if require_text:
            rows = [r for r in rows if row_text(r)]
        if not rows:
            raise RadLensError(f"{manifest}: no rows in split {sorted(splits)}")
        self.rows = rows
        self.texts = [row_text(r) for r in rows]
        self.preprocess = preprocess
        self.images = self._cached_images(workers)

    def __len__(self) -> int:
        return len(self.rows)

    def _cached_images(self, workers: int | None) -> np.ndarray:
        key = hashlib.sha256(json.dumps([[r["file"] for r in self.rows],
                                         asdict(self.preprocess)]).encode()).hexdigest()[:16]
        cache = self.root / ".cache" / f"images-{key}.npy"
        if cache.is_file():
            return np.load(cache, mmap_mode="r")
        jobs = [(str(self.root / r["file"]), asdict(self.preprocess)) for r in self.rows]
        workers = workers or max(1, (os.cpu_count() or 2))
        logger.info("decoding %d images with %d workers", len(jobs), workers)
        if workers > 1:
            # spawn, not fork: a forked child of a process that already ran torch's thread
            # pool can deadlock inside the first torch op
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                arrays = list(pool.map(_load_one, jobs, chunksize=16))
        else:
            arrays = [_load_one(j) for j in jobs]
        stack = np.stack(arrays)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.tmp.npy")  # concurrent runs
        np.save(tmp, stack)
        os.replace(tmp, cache)
        return stack

    def image_tensor(self, index: int, augment: Preprocess | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised (C, S, S) tensor; augmented with ``augment`` when given."""
        x = torch.from_numpy(np.asarray(self.images[index], dtype=np.float32) / 255.0)
        if augment is not None:
            augment.generator = generator
            x = augment.augment(x)
        cfg = self.preprocess
        x = (x - cfg.mean) / cfg.std
        return x.unsqueeze(0).expand(cfg.channels, -1, -1).contiguous()

    def labels(self, findings: Sequence[str]) -> np.ndarray:
        """(N, F) 0/1 matrix of finding labels."""
        return np.array([[int(f in r.get("labels", [])) for f in findings] for r in self.rows],
                        dtype=np.int64)
