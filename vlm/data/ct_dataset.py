"""PhantomCT volumes for the CT recipes: cached HU arrays, slices with lesion boxes, endpoints.

A :class:`CTDataset` reads ``manifest.jsonl`` of a PhantomCT folder (see
:mod:`vlm.data.phantom_ct`). Volumes are read once with :func:`vlm.io.read_volume` and cached as
int16 HU arrays (``<root>/.cache/volumes/<volume_id>.npy``, memory-mapped on later reads), with
their content hash next to them; the hash keys every derived cache (slice embeddings). A cached
array is used only while its NIfTI file has the size and modification time it was cached from,
so a data set regenerated or replaced under the same volume ids is read afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm.data.lecl_views import slice_boxes
from vlm.data.manifest import read_jsonl
from vlm.data.phantom_ct.emphysema import EMPHYSEMA_CLASSES
from vlm.data.phantom_ct.tissues import LOCATION_CLASSES
from vlm.errors import ConfigError

logger = logging.getLogger(__name__)

EMPHYSEMA_NAMES: tuple[str, ...] = tuple(c[0] for c in EMPHYSEMA_CLASSES)
CACHE_DIR = ".cache"
#: Manifest splits whose volumes pre-train slice/volume encoders by default; "val" is held out.
PRETRAIN_SPLITS = ("train", "test")


@dataclass
class Endpoints:
    """Per-volume targets, rows aligned with the dataset's volumes."""

    volume_ids: list[str]
    patients: list[str]
    locations: np.ndarray  # (N, 8) 0/1, columns LOCATION_CLASSES
    emphysema_class: np.ndarray  # (N,) int index into EMPHYSEMA_NAMES
    emphysema_score: np.ndarray  # (N,) LAA%-950
    time: np.ndarray  # (N,) months
    event: np.ndarray  # (N,) 0/1

    def __len__(self) -> int:
        return len(self.volume_ids)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Endpoints:
        i = np.asarray(idx, dtype=int)
        return Endpoints([self.volume_ids[j] for j in i], [self.patients[j] for j in i],
                         self.locations[i], self.emphysema_class[i], self.emphysema_score[i],
                         self.time[i], self.event[i])


