"""Contact sheet: a PNG grid of axial and coronal slices per PhantomCT volume, lesions boxed."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw

from vlm.data.manifest import read_jsonl

logger = logging.getLogger(__name__)

WINDOWS = {"lung": (-600.0, 1500.0), "soft": (40.0, 400.0), "bone": (400.0, 1800.0)}
_LESION_WINDOW = {"lung": "lung", "bone": "bone"}
TILE = 176  # px, square tiles
CAPTION = 14  # px of caption under each tile


def load_hu(root: Path, row: dict[str, Any]) -> np.ndarray:
    """(Z, Y, X) HU of a manifest row, read from its NIfTI (stored in (i, j, k) order)."""
    img: Any = nib.load(str(root / row["nifti"]))
    return np.asarray(img.dataobj).transpose(2, 1, 0).astype(np.float32)


def _window(a: np.ndarray, name: str) -> np.ndarray:
    c, w = WINDOWS[name]
    return (np.clip((a - (c - w / 2)) / w, 0.0, 1.0) * 255).astype(np.uint8)


def _tile(img2d: np.ndarray, aspect: float, caption: str,
          boxes: list[tuple[list[int], tuple[int, int, int]]]) -> Image.Image:
    """Windowed slice -> RGB tile; ``aspect`` = row spacing / column spacing; boxes in pixels
    of ``img2d`` as [r0, c0, r1, c1] with a colour."""
    h, w = img2d.shape
    scale = min(TILE / w, TILE / (h * aspect))
    size = (max(1, round(w * scale)), max(1, round(h * aspect * scale)))
    im = Image.fromarray(img2d).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), (0, 0, 0))
    ox, oy = (TILE - size[0]) // 2, (TILE - size[1]) // 2
    canvas.paste(im, (ox, oy))
    draw = ImageDraw.Draw(canvas)
    sy, sx = size[1] / h, size[0] / w
    for (r0, c0, r1, c1), colour in boxes:
        draw.rectangle([ox + c0 * sx - 1, oy + r0 * sy - 1, ox + c1 * sx, oy + r1 * sy],
                       outline=colour, width=1)
    draw.text((3, TILE + 1), caption, fill=(230, 230, 230))
    return canvas


def _level(row: dict[str, Any], name: str, default: float) -> int:
    """Slice index of a landmark height (mm) in the manifest."""
    z = row.get("landmarks_mm", {}).get(name)
    k = default * row["shape"][0] if z is None else z / row["spacing"][0]
    return int(np.clip(round(k), 0, row["shape"][0] - 1))


def _row_tiles(root: Path, row: dict[str, Any]) -> list[Image.Image]:
    hu = load_hu(root, row)  # (Z, Y, X)
    dz, dy, dx = row["spacing"]
    lm = row.get("landmarks_mm", {})
    picks = [("lung", _level(row, "carina_z", 0.7) - 4, "apex-carina"),
             ("lung", int(0.5 * (_level(row, "carina_z", 0.7) + _level(row, "dome_r", 0.5))),
              "mid lung"),
             ("soft", int(0.5 * (_level(row, "carina_z", 0.7) + _level(row, "dome_r", 0.5))),
              "heart"),
             ("soft", _level(row, "dome_r", 0.5) - int(45 / dz), "liver"),
             ("soft", _level(row, "dome_r", 0.5) - int(110 / dz), "kidneys"),
             ("soft", max(0, _level(row, "crest_z", 0.15) - int(25 / dz)), "pelvis")]
    for les in row["lesions"][:3]:
        picks.append((_LESION_WINDOW.get(les["location"], "soft"), les["centre_voxel"][0],
                      f"L{les['label']} {les['location']}"))
    tiles = []
    for win, k, cap in picks:
        k = int(np.clip(k, 0, hu.shape[0] - 1))
        boxes = [(b, (255, 60, 60)) for b in row["slice_boxes"].get(str(k), [])]
        tiles.append(_tile(_window(hu[k], win), dy / dx, f"k={k} {cap} [{win}]", boxes))
    j = int(np.clip(round((lm.get("by", 0.0) - row["origin_lps"][1]) / dy), 0, hu.shape[1] - 1))
    for win in ("soft", "lung"):
        cor = _window(hu[::-1, j, :], win)  # (Z, X), superior at the top
        boxes = []
        for les in row["lesions"]:
            z0, y0, x0, z1, y1, x1 = les["box"]
            if y0 <= j < y1:
                boxes.append(([hu.shape[0] - z1, x0, hu.shape[0] - z0, x1], (255, 60, 60)))
        tiles.append(_tile(cor, dz / dx, f"coronal j={j} [{win}]", boxes))
    return tiles


def make_contact_sheet(out_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None,
                       max_volumes: int = 4) -> Path:
    """Draw a contact sheet of the first ``max_volumes`` volumes of a PhantomCT dataset.

    Per volume: axial slices at anatomical levels (lung window for the lungs, soft-tissue window
    below), axial slices through up to three lesions, and coronal slices in both windows;
    lesion boxes in red.

    Returns:
        Path of the PNG (default ``<out_dir>/contact_sheet.png``).
    """
    root = Path(out_dir)
    rows = list(read_jsonl(root / "manifest.jsonl"))[:max_volumes]
    if not rows:
        raise ValueError(f"{root}: empty manifest")
    grid_rows = []
    for row in rows:
        tiles = _row_tiles(root, row)
        head = (f"{row['volume_id']}  emphysema {row['emphysema_score']:.1f}% "
                f"({row['emphysema_class']}, {row['emphysema_pattern']})  "
                f"lesions: {', '.join(les['location'] for les in row['lesions']) or 'none'}")
        grid_rows.append((head, tiles))
    ncol = max(len(t) for _, t in grid_rows)
    head_h = 16
    sheet = Image.new("RGB", (ncol * TILE, len(grid_rows) * (TILE + CAPTION + head_h)),
                      (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for r, (head, tiles) in enumerate(grid_rows):
        y = r * (TILE + CAPTION + head_h)
        draw.text((4, y + 2), head, fill=(255, 220, 120))
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * TILE, y + head_h))
    out = Path(path) if path is not None else root / "contact_sheet.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    sheet.save(tmp, optimize=True)
    os.replace(tmp, out)
    logger.info("contact sheet of %d volumes -> %s", len(grid_rows), out)
    return out
