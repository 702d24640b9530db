"""Phrase grounding: phrase -> heatmap over the original image, peak and box.

Two methods, same output (:class:`Grounding`):

* ``"gradient"`` (:func:`ground_gradient`, the default of :class:`vlm.inference.Encoder` and
  ``radlens eval``): what in the image moves it towards the phrase and away from a reference
  sentence (the prompt set's normal-study text). The score is
  ``s = <image global embedding, phrase - reference>``; the map is the magnitude of
  ``ds/d(pixels)`` (summed over channels, Gaussian sigma 1 px at model resolution) times the
  square root of a Grad-CAM map (``ReLU(sum_c ds/dA * A)``) of a mid-level feature map ``A``
  (the CNN stage at 4x the final resolution, 20x20 for ResNet-18 at 160 px; for ViTs the
  tokens entering the last block, see :func:`cam_stage`). The input gradient gives pixel
  resolution, the Grad-CAM factor keeps it on regions the deep features attribute to the
  phrase. One forward and one backward pass per phrase; model parameters get no gradient.
  The outermost 4 px of the input-gradient map are zeroed: convolution zero padding gives them
  large gradients for any phrase. The stage, sigma, border and the square root were chosen on
  the PhantomCXR validation split (docs/lrclr_results.md, "Grounding: the read-out was the
  bottleneck").
* ``"patch"`` (:func:`ground`, the BioViL protocol sharpened by LRCLR's selected regions):
  cosine(projected patch embedding, phrase embedding) over the patch grid, optionally blended
  with the phrase's attention over the selected regions (each region spreads its weight over
  its box), Gaussian-smoothed (sigma ~1.5 patches). It needs no gradient, so it works on stored
  embeddings, but a ResNet-18 at 160 px has a 5x5 grid: too coarse for small findings.

Either map is upsampled to the model input and mapped back through the letterbox to the
original image. The box is the bounding box of the thresholded map's connected component that
holds the peak. Measured pointing game of both on PhantomCXR: the README's LRCLR results and
docs/lrclr_results.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vlm.data.transforms import Letterbox
from vlm.errors import ConfigError
from vlm.models.outputs import ImageEmbedding, TextEmbedding

if TYPE_CHECKING:
    from vlm.models.lrclr import LRCLR

METHODS = ("gradient", "patch")


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
    return _finish(heat, size, letterbox, threshold, sim)


def _finish(heat: np.ndarray, size: int, letterbox: Letterbox | None, threshold: float,
            sim: np.ndarray) -> Grounding:
    """Model-grid or model-input map -> original image, peak and box."""
    t = torch.from_numpy(np.ascontiguousarray(heat)).float()
    if letterbox is not None:
        full = letterbox.map_to_original(t).numpy()
    elif t.shape[0] != size:
        full = F.interpolate(t[None, None], size=(size, size), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    else:
        full = t.numpy()
    full = _unit_range(full.astype(np.float64)).astype(np.float32)
    py, px = np.unravel_index(int(np.argmax(full)), full.shape)
    labels, _ = ndimage.label(full >= threshold)
    comp = labels == labels[py, px]
    ys, xs = np.nonzero(comp)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Grounding(heatmap=full, box=box, peak=(int(px), int(py)), similarity=sim)


def cam_stage(model: LRCLR, finer: int = 4) -> torch.nn.Module | None:
    """The feature map Grad-CAM reads.

    A timm CNN: the last stage whose ``feature_info`` reduction is the final reduction /
    ``finer``. A ViT (timm or open_clip): the normalised tokens entering the last block's
    attention (the final tokens do not reach a class-token embedding). None otherwise: the map
    is then the input gradient alone.
    """
    trunk = model.visual.trunk
    if model.visual.proj is None:  # open_clip VisionTransformer
        blocks = getattr(getattr(trunk, "transformer", None), "resblocks", None)
        return blocks[-1].ln_1 if blocks else None
    blocks = getattr(trunk, "blocks", None)
    if blocks is not None and hasattr(blocks[-1], "norm1"):  # timm ViT family
        return blocks[-1].norm1
    info = getattr(trunk, "feature_info", None)
    if not info:
        return None
    try:
        entries = [(int(e["reduction"]), str(e["module"])) for e in info]
    except (TypeError, KeyError):
        return None
    final = max(r for r, _ in entries)
    names = [m for r, m in entries if r * finer == final]
    return trunk.get_submodule(names[-1]) if names else None


def _as_grid(act: torch.Tensor) -> torch.Tensor:
    """(1, C, h, w) feature map, or ViT tokens (1, prefix + h*w, C) -> (1, C, h, w)."""
    if act.ndim == 4:
        return act
    n = act.shape[1]
    side = math.isqrt(n)
    prefix = n - side * side
    if side == 0 or prefix > 8:
        raise ConfigError(f"cannot lay {n} tokens on a square grid for grounding")
    return act[:, prefix:].transpose(1, 2).reshape(act.shape[0], act.shape[2], side, side)


def ground_gradient(model: LRCLR, image: torch.Tensor, phrase: TextEmbedding,
                    reference: torch.Tensor | None = None,
                    letterbox: Letterbox | None = None, *, sigma: float = 1.0,
                    border: int = 4, threshold: float = 0.5) -> Grounding:
    """Ground ``phrase`` (first text of the batch) in ``image`` (1, 3, S, S), preprocessed.

    ``reference``: unit text vector subtracted from the phrase (the normal-study sentence);
    None grounds the phrase alone. The model must be in eval mode; its parameters' ``.grad``
    are left untouched (``torch.autograd.grad`` on the input and the feature map only).
    """
    if model.training:
        raise ConfigError("grounding needs the model in eval mode")
    if image.ndim != 4 or image.shape[0] != 1:
        raise ConfigError(f"ground_gradient takes one image (1, 3, S, S), not "
                          f"{tuple(image.shape)}")
    stage = cam_stage(model)
    captured: dict[str, torch.Tensor] = {}

    def keep(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
        captured["a"] = out

    hook = stage.register_forward_hook(keep) if stage is not None else None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # clones: texts encoded under inference_mode cannot be saved for backward
            target = phrase.global_embedding[0].detach().clone()
            if reference is not None:
                target = target - reference.detach().clone().to(target)
            param = next(model.parameters())  # a dataset's image arrives on the host
            x = image.detach().to(param.device, param.dtype).clone().requires_grad_(True)
            emb = model.encode_image(x)
            score = (emb.global_embedding[0] * target.to(emb.global_embedding)).sum()
            if stage is None:
                (dx,) = torch.autograd.grad(score, [x])
            else:
                act = captured["a"]
                dx, da = torch.autograd.grad(score, [x, act])
    finally:
        if hook is not None:
            hook.remove()
    pixels = dx[0].float().abs().sum(0).cpu().numpy().astype(np.float64)  # (S, S)
    size = pixels.shape[-1]
    pixels = ndimage.gaussian_filter(pixels, sigma=sigma, mode="nearest") if sigma > 0 \
        else pixels
    if border > 0:  # zero padding makes the outermost pixels' gradients large for any phrase
        b = min(border, size // 4)
        pixels[:b], pixels[-b:], pixels[:, :b], pixels[:, -b:] = 0, 0, 0, 0
    heat = _unit_range(pixels)
    if stage is not None:
        a, g = _as_grid(act.detach().float()), _as_grid(da.float())
        cam = torch.relu((g * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=pixels.shape, mode="bilinear", align_corners=False)[0, 0]
        heat = _unit_range(heat * np.sqrt(_unit_range(cam.cpu().numpy().astype(np.float64))))
    with torch.no_grad():
        patches = emb.patch_embeddings[0].detach().float()
        sim = (patches @ phrase.global_embedding[0].float().to(patches)).cpu().numpy()
    return _finish(heat, size, letterbox, threshold, sim.astype(np.float64))


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """Is the heatmap maximum inside the true mask? (stricter than the box protocol)"""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(mask[y, x])


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box x0, y0, x1, y1 (exclusive) of a non-empty mask (PhantomCXR's ``box``)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def pointing_game_box(heatmap: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Is the heatmap maximum inside the true box? (the MS-CXR / methods.md protocol)"""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    x0, y0, x1, y1 = box
    return bool(x0 <= x < x1 and y0 <= y < y1)


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