class CTDataset:
    """The volumes of a PhantomCT folder (optionally some splits only)."""

    def __init__(self, root: str | os.PathLike[str], splits: Sequence[str] | None = None,
                 cache: bool = True) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.jsonl"
        if not manifest.is_file():
            raise ConfigError(f"{self.root}: no manifest.jsonl; generate PhantomCT data first")
        rows = list(read_jsonl(manifest))
        _check_rows(self.root, rows)
        if splits is not None:
            rows = [r for r in rows if r["split"] in set(splits)]
        if not rows:
            raise ConfigError(f"{self.root}: no volumes in splits {splits}")
        self.rows: list[dict[str, Any]] = rows
        self.cache = cache
        self._hashes: dict[int, str] = {}
        self._fresh: set[int] = set()  # cached arrays checked against their source file

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def volume_ids(self) -> list[str]:
        return [r["volume_id"] for r in self.rows]

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_DIR

    def _cache_path(self, i: int) -> Path:
        return self.cache_dir / "volumes" / f"{self.rows[i]['volume_id']}.npy"

    def _source_stamp(self, i: int) -> str:
        """Size and modification time of volume ``i``'s NIfTI file: a cached array is used only
        while they are unchanged (the cache is named by volume id, which a regenerated or
        replaced data set reuses for other pixels)."""
        from vlm.errors import ImageReadError

        source = self.root / self.rows[i]["nifti"]
        try:
            st = source.stat()
        except OSError as exc:
            raise ImageReadError(source, f"unreadable ({exc.strerror or exc})") from None
        return json.dumps({"file": self.rows[i]["nifti"], "size": st.st_size,
                           "mtime_ns": st.st_mtime_ns}, sort_keys=True)

    def volume(self, i: int) -> np.ndarray:
        """(Z, Y, X) HU of volume ``i`` as int16 (k = 0 most inferior, as the manifest)."""
        path = self._cache_path(i)
        if self.cache and i in self._fresh:
            return np.load(path, mmap_mode="r")
        stamp = self._source_stamp(i) if self.cache else ""
        stamp_file = path.with_suffix(".source")
        if (self.cache and path.is_file() and stamp_file.is_file()
                and stamp_file.read_text() == stamp):
            self._fresh.add(i)
            return np.load(path, mmap_mode="r")
        from vlm.io import read_volume

        hu = read_volume(self.root / self.rows[i]["nifti"]).array
        arr = np.clip(np.round(hu), -32768, 32767).astype(np.int16)
        if self.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, path)
            path.with_suffix(".sha256").write_text(_digest(arr))
            stamp_file.write_text(stamp)  # last: a cache without its stamp is rebuilt
            self._hashes.pop(i, None)
            self._fresh.add(i)
        return arr

    def volume_tensor(self, i: int) -> torch.Tensor:
        """(Z, Y, X) float32 HU."""
        return torch.from_numpy(np.asarray(self.volume(i), dtype=np.float32))

    def fingerprint(self, volumes: Sequence[int], **settings: Any) -> str:
        """sha256 (hex, 16 chars) of the manifest rows of ``volumes`` (their files, splits,
        lesions and labels, in order) and of a task's sampling ``settings``: a training run
        saved on other volumes or with other sampling is not resumed."""
        rows = [self.rows[int(v)] for v in volumes]
        return hashlib.sha256(json.dumps([rows, settings], sort_keys=True, default=str)
                              .encode()).hexdigest()[:16]

    def content_hash(self, i: int) -> str:
        """sha256 (hex, 16 chars) of the volume's HU array: the key of derived caches."""
        if i not in self._hashes:
            side = self._cache_path(i).with_suffix(".sha256")
            arr = self.volume(i)
            self._hashes[i] = (side.read_text().strip() if self.cache and side.is_file()
                               else _digest(np.asarray(arr)))
        return self._hashes[i]

    def n_slices(self, i: int) -> int:
        return int(self.rows[i]["shape"][0])

    def slice_items(self, volumes: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """(volume index, k) of every axial slice of ``volumes`` (default: all)."""
        vols = range(len(self)) if volumes is None else volumes
        return [(v, k) for v in vols for k in range(self.n_slices(v))]

    def slice_hu(self, i: int, k: int) -> torch.Tensor:
        """(Y, X) float32 HU of slice ``k`` of volume ``i``."""
        return torch.from_numpy(np.asarray(self.volume(i)[k], dtype=np.float32))

    def slice_boxes(self, i: int, k: int) -> list[list[float]]:
        """Lesion boxes [y0, x0, y1, x1] on slice ``k`` (empty: no lesion)."""
        return slice_boxes(self.rows[i], k)

    def lesion_slices(self, i: int) -> list[int]:
        return [k for k, f in enumerate(self.rows[i].get("slice_flags", [])) if f]

    def body_frame(self, i: int) -> dict[str, Any]:
        return dict(self.rows[i]["body_frame"])

    def volumes_in(self, splits: Sequence[str] = PRETRAIN_SPLITS) -> list[int]:
        """Indices of the volumes in the named manifest splits (pre-training never takes 'val')."""
        chosen = {s.strip() for s in splits if s.strip()}
        if not chosen or "val" in chosen:
            raise ConfigError(f"pre-training splits must be named and exclude 'val', not "
                              f"{sorted(chosen)}")
        known = {r["split"] for r in self.rows}
        unknown = sorted(chosen - known - {"val"})
        if unknown:
            raise ConfigError(f"{self.root}: unknown split(s) {unknown}; the data has "
                              f"{sorted(known)}")
        found = [i for i, r in enumerate(self.rows) if r["split"] in chosen]
        if not found:
            raise ConfigError(f"{self.root}: no volumes in splits {sorted(chosen)}")
        return found

    def pretraining_split(self, volumes: Sequence[int] | None = None,
                          val_volumes: Sequence[int] | None = None
                          ) -> tuple[list[int], list[int]]:
        """(train, val) volume indices; defaults: :data:`PRETRAIN_SPLITS` / val of the manifest."""
        train = list(volumes) if volumes is not None else self.volumes_in()
        val = (list(val_volumes) if val_volumes is not None
               else [i for i, r in enumerate(self.rows) if r["split"] == "val"])
        return train, val

    def endpoints(self) -> Endpoints:
        rows = self.rows
        return Endpoints(
            volume_ids=[r["volume_id"] for r in rows],
            patients=[r.get("patient_id", r["volume_id"]) for r in rows],
            locations=np.array([[int(r["location_labels"][c]) for c in LOCATION_CLASSES]
                                for r in rows], dtype=np.float32),
            emphysema_class=np.array([EMPHYSEMA_NAMES.index(r["emphysema_class"])
                                      for r in rows], dtype=np.int64),
            emphysema_score=np.array([float(r["emphysema_score"]) for r in rows]),
            time=np.array([float(r["time"]) for r in rows]),
            event=np.array([int(r["event"]) for r in rows], dtype=np.int64),
        )


#: the fields of a PhantomCT manifest row every CT recipe reads
REQUIRED_FIELDS = ("volume_id", "split", "nifti", "shape")


def _check_rows(root: Path, rows: list[dict[str, Any]]) -> None:
    """One line naming what is wrong when ``root``'s manifest is not PhantomCT's (a PhantomCXR
    folder given to a CT recipe was an internal KeyError: 'volume_id' or 'shape')."""
    for n, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED_FIELDS if not isinstance(row, dict) or k not in row]
        if missing:
            if all(isinstance(r, dict) and missing[0] not in r for r in rows):
                why = f"manifest rows have no {missing[0]}"
            else:
                why = f"manifest row {n} has no {', '.join(missing)}"
            raise ConfigError(f"{root} is not a PhantomCT folder ({why}); generate one with "
                              "'radlens data phantom-ct --out DIR'")
        shape = row["shape"]
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in shape)):
            raise ConfigError(f"{root}: manifest row {n} ({row['volume_id']}) has shape "
                              f"{shape!r}, not three positive voxel counts")


def _digest(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str((arr.shape, str(arr.dtype))).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]
