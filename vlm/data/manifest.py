"""Manifests: one JSON object per line, written atomically; deterministic splits by patient.

A manifest is plain JSONL so it loads with the standard library, pandas
(``pd.read_json(p, lines=True)``) and Hugging Face ``datasets``
(``load_dataset("json", data_files=p)``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from vlm.errors import ManifestError

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
