"""Manifests: one JSON object per line, written atomically; deterministic splits by patient.

A manifest is plain JSONL so it loads with the standard library, pandas
(``pd.read_json(p, lines=True)``) and Hugging Face ``datasets``
(``load_dataset("json", data_files=p)``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm.cpus import available_cpus
from vlm.errors import ManifestError, RadLensError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def split_for(key: str, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
              ) -> str:
    """Assign ``key`` (a patient pseudonym) to train/val/test, stable across runs and machines.

    The split depends only on ``key`` and ``seed``, never on the order rows are generated, so all
    studies of one patient land in the same split.
    """
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSONL atomically (temporary file, fsync, rename). Keys are sorted so the
    same rows always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False, allow_nan=False))
            fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the rows of a JSONL manifest."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ManifestError(f"{path}:{line_no}: not valid JSON ({exc.msg}); "
                                        f"regenerate the data set or mend that line"
                                        ) from None


def remove_generated(root: Path, top_files: Sequence[str], folder: re.Pattern[str],
                     folder_file: re.Pattern[str],
                     owned: Sequence[tuple[str, re.Pattern[str]]]) -> int:
    """Remove what an earlier run of a data set generator wrote into ``root``, by the
    generator's own names only: ``top_files``, the files matching ``folder_file`` in the
    ``dicom/`` sub-folders matching ``folder`` (each removed once empty), and per ``(sub,
    pattern)`` of ``owned`` the matching files in ``root/sub``. Linked folders are not
    entered. Returns how many files went."""
    removed = 0
    for name in top_files:
        path = root / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed += 1
    dicom = root / "dicom"
    if dicom.is_dir() and not dicom.is_symlink():
        for sub in sorted(dicom.iterdir()):
            if sub.is_symlink() or not sub.is_dir() or not folder.fullmatch(sub.name):
                continue
            for f in sub.iterdir():
                if folder_file.fullmatch(f.name) and not f.is_dir():
                    f.unlink()
                    removed += 1
            if not any(sub.iterdir()):
                sub.rmdir()
    for sub_name, pattern in owned:
        where = root / sub_name
        if where.is_dir() and not where.is_symlink():
            for f in where.iterdir():
                if pattern.fullmatch(f.name) and not f.is_dir():
                    f.unlink()
                    removed += 1
    return removed


def prepare_output(root: Path, dataset: str, clear: Callable[[Path], int]) -> int:
    """Create a generator's output folder and ``clear`` an earlier run's files from it;
    returns how many went.

    Raises:
        RadLensError: ``root`` is a file, or cannot be created or cleared (one line).
    """
    if root.exists() and not root.is_dir():
        raise RadLensError(f"{root} is a file, not a folder: give a new or {dataset} folder "
                           "as --out")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return clear(root)
    except OSError as exc:
        raise RadLensError(f"{root}: cannot prepare the output folder ({exc.strerror or exc})"
                           ) from None


def worker_count(workers: int | None, jobs: int) -> int:
    """Processes for a generator's ``jobs``: None means all cores, 0 and 1 this process
    (``--workers 0`` meant all cores, a negative count one, both without a word).

    Raises:
        RadLensError: a negative ``workers``.
    """
    if workers is not None and workers < 0:
        raise RadLensError(f"--workers must be 0 (this process) or a number of processes, got "
                           f"{workers}")
    wanted = available_cpus() if workers is None else max(int(workers), 1)
    return max(1, min(wanted, max(jobs, 1)))
