"""Phrase grounding (BioViL protocol, sharpened by LRCLR's selected regions).

heatmap = cosine(projected patch embedding, phrase embedding) over the patch grid, optionally
blended with the phrase's attention over the selected regions (each region spreads its weight
over its box), Gaussian-smoothed (sigma ~1.5 patches), upsampled to the model input and mapped
back through the letterbox to the original image. The box is the bounding box of the
thresholded map's connected component that holds the peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vlm.data.transforms import Letterbox
from vlm.models.outputs import ImageEmbedding, TextEmbedding


@dataclass
class Grounding:
    heatmap: np.ndarray  # (H, W) over the original image, in [0, 1]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in original pixels
    peak: tuple[int, int]  # x, y in original pixels
    similarity: np.ndarray  # (h, w) raw patch cosine on the patch grid


def _unit_range(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def region_map(image: ImageEmbedding, phrase: torch.Tensor, temperature: float = 4.0,
               index: int = 0) -> np.ndarray | None:
    """Phrase attention over the selected regions, spread over their boxes (patch grid)."""
    if image.region_embeddings is None or image.region_boxes is None:
        return None
    h, w = image.grid_size
    attn = torch.softmax(temperature * image.region_embeddings[index] @ phrase, dim=0)  # (K,)
    boxes = (image.region_boxes[index] / image.patch_size).round().long()  # (K, 4) patches
    out = np.zeros((h, w), np.float64)
    for a, (x0, y0, x1, y1) in zip(attn.tolist(), boxes.tolist(), strict=True):
        area = max(1, (x1 - x0) * (y1 - y0))
        out[y0:y1, x0:x1] += a / np.sqrt(area)
    return out


def ground(image: ImageEmbedding, phrase: TextEmbedding, letterbox: Letterbox | None = None,
           *, index: int = 0, sigma: float = 1.5, region_weight: float = 0.5,
           threshold: float = 0.5) -> Grounding:
    """Ground ``phrase`` (first text of the batch) in image ``index`` of the batch."""
    vec = phrase.global_embedding[0].float()
    patches = image.patch_embeddings[index].float()  # (h, w, E)
    sim = (patches @ vec).detach().cpu().numpy().astype(np.float64)  # (h, w)
    heat = _unit_range(sim)
    regions = region_map(image, vec, index=index) if region_weight > 0 else None
    if regions is not None and regions.max() > 0:
        heat = (1 - region_weight) * heat + region_weight * _unit_range(regions)
    heat = _unit_range(ndimage.gaussian_filter(heat, sigma=sigma, mode="nearest"))
    size = round(heat.shape[0] * image.patch_size)
    t = torch.from_numpy(heat).float()
    if letterbox is not None:
        full = letterbox.map_to_original(t).numpy()
    else:
        full = F.interpolate(t[None, None], size=(size, size), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    full = _unit_range(full.astype(np.float64)).astype(np.float32)
    py, px = np.unravel_index(int(np.argmax(full)), full.shape)
    labels, _ = ndimage.label(full >= threshold)
    comp = labels == labels[py, px]
    ys, xs = np.nonzero(comp)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Grounding(heatmap=full, box=box, peak=(int(px), int(py)), similarity=sim)


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """Is the heatmap maximum inside the true mask?"""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(mask[y, x])


def iou(heatmap: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    pred = heatmap >= threshold
    union = np.logical_or(pred, mask).sum()
    return float(np.logical_and(pred, mask).sum() / union) if union else 0.0


def cnr(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Contrast-to-noise ratio |mean_in - mean_out| / sqrt(var_in + var_out)."""
    inside, outside = heatmap[mask], heatmap[~mask]
    if inside.size == 0 or outside.size == 0:
        return 0.0
    den = np.sqrt(inside.var() + outside.var())
    return float(abs(inside.mean() - outside.mean()) / den) if den > 0 else 0.0
