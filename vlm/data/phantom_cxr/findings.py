"""Finding layers for PhantomCXR: each finding is an additive attenuation layer (patient frame).

Every function returns a float32 layer that is already blurred (so the later pointwise rendering
keeps the difference inside the layer's support). Positive values add density (whiter in
MONOCHROME2 display), negative values remove it (pneumothorax, emphysema, fracture gaps).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi

from vlm.data.iu_reports import Finding
from vlm.data.phantom_cxr.anatomy import (
    Anatomy,
    draw_rib,
    ellipse,
    fast_blur,
    heart_layer,
    heart_params,
    spine_image,
)

# Vertical extent (fraction of the lung height, top -> bottom) of each lung zone.
ZONE_RANGE = {"apex": (0.03, 0.15), "upper": (0.15, 0.38), "middle": (0.38, 0.6),
              "lower": (0.56, 0.76), "base": (0.72, 0.9)}
SEVERITY_SCALE = {None: 1.0, "borderline": 0.7, "small": 0.75, "mild": 0.8, "moderate": 1.25,
                  "large": 1.6, "severe": 1.8}
CTR_BY_SEVERITY = {None: 0.58, "borderline": 0.52, "small": 0.55, "mild": 0.55,
                   "moderate": 0.62, "large": 0.66, "severe": 0.68}

Layer = Callable[[Anatomy, Finding, np.random.Generator, float], np.ndarray]


def _sides(f: Finding, rng: np.random.Generator, default: str | None = None) -> list[str]:
    if f.side == "bilateral":
        return ["right", "left"]
    if f.side in ("right", "left"):
        return [f.side]
    if default == "bilateral":
        return ["right", "left"]
    return [default] if default else [("right", "left")[int(rng.integers(2))]]


def _zone(f: Finding, rng: np.random.Generator, default: str | None = None) -> str:
    if f.zone in ZONE_RANGE:
        return f.zone
    if default:
        return default
    return ("upper", "middle", "lower")[int(rng.integers(3))]


def lung_point(a: Anatomy, side: str, zone: str, rng: np.random.Generator,
               margin: float = 0.15) -> tuple[float, float]:
    """A point inside the ``side`` lung at the given zone (x, y in patient-frame pixels)."""
    _, y0, _, y1 = a.lung_box[side]
    lo, hi = ZONE_RANGE[zone]
    m = a.free(side)
    for _ in range(20):
        y = int(y0 + rng.uniform(lo, hi) * (y1 - y0))
        cols = np.nonzero(m[min(max(y, 0), a.size - 1)])[0]
        if cols.size >= 4:
            c0, c1 = cols.min(), cols.max()
            x = c0 + rng.uniform(margin, 1 - margin) * (c1 - c0)
            return float(x), float(y)
    ys, xs = np.nonzero(m if m.any() else a.lung_side[side])
    i = int(rng.integers(len(ys)))
    return float(xs[i]), float(ys[i])


def _blur(layer: np.ndarray, sigma: float) -> np.ndarray:
    return fast_blur(layer, sigma)


def _smooth_noise(a: Anatomy, rng: np.random.Generator, sigma: float) -> np.ndarray:
    n = fast_blur(rng.standard_normal((a.size, a.size)).astype(np.float32), sigma)
    return n / (float(n.std()) + 1e-6)


def lung_opacity(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Patchy airspace opacity in a lobe/zone, confined to the lung."""
    s, k = a.size, SEVERITY_SCALE[f.severity]
    out = np.zeros((s, s), np.float32)
    noise = _smooth_noise(a, rng, 0.02 * s)
    for side in _sides(f, rng):
        x, y = lung_point(a, side, _zone(f, rng, "lower"), rng)
        r = 0.085 * s * min(k, 1.4)
        blob = ellipse(s, x, y, r * rng.uniform(1.0, 1.4), r, 0.04 * s, rng.uniform(-30, 30))
        patch = blob * np.clip(0.6 + 0.5 * noise, 0.0, 1.0)
        out += 0.4 * min(k, 1.3) * patch * a.free(side)
    return _blur(out, 0.006 * s)


