"""Image -> model tensor, the same way for training, inference, indexing and the app.

Steps: VOI (the file's own window, or a preset/explicit window) to [0, 1] with MONOCHROME1
inverted -> letterbox into a square (aspect kept, zero padding; the record maps heatmaps and
boxes back to the original pixels) -> normalise -> repeat to 3 channels. Training adds
radiograph-appropriate augmentation: small rotation/scale/translation, exposure (contrast,
brightness, gamma) and noise. No horizontal flip unless the report's side words are flipped
too (:func:`flip_sides`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from vlm.io import ImageData, apply_voi, parse_window

if TYPE_CHECKING:
    from vlm.models.config import PreprocessConfig


@dataclass(frozen=True)
class Letterbox:
    """How an (orig_h, orig_w) image sits in the square model input."""

    orig_h: int
    orig_w: int
    scale: float  # model pixels per original pixel
    pad_x: float
    pad_y: float
    size: int

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(…, 4) x0, y0, x1, y1 in model pixels -> original pixels (clipped)."""
        b = np.asarray(boxes, dtype=np.float64).copy()
        b[..., [0, 2]] = (b[..., [0, 2]] - self.pad_x) / self.scale
        b[..., [1, 3]] = (b[..., [1, 3]] - self.pad_y) / self.scale
        b[..., [0, 2]] = b[..., [0, 2]].clip(0, self.orig_w)
        b[..., [1, 3]] = b[..., [1, 3]].clip(0, self.orig_h)
        return b

    def map_to_original(self, heat: torch.Tensor) -> torch.Tensor:
        """A (H, W) map over the model input -> (orig_h, orig_w) over the original image."""
        s = self.size
        m = F.interpolate(heat[None, None].float(), size=(s, s), mode="bilinear",
                          align_corners=False)[0, 0]
        y0, x0 = round(self.pad_y), round(self.pad_x)
        h = max(1, round(self.orig_h * self.scale))
        w = max(1, round(self.orig_w * self.scale))
        m = m[y0:y0 + h, x0:x0 + w]
        return F.interpolate(m[None, None], size=(self.orig_h, self.orig_w), mode="bilinear",
                             align_corners=False)[0, 0]


def display_unit(image: ImageData, window: str | None = None, frame: int = 0) -> np.ndarray:
    """Grayscale display values in [0, 1] (H, W): VOI/window, MONOCHROME1 inverted."""
    img = image.frame(frame) if image.meta.frames > 1 else image
    pixels = img.pixels
    if img.meta.is_color:
        pixels = pixels.mean(axis=-1)
        top = float(2 ** (img.meta.bits_stored or 8) - 1)
        return np.clip(pixels / top, 0, 1).astype(np.float32)
    win = parse_window(window) if window else None
    y = apply_voi(pixels, img.meta, window=win)  # a new array: inverted in place below
    return np.subtract(1.0, y, out=y) if img.meta.is_monochrome1 else y


def letterbox(x: torch.Tensor, size: int) -> tuple[torch.Tensor, Letterbox]:
    """x (H, W) -> (size, size) with the aspect ratio kept and zero padding."""
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = F.interpolate(x[None, None], size=(nh, nw), mode="bilinear", align_corners=False,
                            antialias=True)[0, 0]
    out = x.new_zeros((size, size))
    py, px = (size - nh) // 2, (size - nw) // 2
    out[py:py + nh, px:px + nw] = resized
    return out, Letterbox(int(h), int(w), scale, float(px), float(py), size)


class Preprocess:
    """ImageData or a [0, 1] array -> normalised (C, S, S) tensor + the letterbox record."""

    def __init__(self, cfg: PreprocessConfig, train: bool = False, seed: int | None = None
                 ) -> None:
        self.cfg = cfg
        self.train = train
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def unit(self, image: ImageData | np.ndarray) -> torch.Tensor:
        arr = display_unit(image, self.cfg.window) if isinstance(image, ImageData) else image
        return torch.as_tensor(np.ascontiguousarray(arr), dtype=torch.float32)

    def __call__(self, image: ImageData | np.ndarray) -> tuple[torch.Tensor, Letterbox]:
        x, box = self.one_channel(image)
        return x.expand(self.cfg.channels, -1, -1).contiguous(), box

    def one_channel(self, image: ImageData | np.ndarray) -> tuple[torch.Tensor, Letterbox]:
        """The model input before its channels repeat the image: (1, S, S), normalised (what
        ingestion sends between processes)."""
        x, box = letterbox(self.unit(image), self.cfg.image_size)
        if self.train:
            x = self.augment(x)
        x = x.sub_(self.cfg.mean).div_(self.cfg.std)  # x is this call's own tensor
        return x.unsqueeze(0), box

    def _rand(self, lo: float, hi: float) -> float:
        return float(lo + (hi - lo) * torch.rand((), generator=self.generator))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Radiograph augmentation on a [0, 1] (S, S) image (no flips)."""
        angle = math.radians(self._rand(-7.0, 7.0))
        scale = self._rand(0.9, 1.1)
        tx, ty = self._rand(-0.05, 0.05), self._rand(-0.05, 0.05)
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=x.dtype)[None]
        grid = F.affine_grid(theta, [1, 1, *x.shape], align_corners=False)
        x = F.grid_sample(x[None, None], grid, align_corners=False, padding_mode="zeros")[0, 0]
        gamma = math.exp(self._rand(-0.25, 0.25))
        x = x.clamp(0, 1) ** gamma
        x = (x - 0.5) * self._rand(0.85, 1.15) + 0.5 + self._rand(-0.06, 0.06)
        noise = torch.randn(x.shape, generator=self.generator) * self._rand(0.0, 0.02)
        return (x + noise).clamp(0, 1)


_SIDES = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT",
         "RIGHT": "LEFT"}


def flip_sides(text: str) -> str:
    """Swap left/right words: the only correct companion of a horizontal image flip."""
    return _SIDES.sub(lambda m: _SWAP[m.group(0)], text)
