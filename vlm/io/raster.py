"""PNG / JPEG / TIFF (anything Pillow opens) -> ImageData with raw pixel values."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlm.errors import ImageReadError
from vlm.io.types import ImageData, ImageMeta

_GRAY_MODES = {"L", "I", "I;16", "I;16B", "I;16L", "F"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def read_raster(path: str | os.PathLike[str]) -> ImageData:
    """Read a raster image. Grayscale (8 or 16 bit) stays one channel; colour becomes RGB.

    Pixels are the stored values as float32 (no physical units are known for these files).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    try:
        with Image.open(path) as opened:
            opened.load()
            fmt = (opened.format or path.suffix.lstrip(".")).lower()
            im: Image.Image = opened
            mode = im.mode
            if mode in ("1", "LA"):
                im, mode = im.convert("L"), "L"
            if mode in _GRAY_MODES:
                arr = np.asarray(im, dtype=np.float32)
                bits = 8 if mode == "L" else 16 if mode.startswith("I;16") or (
                    mode == "I" and arr.size and arr.max() < 65536) else 32
                spp = 1
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32)
                bits, spp = 8, 3
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # the warning arrives as an exception where warnings are errors (python -W error)
        raise ImageReadError(path, f"too large to decode safely ({_one_line(exc)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"not a readable image ({_one_line(exc)})") from None
    if spp == 1 and arr.ndim != 2:
        raise ImageReadError(path, f"unexpected image shape {arr.shape}")
    meta = ImageMeta(source_format="jpeg" if fmt in ("jpeg", "jpg") else fmt,
                     photometric="MONOCHROME2" if spp == 1 else "RGB",
                     rows=int(arr.shape[0]), columns=int(arr.shape[1]), samples_per_pixel=spp,
                     bits_stored=bits)
    return ImageData(pixels=arr, meta=meta)
