"""LeCL view sampling: two views of a CT slice, lesion-centred for slices with a lesion box.

* Lesion slice: view 1 = a square crop placed on a lesion box (side drawn uniformly between
  sqrt(0.08) and 1 times the slice width, capped at the slice's shorter side), resized to the
  model size; view 2 = the whole slice resized; the pair is flagged as a lesion pair.
* Other slices: two random resized crops (scale 0.08-1, aspect 3/4-4/3), as torchvision's
  ``RandomResizedCrop``.

"Placed on the lesion" here means: the crop contains the lesion centre, which sits at a uniform
random position inside the crop's central half, and the crop is shifted to stay in the image.
Boxes are PhantomCT's ``slice_boxes`` format, ``[y0, x0, y1, x1]`` in slice pixels.
Randomness comes only from the ``generator`` argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Box = Sequence[float]  # [y0, x0, y1, x1]


@dataclass
class LeCLViews:
    view1: torch.Tensor  # (B, C, S, S)
    view2: torch.Tensor  # (B, C, S, S)
    lesion: torch.Tensor  # (B,) bool: pair came from a lesion slice


def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) -> (C, size, size), bilinear with antialiasing."""
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def window_slice(hu: torch.Tensor, lo: float = -1024.0, hi: float = 240.0,
                 channels: int = 3) -> torch.Tensor:
    """(H, W) HU slice -> (channels, H, W) in [0, 1] (clipped linear window)."""
    x = ((hu.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
    return x[None].expand(channels, -1, -1).contiguous()


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator | None = None,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): torchvision's RandomResizedCrop sampling (10 tries)."""
    h, w = x.shape[-2:]
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_r))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            return _resize(x[:, top: top + ch, left: left + cw], size)
    side = min(h, w)  # fallback: central square
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(x[:, top: top + side, left: left + side], size)


def lesion_crop(x: torch.Tensor, box: Box, size: int,
                generator: torch.Generator | None = None,
                side_range: tuple[float, float] = (math.sqrt(0.08), 1.0)) -> torch.Tensor:
    """(C, H, W) -> (C, size, size): a square crop placed on ``box`` ([y0, x0, y1, x1])."""
    h, w = x.shape[-2:]
    side = max(1, min(round(w * _uniform(generator, *side_range)), h, w))
    cy, cx = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    # lesion centre at a random point of the crop's central half
    top = round(cy - side * _uniform(generator, 0.25, 0.75))
    left = round(cx - side * _uniform(generator, 0.25, 0.75))
    top = min(max(top, 0), h - side)
    left = min(max(left, 0), w - side)
    return _resize(x[:, top: top + side, left: left + side], size)


def lecl_pair(x: torch.Tensor, boxes: Sequence[Box], size: int,
              generator: torch.Generator | None = None,
              scale: tuple[float, float] = (0.08, 1.0)
              ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Two views (C, size, size) of one slice (C, H, W) and whether it is a lesion pair."""
    if boxes:
        box = boxes[int(torch.randint(0, len(boxes), (), generator=generator))]
        return lesion_crop(x, box, size, generator), _resize(x, size), True
    return (random_resized_crop(x, size, generator, scale),
            random_resized_crop(x, size, generator, scale), False)


def lecl_views(slices: Sequence[torch.Tensor], boxes: Sequence[Sequence[Box]], size: int,
               generator: torch.Generator | None = None,
               scale: tuple[float, float] = (0.08, 1.0)) -> LeCLViews:
    """A batch of view pairs from slices [(C, H, W)] and their lesion boxes (empty: none)."""
    if len(slices) != len(boxes):
        raise ValueError(f"{len(slices)} slices but {len(boxes)} box lists")
    pairs = [lecl_pair(s, b, size, generator, scale) for s, b in zip(slices, boxes, strict=True)]
    return LeCLViews(view1=torch.stack([p[0] for p in pairs]),
                     view2=torch.stack([p[1] for p in pairs]),
                     lesion=torch.tensor([p[2] for p in pairs], dtype=torch.bool))


def slice_boxes(row: dict, k: int) -> list[list[float]]:
    """Lesion boxes of slice ``k`` from a PhantomCT manifest row (empty list: no lesion)."""
    return [list(map(float, b)) for b in row.get("slice_boxes", {}).get(str(k), [])]
