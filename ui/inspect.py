"""``radlens inspect``: per-file de-identified summary and a correctly windowed preview."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm.errors import RadLensError
from vlm.io import ImageData, Volume, parse_window, read, render

logger = logging.getLogger(__name__)


def summarize(item: ImageData | Volume) -> dict[str, Any]:
    """JSON-ready summary: kind, shape, value statistics and the de-identified metadata."""
    arr = item.array if isinstance(item, Volume) else item.pixels
    finite = arr[np.isfinite(arr)]
    out: dict[str, Any] = {
        "kind": "volume" if isinstance(item, Volume) else "image",
        "shape": list(arr.shape),
        "stats": {
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "mean": round(float(finite.mean()), 4) if finite.size else None,
        },
        "meta": item.meta.to_dict(),
    }
    if isinstance(item, Volume):
        out["spacing_mm"] = [round(s, 4) for s in item.spacing]
    return out


def preview_array(item: ImageData | Volume, window: str | tuple[float, float] | None,
                  frame: int = 0) -> np.ndarray:
    """8-bit preview: the image (frame ``frame``) or the middle axial slice of a volume."""
    if isinstance(item, Volume):
        return render(item.slice_image(item.shape[0] // 2), window=window)
    if item.meta.frames > 1:
        frame = min(max(frame, 0), item.meta.frames - 1)
    return render(item, window=window, frame=frame)


def _unique_png(out: Path, stem: str, taken: set[str]) -> Path:
    name, n = f"{stem}.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return out / name


def inspect_paths(paths: Sequence[Path], *, out: Path | None = None, window: str | None = None,
                  frame: int = 0, keep_identifiers: bool = False, stream: Any = None) -> list[str]:
    """Inspect each path; print one JSON line per good file and one error line per bad one.

    Returns:
        The error lines (empty when every file was read).
    """
    from PIL import Image

    from ui.cli import json_line

    stream = stream or sys.stdout
    win = parse_window(window) if window else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    failures: list[str] = []
    for path in paths:
        try:
            item = read(path, keep_identifiers=keep_identifiers)
            summary = {"file": str(path), **summarize(item)}
            if out is not None:
                stem = path.name.removesuffix(".gz").removesuffix(".nii") if path.is_file() \
                    else path.name
                target = _unique_png(out, Path(stem).stem or "image", taken)
                Image.fromarray(preview_array(item, win, frame)).save(target)
                summary["preview"] = str(target)
        except RadLensError as exc:
            line = f"radlens: error: {exc}"
            print(line, file=sys.stderr, flush=True)
            failures.append(line)
            continue
        print(json_line(summary), file=stream, flush=True)
    if failures:
        logger.warning("%d of %d inputs failed", len(failures), len(paths))
    return failures
