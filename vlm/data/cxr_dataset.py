"""PhantomCXR (or any archive with the same manifest) as model-ready arrays.

Images are decoded once with :mod:`vlm.io`, windowed, letterboxed to the model size and cached
as uint8 (a few hundred MB for thousands of studies) in ``<root>/.cache``; augmentation runs on
the cached array, seeded by (seed, epoch, index) so runs and resumes are deterministic.

The cache is keyed by the rows' files with their sizes and modification times and by the
preprocessing settings, so images regenerated or replaced under the same names are decoded
again. A row whose image cannot be read (missing, not an image) is left out of the data set with
one warning listing the files and why (:attr:`CXRDataset.skipped`); a split with no readable
image is a one-line error.
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

from vlm.cpus import available_cpus
from vlm.data.manifest import read_jsonl
from vlm.data.reports import report_text
from vlm.data.transforms import Preprocess, display_unit, letterbox
from vlm.errors import ImageReadError, RadLensError
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


def check_workers(workers: int | None) -> None:
    """``workers`` of :class:`CXRDataset`: None (all cores), 0 (this process) or a count."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 0):
        raise RadLensError(f"--workers must be 0 (decode in this process) or a number of "
                           f"processes, got {workers}")


def _load_one(args: tuple[str, dict[str, Any]]) -> tuple[np.ndarray | None, str | None]:
    """(uint8 image, None), or (None, why it cannot be read): a failure is returned, not
    raised, so one bad file neither stops a worker pool nor needs its exception pickled."""
    from vlm.io import read_image

    path, cfg = args
    pre = PreprocessConfig(**cfg)
    try:
        image = read_image(path)
    except ImageReadError as exc:
        return None, exc.reason
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    except Exception as exc:  # a reader bug on one odd file must not stop the data set
        return None, " ".join(f"unexpected {type(exc).__name__}: {exc}".split())[:300]
    unit = torch.as_tensor(display_unit(image, pre.window))
    x, _ = letterbox(unit, pre.image_size)
    return np.rint(x.numpy() * 255).astype(np.uint8), None


def _stamp(path: Path) -> list[int] | None:
    """(size, mtime_ns) of ``path``, or None when it cannot be read (part of the cache key)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class CXRDataset:
    """Rows of one split with cached images and report texts."""

    def __init__(self, root: str | os.PathLike[str], split: str | Sequence[str],
                 preprocess: PreprocessConfig, workers: int | None = None,
                 require_text: bool = True) -> None:
        check_workers(workers)
        self.root = Path(root)
        manifest = self.root / "manifest.jsonl"
        if not manifest.is_file():
            raise RadLensError(f"{self.root}: no manifest.jsonl (generate data with "
                               "'radlens data phantom-cxr --out DIR')")
        splits = {split} if isinstance(split, str) else set(split)
        every = list(read_jsonl(manifest))
        rows = [r for r in every if r.get("split") in splits]
        if require_text:
            rows = [r for r in rows if row_text(r)]
        if not rows:
            present = sorted({str(r["split"]) for r in every if r.get("split")})
            raise RadLensError(f"{manifest}: no rows in split {sorted(splits)} (its splits: "
                               f"{', '.join(present) or 'none'})")
        bad = next((r for r in rows if not isinstance(r.get("file"), str) or not r["file"]),
                   None)
        if bad is not None:
            raise RadLensError(f"{manifest}: a row in split {sorted(splits)} has no image file "
                               f"(row id {bad.get('id')!r})")
        self.rows = rows
        self.preprocess = preprocess
        #: the rows left out because their image could not be read: {"file", "reason"}
        self.skipped: list[dict[str, str]] = []
        self.images = self._cached_images(workers)
        if self.skipped:
            listed = "; ".join(f"{s['file']}: {s['reason']}" for s in self.skipped[:10])
            more = f"; and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            logger.warning("%d of %d images of split %s cannot be read and are left out: %s%s",
                           len(self.skipped), len(self.skipped) + len(self.rows),
                           "/".join(sorted(splits)), listed, more)
        self.texts = [row_text(r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def _cached_images(self, workers: int | None) -> np.ndarray:
        """Decode (or load the cache of) every row's image; rows that cannot be read are moved
        from ``rows`` to ``skipped``."""
        files = [r["file"] for r in self.rows]
        stamps = [_stamp(self.root / f) for f in files]
        key = hashlib.sha256(json.dumps([files, stamps, asdict(self.preprocess)]).encode()
                             ).hexdigest()[:16]
        cache = self.root / ".cache" / f"images-{key}.npy"
        side = cache.with_suffix(".skipped.json")  # written before the array
        if cache.is_file() and side.is_file():
            try:
                skipped = json.loads(side.read_text(encoding="utf-8"))
                images = np.load(cache, mmap_mode="r")
            except (OSError, ValueError):
                pass  # a damaged cache is decoded again
            else:
                gone = {int(s["index"]) for s in skipped}
                if len(images) + len(gone) == len(self.rows):
                    self._drop(skipped)
                    return images
        jobs = [(str(self.root / f), asdict(self.preprocess)) for f in files]
        if workers is None:
            workers = available_cpus()
        logger.info("decoding %d images %s", len(jobs),
                    f"with {workers} workers" if workers > 1 else "in this process")
        if workers > 1:
            # spawn, not fork: a forked child of a process that already ran torch's thread
            # pool can deadlock inside the first torch op
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                results = list(pool.map(_load_one, jobs, chunksize=16))
        else:
            results = [_load_one(j) for j in jobs]
        skipped = [{"index": i, "file": files[i], "reason": why}
                   for i, (_, why) in enumerate(results) if why is not None]
        arrays = [a for a, _ in results if a is not None]
        if not arrays:
            first = skipped[0]
            raise RadLensError(f"{self.root}: none of the {len(files)} images of this split "
                               f"can be read (first: {first['file']}: {first['reason']})")
        stack = np.stack(arrays)
        cache.parent.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()  # concurrent runs
        tmp_side = side.with_name(f".{side.name}.{pid}.tmp")
        tmp_side.write_text(json.dumps(skipped), encoding="utf-8")
        os.replace(tmp_side, side)
        tmp = cache.with_name(f".{cache.stem}.{pid}.tmp.npy")
        np.save(tmp, stack)
        os.replace(tmp, cache)
        self._drop(skipped)
        return stack

    def _drop(self, skipped: list[dict[str, Any]]) -> None:
        gone = {int(s["index"]) for s in skipped}
        self.rows = [r for i, r in enumerate(self.rows) if i not in gone]
        self.skipped = [{"file": str(s["file"]), "reason": str(s["reason"])} for s in skipped]

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
