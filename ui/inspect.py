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
    """8-bit preview: the image (frame ``frame``) or the middle axial slice of a volume.

    Raises:
        RadLensError: ``frame`` is not one of the image's frames (a single-frame image has
            only frame 0).
    """
    if isinstance(item, Volume):
        return render(item.slice_image(item.shape[0] // 2), window=window)
    frames = max(item.meta.frames, 1)
    if not 0 <= frame < frames:
        have = f"{frames} frames (0-{frames - 1})" if frames > 1 else "1 frame (0)"
        raise RadLensError(f"frame {frame} out of range: the image has {have}")
    return render(item, window=window, frame=frame)


def check_out_folder(out: Path) -> None:
    """Create ``out`` and make sure a preview can be written there; one line if not."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise RadLensError(f"--out {out} is a file, not a folder: pass a folder for previews")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".radlens-probe-"):
            pass  # the probe is removed on close
    except OSError as exc:
        raise RadLensError(f"--out {out}: cannot write previews there "
                           f"({exc.strerror or type(exc).__name__})") from None


def save_preview(pixels: np.ndarray, target: Path) -> None:
    """Write one PNG preview; a failure (disk full, a folder of that name) is one line and
    leaves no partial file."""
    from PIL import Image

    try:
        Image.fromarray(pixels).save(target)
    except OSError as exc:
        if target.is_file():
            target.unlink(missing_ok=True)
        raise RadLensError(f"cannot write the preview {target} "
                           f"({exc.strerror or ' '.join(str(exc).split())[:200]})") from None


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
    from ui.cli import json_line

    stream = stream or sys.stdout
    if frame < 0:
        raise RadLensError(f"--frame {frame}: frames are numbered from 0")
    win = parse_window(window) if window else None
    if out is not None:
        check_out_folder(out)
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
                try:
                    save_preview(preview_array(item, win, frame), target)
                except RadLensError as exc:  # which input it was: the message may not say
                    raise RadLensError(f"{path}: {exc}") from None
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