def atelectasis(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Linear (plate-like) band of density."""
    s, k = a.size, SEVERITY_SCALE[f.severity]
    out = np.zeros((s, s), np.float32)
    for side in _sides(f, rng):
        x, y = lung_point(a, side, _zone(f, rng, "base"), rng, 0.3)
        band = ellipse(s, x, y, 0.09 * s * min(k, 1.3), max(0.008 * s, 1.2), 1.0,
                       rng.uniform(-18, 18))
        out += 0.7 * band * a.free(side)
    return _blur(out, 0.003 * s)


def _spheres(a: Anatomy, centres: list[tuple[float, float]], radius_px: list[float],
             density: float) -> np.ndarray:
    s = a.size
    yy, xx = np.ogrid[:s, :s]
    out = np.zeros((s, s), np.float32)
    for (x, y), r in zip(centres, radius_px, strict=True):
        d2 = ((xx - x) ** 2 + (yy - y) ** 2) / (r * r)
        out += density * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)).astype(np.float32)
    return out


def _count(f: Finding, rng: np.random.Generator, hi: int) -> int:
    return int(rng.integers(2, hi + 1)) if f.multiple else 1


def nodule(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Round nodule (or mass when the MeSH head is Mass), soft-edged."""
    is_mass = f.term.lower().startswith("mass")
    lo_mm, hi_mm = (25.0, 45.0) if is_mass else (7.0, 16.0)
    if f.severity in ("small", "mild"):
        lo_mm, hi_mm = lo_mm * 0.7, hi_mm * 0.7
    centres, radii = [], []
    sides = _sides(f, rng)
    for i in range(_count(f, rng, 4)):
        side = sides[i % len(sides)]
        centres.append(lung_point(a, side, _zone(f, rng), rng, 0.25))
        radii.append(max(rng.uniform(lo_mm, hi_mm) / 2 / mm, 2.0))
    out = _spheres(a, centres, radii, 0.45)
    return _blur(out, max(0.002 * a.size, 0.6))


def calcified_granuloma(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float
                        ) -> np.ndarray:
    """Small, very dense round calcification(s)."""
    centres, radii = [], []
    sides = _sides(f, rng)
    for i in range(_count(f, rng, 5)):
        centres.append(lung_point(a, sides[i % len(sides)], _zone(f, rng), rng, 0.25))
        radii.append(max(rng.uniform(2.0, 4.5) / mm, 1.6))
    return _blur(_spheres(a, centres, radii, 1.3), 0.5)


def pulmonary_edema(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Bilateral perihilar haze fading towards the periphery ("bat wing")."""
    s, k = a.size, SEVERITY_SCALE[f.severity]
    out = np.zeros((s, s), np.float32)
    noise = _smooth_noise(a, rng, 0.01 * s)
    for side in _sides(f, rng, "bilateral"):
        x0, y0, x1, y1 = a.lung_box[side]
        medial = x1 if side == "right" else x0
        cx = medial + (x0 - x1 if side == "right" else x1 - x0) * 0.3
        blob = ellipse(s, cx, y0 + 0.55 * (y1 - y0), 0.38 * (x1 - x0), 0.38 * (y1 - y0),
                       0.12 * s)
        out += 0.26 * min(k, 1.3) * blob * np.clip(0.8 + 0.25 * noise, 0, 1.2) * a.lung_side[side]
    return _blur(out, 0.01 * s)


def pleural_effusion(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Dependent fluid: blunted costophrenic angle with a meniscus rising laterally."""
    s, k = a.size, SEVERITY_SCALE[f.severity]
    yy, xx = np.mgrid[:s, :s].astype(np.float32)
    out = np.zeros((s, s), np.float32)
    for side in _sides(f, rng):
        x0, y0, x1, y1 = a.lung_box[side]
        h = (y1 - y0) * 0.13 * k
        lateral = (x1 - xx) / (x1 - x0) if side == "left" else (xx - x0) / (x1 - x0)
        lateral = np.clip(lateral, 0, 1)  # 0 at the lateral wall, 1 medially
        level = y1 - h - 0.5 * h * (1 - lateral) ** 2
        fluid = np.clip((yy - level) / (0.006 * s), 0, 1) * (0.8 + 0.2 * np.clip(
            (yy - level) / max(h, 1), 0, 1))
        out += a.air_depth * 0.95 * fluid * a.lung_side[side] * a.lung_depth * a.body
    return _blur(out, 0.005 * s)


def pneumothorax(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Apical/lateral rim of air without lung markings, bounded by a thin visceral pleural line."""
    s, k = a.size, SEVERITY_SCALE[f.severity]
    out = np.zeros((s, s), np.float32)
    yy, xx = np.mgrid[:s, :s].astype(np.float32)
    for side in _sides(f, rng, "right"):
        m = a.lung_side[side]
        x0, y0, x1, y1 = a.lung_box[side]
        dist = ndi.distance_transform_edt(m)
        w = max(0.04 * s * k, 3.0)
        upper = yy < y0 + (0.45 + 0.25 * min(k, 1.5)) * (y1 - y0)
        lateral = (xx > (x0 + x1) / 2) if side == "left" else (xx < (x0 + x1) / 2)
        region = (dist < w) & m & (upper | lateral) & (yy < y0 + 0.85 * (y1 - y0))
        line = (dist >= w) & (dist < w + max(0.004 * s, 1.0)) & (upper | lateral)
        line &= yy < y0 + 0.85 * (y1 - y0)
        out += region * (-a.texture - 0.1)
        out += 0.16 * line * m
    return _blur(out, 0.6)


def cardiomegaly(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Enlarged heart: the enlarged silhouette minus the normal one (CTR set by severity)."""
    h0 = a.heart
    ctr = CTR_BY_SEVERITY[f.severity] + rng.uniform(-0.015, 0.015)
    thorax_w = a.thorax[1] - a.thorax[0]
    mid = a.spine_x
    ly0 = min(a.lung_box["right"][1], a.lung_box["left"][1])
    lh = max(a.lung_box["right"][3], a.lung_box["left"][3]) - ly0
    big = heart_params(ctr, mid, ly0, lh, thorax_w, a.air_depth)
    diff = heart_layer(a.size, big, 1.0) - heart_layer(a.size, h0, 1.0)
    return np.clip(diff, 0, None) * a.lung_depth * a.body


def emphysema(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Hyperlucent, hyperinflated lungs with flattened, lowered hemidiaphragms."""
    s, k = a.size, SEVERITY_SCALE[f.severity]
    out = -0.07 * min(k, 1.4) * a.lung * a.body
    rows = np.arange(s, dtype=np.float32)[:, None]
    for side in ("right", "left"):
        m = a.lung_side[side]
        x0, y0, x1, _ = a.lung_box[side]
        has = m.any(0)
        bottom = np.where(has, s - 1 - np.argmax(m[::-1], axis=0), -1).astype(np.float32)
        xs = np.arange(s, dtype=np.float32)
        taper = np.clip(np.sin(np.pi * (xs - x0) / max(x1 - x0, 1)), 0, 1) ** 0.7
        valid = has & (bottom > y0)
        if not valid.any():
            continue
        flat = float(np.percentile(bottom[valid], 90) + 0.03 * s * min(k, 1.4))
        new_bottom = bottom + taper * np.clip(flat - bottom, 0, None)
        region = valid[None, :] & (rows > bottom[None, :]) & (rows <= new_bottom[None, :])
        out = out - a.air_depth * 0.55 * region * a.body
    return _blur(out.astype(np.float32), 0.006 * s)


def scoliosis(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Lateral curvature of the spine (curved column minus straight column)."""
    s, k = a.size, SEVERITY_SCALE[f.severity]
    sign = {"right": -1.0, "left": 1.0}.get(f.side or "", float(rng.choice([-1.0, 1.0])))
    top = min(a.lung_box["right"][1], a.lung_box["left"][1])
    p = {"bone": a.bone}
    bend = sign * 0.065 * s * max(k, 1.0)
    layer = spine_image(s, a.spine_x, a.spine_w, bend, top, p)
    layer -= spine_image(s, a.spine_x, a.spine_w, 0.0, top, p)
    return _blur(layer, 0.7)


def fracture(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float) -> np.ndarray:
    """Rib discontinuity (a short gap in a posterior rib), with callus when healed.

    Every fracture site (ribs, clavicle, spine, ...) is drawn as a rib fracture on the given
    side; ``multiple`` breaks 2-3 ribs.
    """
    s = a.size
    out = np.zeros((s, s), np.float32)
    half = (a.thorax[1] - a.thorax[0]) / 2
    healed = "healed" in f.term.lower()
    for side in _sides(f, rng):
        ribs = [r for r in a.ribs if r["side"] == side and 2 <= r["side_index"] <= 7]
        order = rng.permutation(len(ribs))[: _count(f, rng, 3)]
        sign = -1.0 if side == "right" else 1.0
        for i in order:
            rib = ribs[int(i)]
            xg = a.spine_x + sign * rng.uniform(0.55, 0.85) * half
            gap = (xg - max(0.01 * s, 2.0), xg + max(0.01 * s, 2.0))
            full = np.zeros_like(out)
            broken = np.zeros_like(out)
            draw_rib(full, rib, a.spine_x, half)
            draw_rib(broken, rib, a.spine_x, half, gap=gap)
            out += broken - full
            if healed:
                ys = np.nonzero(full[:, int(np.clip(xg, 0, s - 1))])[0]
                yc = float(ys.mean()) if ys.size else float(rib["y0"])
                out += 0.12 * ellipse(s, xg, yc, 0.02 * s, rib["hw"] * 1.6, 1.0)
    return _blur(out, 0.6)


def _polyline(s: int, pts: np.ndarray, width: float) -> np.ndarray:
    canvas = np.zeros((s, s), np.float32)
    t = np.linspace(0, 1, 400)
    n = len(pts) - 1
    # Bezier curve through the control points.
    from math import comb

    curve = sum(comb(n, i) * (t ** i)[:, None] * ((1 - t) ** (n - i))[:, None] * pts[i]
                for i in range(n + 1))
    xi = np.clip(np.rint(curve[:, 0]).astype(int), 0, s - 1)
    yi = np.clip(np.rint(curve[:, 1]).astype(int), 0, s - 1)
    canvas[yi, xi] = 1.0
    line = ndi.gaussian_filter(canvas, max(width, 0.6))
    return line / (float(line.max()) + 1e-6)


def support_devices(a: Anatomy, f: Finding, rng: np.random.Generator, mm: float
                    ) -> np.ndarray:
    """Lines/tubes, pacemaker generator with lead, surgical clips or sternal wires."""
    s = a.size
    head = f.term.split("/")[0].strip().lower()
    term = f.term.lower()
    mid = a.spine_x
    rb, lb = a.lung_box["right"], a.lung_box["left"]
    top, bottom = min(rb[1], lb[1]), max(rb[3], lb[3])
    lh = bottom - top
    side = f.side if f.side in ("right", "left") else ("right" if rng.random() < 0.6 else "left")
    sign = -1.0 if side == "right" else 1.0
    box = rb if side == "right" else lb
    w = max(0.0035 * s, 0.8)
    if head == "implanted medical device" and "valve" not in term:
        gx, gy = (box[0] + box[2]) / 2 + sign * 0.05 * s, top + 0.08 * lh
        out = 2.0 * ellipse(s, gx, gy, 0.045 * s, 0.03 * s, 1.5, rng.uniform(-15, 15))
        pts = np.array([[gx, gy], [mid - 0.02 * s, top + 0.2 * lh],
                        [mid - 0.05 * s, top + 0.6 * lh],
                        [a.heart["cx"] + 0.05 * s, a.heart["cy"] + 0.3 * a.heart["ry"]]])
        out += 1.4 * _polyline(s, pts, w)
    elif head in ("surgical instruments", "sutures") and (
            f.zone == "mediastinum" or (f.zone is None and f.side is None)):
        out = np.zeros((s, s), np.float32)
        for i in range(int(rng.integers(4, 7))):
            y = top + (0.12 + 0.1 * i) * lh
            ring = ellipse(s, mid, y, 0.012 * s, 0.008 * s, 1.0)
            ring -= ellipse(s, mid, y, 0.008 * s, 0.004 * s, 1.0)
            out += 2.2 * np.clip(ring, 0, 1)
    elif head in ("surgical instruments", "sutures", "stents"):
        out = np.zeros((s, s), np.float32)
        if f.zone == "abdomen":
            cx, cy = (rb[0] + rb[2]) / 2 + 0.03 * s, rb[3] + 0.05 * s
        else:
            cx, cy = lung_point(a, side, _zone(f, rng, "upper"), rng, 0.3)
        for _ in range(int(rng.integers(3, 7))):
            x, y = cx + rng.normal(0, 0.025 * s), cy + rng.normal(0, 0.02 * s)
            out += 2.2 * ellipse(s, x, y, 0.012 * s, max(0.0025 * s, 0.8), 0.8,
                                 rng.uniform(0, 180))
    elif head == "tube, inserted" and f.side in ("right", "left") and f.zone != "abdomen":
        # chest tube: enters low on the lateral wall, curves up towards the apex
        bx0, by0, bx1, by1 = box
        pts = np.array([[bx0 if side == "right" else bx1, by0 + 0.85 * (by1 - by0)],
                        [(bx0 + bx1) / 2, by0 + 0.6 * (by1 - by0)],
                        [(bx0 + bx1) / 2 + sign * 0.02 * s, by0 + 0.15 * (by1 - by0)]])
        out = 1.4 * _polyline(s, pts, w * 1.6)
    elif head == "tube, inserted":
        end = top + (0.95 if f.zone == "abdomen" else 0.25) * lh
        pts = np.array([[mid + 0.005 * s, 0.0], [mid - 0.01 * s, top], [mid, end]])
        out = 1.8 * _polyline(s, pts, w * 1.4)
    else:  # catheters, lines, other devices: central venous catheter from the chest wall
        start = [box[0] + 0.15 * (box[2] - box[0]) if side == "right"
                 else box[2] - 0.15 * (box[2] - box[0]), top - 0.01 * s]
        pts = np.array([start, [mid + sign * 0.09 * s, top + 0.05 * lh],
                        [mid - 0.035 * s, top + 0.2 * lh], [mid - 0.03 * s, top + 0.45 * lh]])
        out = 1.2 * _polyline(s, pts, w)
    return _blur(out.astype(np.float32), 0.5)


LAYERS: dict[str, Layer] = {
    "atelectasis": atelectasis, "calcified_granuloma": calcified_granuloma,
    "cardiomegaly": cardiomegaly, "emphysema": emphysema, "fracture": fracture,
    "lung_opacity": lung_opacity, "nodule": nodule, "pleural_effusion": pleural_effusion,
    "pneumothorax": pneumothorax, "pulmonary_edema": pulmonary_edema, "scoliosis": scoliosis,
    "support_devices": support_devices,
}
