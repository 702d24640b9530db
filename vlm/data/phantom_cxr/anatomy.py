"""Normal chest anatomy for PhantomCXR, drawn as an attenuation map in the patient frame.

Units are arbitrary "attenuation" (0 = air outside the patient, about 1 = full soft-tissue
thickness); the image convention is a frontal radiograph seen from the front, so the patient's
right lung is on the image left. Lung shapes come from the 518 v7labs lung masks traced on real
chest radiographs (shipped with torchxrayvision); everything else is analytic.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from vlm.data.iu_reports import LUNG_MASKS, data_path

logger = logging.getLogger(__name__)

MASK_GRID = 128  # normalised lung masks are stored on a MASK_GRID x MASK_GRID grid


@dataclass(frozen=True)
class LungMask:
    """One real lung-mask shape, cropped to both lungs: labels 1 (image left) and 2 (right)."""

    name: str
    labels: np.ndarray  # uint8 (MASK_GRID, MASK_GRID)
    aspect: float  # height / width of the original lung bounding box


CACHE_VERSION = 1


def _cache_file(source: os.PathLike[str] | str) -> Path:
    st = os.stat(source)
    root = os.environ.get("RADLENS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "radlens")
    return Path(root) / f"phantom_cxr_lungs_v{CACHE_VERSION}_{st.st_size}_{int(st.st_mtime)}.npz"


@lru_cache(maxsize=1)
def load_lung_masks() -> tuple[LungMask, ...]:
    """Read, validate and normalise the v7labs lung masks (once per process).

    A mask is kept when it has exactly two large connected components side by side (the two
    lungs); empty or fragmented masks are dropped. Sorted by name, so indices are stable. The
    normalised masks (derived shapes only, ~2 MB) are cached under ``~/.cache/radlens`` (or
    ``$RADLENS_CACHE_DIR``), since decoding the 518 source images takes ~6 s.
    """
    source = data_path(LUNG_MASKS)
    cache = _cache_file(source)
    if cache.exists():
        try:
            with np.load(cache) as z:
                names, labels, aspects = z["names"], z["labels"], z["aspects"]
            return tuple(LungMask(str(nm), lab, float(asp))
                         for nm, lab, asp in zip(names, labels, aspects, strict=True))
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("ignoring unreadable lung-mask cache %s (%s)", cache, exc)
    masks = _read_lung_masks(source)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, names=np.array([m.name for m in masks]),
                 labels=np.stack([m.labels for m in masks]),
                 aspects=np.array([m.aspect for m in masks]))
        os.replace(tmp, cache)
    except OSError as exc:
        logger.warning("could not cache lung masks at %s (%s)", cache, exc)
    return masks


def _read_lung_masks(source: Path) -> tuple[LungMask, ...]:
    out: list[LungMask] = []
    with zipfile.ZipFile(source) as zf:
        for name in sorted(zf.namelist()):
            if name.endswith("/"):
                continue
            src = Image.open(io.BytesIO(zf.read(name)))
            src.draft("L", (256, 256))
            img = src.convert("L")
            factor = max(1, max(img.size) // 256)
            if factor > 1:
                img = img.reduce(factor)
            arr = np.asarray(img) > 127
            lab, n = ndi.label(arr)
            if n < 2:
                continue
            sizes = np.bincount(lab.ravel())[1:]
            order = np.argsort(sizes)[::-1]
            if n > 2 and sizes[order[2]] > 0.1 * sizes[order[0]]:
                continue
            if sizes[order[1]] < 0.35 * sizes[order[0]]:
                continue
            keep = [int(order[0]) + 1, int(order[1]) + 1]
            cx = [float(np.nonzero(lab == k)[1].mean()) for k in keep]
            if abs(cx[0] - cx[1]) < 0.25 * arr.shape[1]:
                continue
            ys, xs = np.nonzero(np.isin(lab, keep))
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            crop = lab[y0:y1, x0:x1]
            left_k, right_k = (keep[0], keep[1]) if cx[0] < cx[1] else (keep[1], keep[0])
            labels = np.zeros(crop.shape, np.uint8)
            labels[crop == left_k] = 1
            labels[crop == right_k] = 2
            small = Image.fromarray(labels).resize((MASK_GRID, MASK_GRID), Image.Resampling.NEAREST)
            aspect = (y1 - y0) / (x1 - x0)
            if not 0.6 <= aspect <= 1.4:
                continue
            out.append(LungMask(name.rsplit("/", 1)[-1], np.asarray(small), float(aspect)))
    logger.info("loaded %d usable lung masks", len(out))
    if not out:
        raise RuntimeError("no usable lung masks found in torchxrayvision data")
    return tuple(out)


@dataclass
class Anatomy:
    """The drawn normal anatomy plus the geometry findings need (patient frame, pixels)."""

    size: int
    base: np.ndarray  # float32 attenuation without findings
    lung: np.ndarray  # float32 soft lung mask in [0, 1] (both lungs)
    lung_depth: np.ndarray  # float32 relative lung thickness in [0, 1]
    heart_mask: np.ndarray  # bool, where the normal heart overlaps the lungs
    lung_side: dict[str, np.ndarray]  # "right"/"left" (patient side) -> bool mask
    lung_box: dict[str, tuple[int, int, int, int]]  # side -> (x0, y0, x1, y1)
    body: np.ndarray  # float32 soft-tissue thickness map
    texture: np.ndarray  # float32 lung-marking texture (zero mean), already inside `base`
    heart: dict[str, float]  # cx, cy, rx, ry, density, ctr
    thorax: tuple[float, float]  # inner thorax x0, x1
    spine_x: float
    spine_w: float
    ribs: list[dict[str, Any]]  # side, y0, amp, hw, bone, side_index
    air_depth: float
    bone: float
    avoid: np.ndarray  # bool: heart, effusion, enlarged heart (lung findings are placed elsewhere)

    def free(self, side: str) -> np.ndarray:
        """Lung of ``side`` outside ``avoid`` (the whole lung if too little is left)."""
        lung = self.lung_side[side]
        free = lung & ~self.avoid
        return free if free.sum() >= 0.2 * lung.sum() else lung


def fast_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide kernels run on a box-downsampled copy (deterministic, ~10x faster)."""
    img = img.astype(np.float32, copy=False)
    if sigma <= 0:
        return img
    factor = int(sigma // 2.0)
    if factor < 2:
        return ndi.gaussian_filter(img, sigma).astype(np.float32)
    h, w = img.shape
    small = Image.fromarray(img, mode="F").resize((max(w // factor, 1), max(h // factor, 1)),
                                                   Image.Resampling.BOX)
    blurred = ndi.gaussian_filter(np.asarray(small, dtype=np.float32), sigma / factor)
    up = Image.fromarray(blurred, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32).copy()


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return fast_blur(mask, sigma)


def ellipse(size: int, cx: float, cy: float, rx: float, ry: float, edge: float = 1.5,
            angle: float = 0.0) -> np.ndarray:
    """Soft-edged filled ellipse in [0, 1] (edge in pixels, angle in degrees)."""
    out = np.zeros((size, size), np.float32)
    reach = max(rx, ry) + edge + 2
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, size)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, size)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.ogrid[y0:y1, x0:x1]
    a = np.deg2rad(angle)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    r = np.sqrt((u / max(rx, 1e-3)) ** 2 + (v / max(ry, 1e-3)) ** 2)
    scale = max(min(rx, ry), 1e-3)
    out[y0:y1, x0:x1] = np.clip((1.0 - r) * scale / max(edge, 1e-3) + 0.5, 0.0, 1.0)
    return out


def rib_centre(rib: dict[str, Any], xs: np.ndarray, spine_x: float, half: float) -> np.ndarray:
    """Centre-line y of a posterior rib over columns ``xs`` (NaN outside the rib)."""
    sign = -1.0 if rib["side"] == "right" else 1.0
    t = sign * (xs - spine_x) / half
    tp = np.clip(t, 0.0, None)
    y = rib["y0"] - rib["amp"] * 0.8 * tp + rib["amp"] * 2.3 * tp**2.2
    return np.where((t > 0.06) & (t < 1.02), y, np.nan)


def draw_rib(canvas: np.ndarray, rib: dict[str, Any], spine_x: float, half: float,
             gap: tuple[float, float] | None = None) -> None:
    """Add one posterior rib (a cortical tube profile) to ``canvas`` in place."""
    size = canvas.shape[0]
    xs = np.arange(size, dtype=np.float32)
    yc = rib_centre(rib, xs, spine_x, half)
    cols = np.nonzero(~np.isnan(yc))[0]
    if cols.size == 0:
        return
    hw = rib["hw"]
    y_lo = int(max(np.nanmin(yc) - hw - 2, 0))
    y_hi = int(min(np.nanmax(yc) + hw + 2, size))
    if y_hi <= y_lo:
        return
    yy = np.arange(y_lo, y_hi, dtype=np.float32)[:, None]
    d = np.abs(yy - yc[None, cols]) / hw
    prof = np.where(d < 1.0, 0.55 + 0.45 * d**2, 0.0)  # brighter cortex at the edges
    prof *= np.clip((1.0 - d) * hw / 1.2, 0.0, 1.0)
    if gap is not None:
        prof *= ~((xs[cols] >= gap[0]) & (xs[cols] <= gap[1]))[None, :]
    canvas[y_lo:y_hi, cols] += rib["bone"] * prof


def build_anatomy(size: int, p: dict[str, float], mask: LungMask) -> Anatomy:
    """Draw the normal chest for the sampled parameters ``p`` (see ``render.sample_params``)."""
    s = float(size)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    mid = p["mid_x"] * s
    # Lungs from the real mask, scaled into the lung field box.
    lw = p["lung_w"] * s
    lh = float(np.clip(lw * mask.aspect * p["lung_aspect"], 0.55 * s, 0.82 * s))
    lx0, ly0 = mid - lw / 2, p["lung_top"] * s
    lab = Image.fromarray(mask.labels).resize((max(int(lw), 8), max(int(lh), 8)),
                                              Image.Resampling.NEAREST)
    lab_a = np.asarray(lab)
    lung_lab = np.zeros((size, size), np.uint8)
    x0i, y0i = round(lx0), round(ly0)
    hh = min(lab_a.shape[0], size - y0i)
    ww = min(lab_a.shape[1], size - x0i)
    lung_lab[y0i:y0i + hh, x0i:x0i + ww] = lab_a[:hh, :ww]
    lung_side = {"right": lung_lab == 1, "left": lung_lab == 2}
    lung_box = {}
    for side, m in lung_side.items():
        ys, xs_ = np.nonzero(m)
        lung_box[side] = (int(xs_.min()), int(ys.min()), int(xs_.max()) + 1, int(ys.max()) + 1)
    lung_hard = (lung_lab > 0).astype(np.float32)
    lung = _soft(lung_hard, 0.004 * s)
    lung_depth = _soft(lung_hard, 0.03 * s) * lung

    # Body: soft tissue following the chest wall, shoulders sloping to the neck.
    bx = (p["body_w"] * s) / 2
    rel_y = np.clip((yy - ly0) / lh, -0.3, 1.6)
    half_w = bx * (0.93 + 0.07 * np.clip(rel_y, 0.0, 1.0))
    body = np.clip(1.0 - ((xx - mid) / half_w) ** 2, 0.0, 1.0) ** 0.4
    neck = np.clip(1.0 - ((xx - mid) / (0.1 * s)) ** 2, 0.0, 1.0) ** 0.5
    shoulder = ly0 - 0.03 * s + 0.09 * s * ((xx - mid) / bx) ** 2
    top = 1.0 / (1.0 + np.exp(-(yy - shoulder) / (0.008 * s)))
    body = np.maximum(body * top, neck * 0.85 * (yy < ly0 + 0.1 * s)).astype(np.float32)
    body = _soft(body, 0.004 * s)

    air = p["air_depth"]
    base = body.copy()
    # Lung markings: vessels fan out from the hila, finer towards the periphery.
    rng = np.random.default_rng(int(p["texture_seed"]))
    tex = fast_blur(rng.standard_normal((size, size)).astype(np.float32), 0.006 * s)
    tex += 0.6 * ndi.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32),
                                     0.0025 * s)
    tex /= float(tex.std()) + 1e-6
    hy = ly0 + 0.45 * lh
    dist = np.sqrt(((xx - mid) / (0.5 * lw)) ** 2 + ((yy - hy) / (0.6 * lh)) ** 2)
    vessel = np.clip(1.15 - dist, 0.15, 1.0)
    texture = (0.05 * tex * vessel * lung).astype(np.float32)
    base -= air * lung_depth * body
    base += texture
    # Hila.
    for side_x in (-1.0, 1.0):
        base += 0.18 * ellipse(size, mid + side_x * 0.13 * lw, hy, 0.045 * lw, 0.08 * lh, 6.0)

    # Heart (patient left = image right) and aortic knob, over the lungs.
    th0, th1 = lx0 - 0.02 * s, lx0 + lw + 0.02 * s
    heart = heart_params(p["ctr"], mid, ly0, lh, th1 - th0, air)
    heart_img = heart_layer(size, heart, 1.0)
    base += heart_img * lung_depth * body
    knob = ellipse(size, mid + 0.06 * lw, ly0 + 0.22 * lh, 0.05 * lw, 0.05 * lh, 0.01 * s)
    base += air * 0.85 * lung_depth * body * knob
    # Trachea: air column in the neck and upper mediastinum.
    trach = ((np.abs(xx - mid) < 0.016 * s) & (yy < ly0 + 0.25 * lh)).astype(np.float32)
    base -= 0.2 * _soft(trach, 0.004 * s) * np.clip((ly0 + 0.25 * lh - yy) / (0.05 * lh), 0, 1)
    # Stomach bubble under the left hemidiaphragm.
    lb = lung_box["left"]
    base -= 0.12 * _soft(ellipse(size, lb[0] + 0.45 * (lb[2] - lb[0]), lb[3] + 0.045 * s,
                                 0.05 * s, 0.025 * s, 3.0), 0.006 * s) * body

    # Bones: spine, ribs, clavicles, humeral heads.
    bone = np.zeros((size, size), np.float32)
    spine_w = p["spine_w"] * s
    bone += spine_image(size, mid, spine_w, 0.0, ly0, p)
    half = lw / 2 + 0.02 * s
    ribs: list[dict[str, Any]] = []
    n_ribs = 10
    for i in range(n_ribs):
        y0 = ly0 + (0.02 + i * 0.088) * lh * p["rib_spacing"]
        amp = (0.10 + 0.012 * i) * lh
        hw = (0.0085 + 0.0006 * i) * s
        for side in ("right", "left"):
            rib: dict[str, Any] = {"side": side, "y0": y0, "amp": amp, "hw": hw,
                                   "bone": p["bone"] * 0.42, "side_index": float(i)}
            ribs.append(rib)
            draw_rib(bone, rib, mid, half)
    # Anterior ribs: fainter, running down and medially from the lateral wall.
    for i in range(7):
        for side in ("right", "left"):
            sign = -1.0 if side == "right" else 1.0
            xs = np.arange(size, dtype=np.float32)
            t = sign * (xs - mid) / half
            yc = ly0 + (0.16 + i * 0.12) * lh + 0.12 * lh * (1 - t)
            valid = (t > 0.35) & (t < 1.0)
            yc = np.where(valid, yc, np.nan)
            cols = np.nonzero(valid)[0]
            d = np.abs(yy[:, cols] - yc[None, cols]) / (0.009 * s)
            bone[:, cols] += p["bone"] * 0.22 * np.clip(1 - d, 0, 1)
    for side in ("right", "left"):
        sign = -1.0 if side == "right" else 1.0
        xs = np.arange(size, dtype=np.float32)
        t = sign * (xs - mid) / half
        cy = ly0 + 0.05 * lh - 0.11 * lh * t + 0.02 * lh * np.sin(2 * np.pi * t)
        valid = (t > 0.06) & (t < 0.92)
        cols = np.nonzero(valid)[0]
        d = np.abs(yy[:, cols] - cy[None, cols]) / (0.012 * s)
        bone[:, cols] += p["bone"] * 0.8 * np.clip(1.5 * (1 - d**2), 0, 1)
        bone += p["bone"] * 0.5 * ellipse(size, mid + sign * (bx * 1.0), ly0 + 0.03 * s,
                                          0.05 * s, 0.06 * s, 2.0)
    bone = _soft(bone, 0.7)
    base += bone * np.clip(body * 1.5, 0, 1)
    base = np.maximum(base, 0.0).astype(np.float32)
    return Anatomy(size=size, base=base, lung=lung, lung_depth=lung_depth,
                   heart_mask=heart_img > 0.3 * heart["density"], lung_side=lung_side,
                   lung_box=lung_box,
                   body=body, texture=texture, heart=heart, thorax=(th0, th1), spine_x=mid,
                   spine_w=spine_w, ribs=ribs, air_depth=air,
                   bone=p["bone"], avoid=heart_img > 0.3 * heart["density"])


