"""Contact sheet: a PNG grid with a few PhantomCXR studies per finding, ground-truth box drawn."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vlm.data.iu_reports import FINDINGS
from vlm.data.manifest import read_jsonl

logger = logging.getLogger(__name__)


def display_pixels(path: Path) -> np.ndarray:
    """uint8 display image with the file's window (MONOCHROME1 inverted), read by ``vlm.io``."""
    from vlm.io import read_image, render

    return np.asarray(render(read_image(path)), dtype=np.uint8)


def make_contact_sheet(out_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None,
                       per_finding: int = 4, tile: int = 192) -> Path:
    """Write a grid: one row per finding (plus one row without findings), boxes in red.

    Args:
        out_dir: a folder written by ``generate_phantom_cxr``.
        path: PNG to write (default ``out_dir/contact_sheet.png``).
        per_finding: columns (examples per finding).
        tile: pixel size of each thumbnail.
    """
    out = Path(out_dir)
    target = Path(path) if path is not None else out / "contact_sheet.png"
    rows = list(read_jsonl(out / "manifest.jsonl"))
    groups: list[tuple[str, list[tuple[dict[str, Any], dict[str, Any] | None]]]] = []
    for name in FINDINGS:
        picks: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
        for row in rows:
            hits = [f for f in row["findings"] if f["finding"] == name and f["box"]]
            if hits:
                picks.append((row, hits[0]))
            if len(picks) == per_finding:
                break
        groups.append((name, picks))
    normal: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
        (r, None) for r in rows if not r["labels"]]
    groups.append(("no finding", normal[:per_finding]))
    label_w = 120
    sheet = Image.new("RGB", (label_w + per_finding * tile, len(groups) * tile), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for gi, (name, picks) in enumerate(groups):
        draw.text((6, gi * tile + tile // 2 - 6), name, fill=(255, 255, 0))
        for ci, (row, finding) in enumerate(picks):
            img = Image.fromarray(display_pixels(out / row["file"])).convert("RGB")
            scale = tile / img.width
            img = img.resize((tile, round(img.height * scale)), Image.Resampling.BILINEAR)
            d = ImageDraw.Draw(img)
            if finding is not None:
                x0, y0, x1, y1 = (v * scale for v in finding["box"])
                d.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=2)
                caption = (f"{finding['side'] or ''} {finding['severity'] or ''} "
                           f"M{row['photometric'][-1]}")
                d.text((3, tile - 12), caption.strip(), fill=(255, 255, 0))
            sheet.paste(img, (label_w + ci * tile, gi * tile))
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target, optimize=True)
    logger.info("contact sheet written to %s", target)
    return target
