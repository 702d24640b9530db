"""Pictures for the app: heatmap overlays, labelled boxes, thumbnails, a probability bar chart.

Plain numpy/PIL functions on uint8 arrays; no Gradio, no model. Colours are RGB tuples.

    rgb = to_rgb(render(image, window="lung"))             # (H, W, 3) uint8
    rgb = overlay_heatmap(rgb, grounding.heatmap, colour=PALETTE[0], opacity=0.5)
    rgb = draw_boxes(rgb, [grounding.box], ["effusion"], [PALETTE[0]])
    chart = bar_chart({"pleural_effusion": 0.81, "nodule": 0.12})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Colour = tuple[int, int, int]

#: One colour per phrase (colour-blind-friendly first: Okabe–Ito), then extras.
PALETTE: tuple[Colour, ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (204, 121, 167),
    (213, 94, 0), (0, 114, 178), (255, 255, 255),
)
#: Anchors of a perceptual "inferno"-like map for single heatmaps (0 -> 1).
_HEAT_ANCHORS = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
                          (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
                         dtype=np.float32)
VIEWER_BG: Colour = (11, 14, 20)
TEXT: Colour = (230, 233, 239)


def colour_for(index: int) -> Colour:
    """The palette colour of the ``index``-th phrase (cycles)."""
    return PALETTE[index % len(PALETTE)]


def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (no system font needed)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) or (H, W, 3|4) array as (H, W, 3) uint8."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"to_rgb expects uint8, got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2)
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return np.ascontiguousarray(a[..., :3])
    raise ValueError(f"to_rgb expects (H, W) or (H, W, 3), got {a.shape}")


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (…, 3) uint8 colours of the heat map."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32)), 0.0, 1.0)
    pos = v * (len(_HEAT_ANCHORS) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(_HEAT_ANCHORS) - 1)
    t = (pos - lo)[..., None]
    out = _HEAT_ANCHORS[lo] * (1 - t) + _HEAT_ANCHORS[hi] * t
    return np.rint(out).astype(np.uint8)


def _fit(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h = np.asarray(heatmap, np.float32)
    if h.shape == shape:
        return h
    im = Image.fromarray(h, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(im, np.float32)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, *, opacity: float = 0.5,
                    colour: Colour | None = None, floor: float = 0.2) -> np.ndarray:
    """Blend a [0, 1] heatmap onto a windowed image.

    Args:
        image: uint8 grayscale or RGB (the windowed study).
        heatmap: (h, w) in [0, 1]; resized to the image if needed.
        opacity: weight of the overlay at heat 1.
        colour: a single tint (one colour per phrase); None uses the heat colour map.
        floor: heat below this is not drawn, so the anatomy stays readable.

    Returns:
        (H, W, 3) uint8.
    """
    base = to_rgb(image).astype(np.float32)
    heat = np.clip(_fit(heatmap, base.shape[:2]), 0.0, 1.0)
    heat = np.clip((heat - floor) / max(1e-6, 1.0 - floor), 0.0, 1.0)
    tint = (colormap(heat).astype(np.float32) if colour is None
            else np.broadcast_to(np.asarray(colour, np.float32), base.shape))
    alpha = (float(np.clip(opacity, 0.0, 1.0)) * heat)[..., None]
    return np.rint(base * (1 - alpha) + tint * alpha).astype(np.uint8)


def draw_boxes(image: np.ndarray, boxes: Sequence[Sequence[float]],
               labels: Sequence[str] | None = None, colours: Sequence[Colour] | None = None,
               width: int | None = None) -> np.ndarray:
    """Draw ``(x0, y0, x1, y1)`` boxes with optional labels; returns a new RGB uint8 array."""
    im = Image.fromarray(to_rgb(image))
    draw = ImageDraw.Draw(im)
    lw = width or max(1, round(min(im.size) / 150))
    f = font(max(11, min(im.size) // 20))
    placed: list[tuple[float, float, float, float]] = []  # label rectangles already drawn
    for i, box in enumerate(boxes):
        c = tuple(colours[i]) if colours else colour_for(i)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=c, width=lw)
        if labels and i < len(labels) and labels[i]:
            th = draw.textbbox((0, 0), labels[i], font=f)[3]
            tx, ty = x0 + lw, (y0 - th - 2 * lw) if y0 >= th + 2 * lw else y0 + lw
            left, top, right, bottom = draw.textbbox((tx, ty), labels[i], font=f)
            while any(left < r and right > l_ and top < b and bottom > t
                      for l_, t, r, b in placed) and bottom + th < im.height:
                ty += th + 4  # stack labels that would overlap
                left, top, right, bottom = draw.textbbox((tx, ty), labels[i], font=f)
            placed.append((left - 2, top - 1, right + 2, bottom + 1))
            draw.rectangle(placed[-1], fill=(0, 0, 0))
            draw.text((tx, ty), labels[i], fill=c, font=f)
    return np.asarray(im)


def resize_long_side(image: np.ndarray, side: int) -> np.ndarray:
    """Resize (up or down) so the longer side is ``side`` px; RGB uint8 out."""
    im = Image.fromarray(to_rgb(image))
    scale = side / max(im.size)
    if abs(scale - 1.0) < 1e-3:
        return np.asarray(im)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return np.asarray(im.resize(size, Image.Resampling.LANCZOS))


def thumbnail(image: np.ndarray, size: int = 256, background: Colour = VIEWER_BG) -> np.ndarray:
    """Letterbox an image into a ``size`` x ``size`` RGB square on the viewer background."""
    im = Image.fromarray(to_rgb(image))
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return np.asarray(canvas)


def bar_chart(probs: Mapping[str, float], *, width: int = 560, row: int = 28,
              threshold: float = 0.5, highlight: Colour = PALETTE[0]) -> np.ndarray:
    """Horizontal bars of finding probabilities, highest first, on the dark background.

    Bars at or above ``threshold`` are drawn in ``highlight``; the threshold is a dashed line.
    """
    items = sorted(probs.items(), key=lambda kv: (-kv[1], kv[0]))
    height = max(1, len(items)) * row + 16
    im = Image.new("RGB", (width, height), VIEWER_BG)
    draw = ImageDraw.Draw(im)
    f = font(15)
    label_w, value_w = 180, 56
    x0, x1 = label_w, width - value_w
    tx = x0 + threshold * (x1 - x0)
    for y in range(4, height - 4, 6):
        draw.line([(tx, y), (tx, y + 2)], fill=(120, 124, 135))
    for i, (name, p) in enumerate(items):
        y = 8 + i * row
        p = float(np.clip(p, 0.0, 1.0))
        draw.text((8, y + 3), name.replace("_", " ")[:22], fill=TEXT, font=f)
        draw.rectangle([x0, y + 3, x1, y + row - 5], fill=(32, 37, 48))
        colour = highlight if p >= threshold else (110, 130, 160)
        draw.rectangle([x0, y + 3, x0 + p * (x1 - x0), y + row - 5], fill=colour)
        draw.text((x1 + 8, y + 3), f"{p:.2f}", fill=TEXT, font=f)
    return np.asarray(im)