def heart_params(ctr: float, mid: float, ly0: float, lh: float, thorax_w: float, air: float
                 ) -> dict[str, float]:
    """Heart ellipse for a cardiothoracic ratio ``ctr`` (width of heart / width of thorax)."""
    heart_w = ctr * thorax_w
    return {"cx": mid + 0.16 * heart_w, "cy": ly0 + lh * 0.8 - 0.05 * heart_w,
            "rx": heart_w / 2, "ry": 0.36 * heart_w, "angle": 18.0, "density": air * 0.95,
            "ctr": ctr}


def heart_layer(size: int, heart: dict[str, float], edge_frac: float) -> np.ndarray:
    """Heart density (before multiplying with lung depth and body thickness)."""
    return heart["density"] * ellipse(size, heart["cx"], heart["cy"], heart["rx"] / 0.9,
                                      heart["ry"], 0.01 * size * edge_frac, heart["angle"])


def spine_image(size: int, mid: float, width: float, bend: float, top: float,
                p: dict[str, float]) -> np.ndarray:
    """Vertebral column (bodies, discs, pedicles) bent sideways by ``bend`` pixels (scoliosis)."""
    s = float(size)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    t = np.clip((yy - top) / (s - top), 0.0, 1.0)
    centre = mid + bend * np.sin(np.pi * t)
    d = np.abs(xx - centre) / (width / 2)
    column = np.clip(1.0 - d**4, 0.0, 1.0)
    period = 0.048 * s
    phase = (yy - top) / period
    disc = 0.6 + 0.4 * np.clip(np.abs(np.sin(np.pi * phase)) * 3.0, 0.0, 1.0)
    ped = np.zeros_like(column)
    for sign in (-1.0, 1.0):
        ped += np.clip(1.0 - (((xx - centre - sign * 0.36 * width) / (0.1 * width)) ** 2
                              + ((phase % 1.0 - 0.4) / 0.22) ** 2), 0.0, 1.0)
    img = p["bone"] * (0.3 * column * disc + 0.25 * ped)
    return (img * (yy > top - 0.1 * s)).astype(np.float32)
