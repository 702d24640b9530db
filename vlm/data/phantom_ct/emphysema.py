"""Diffuse disease for DrasCLR: emphysema as low-attenuation areas (LAA) with regional patterns.

The score is the percentage of lung voxels below -950 HU (LAA%-950) measured on the *final*
volume (after blur and noise) inside the saved lung mask, so anyone can recompute it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vlm.data.phantom_ct.geometry import Grid

LAA_THRESHOLD_HU = -950.0
#: (class, lower bound %, upper bound %) of LAA%-950; a score falls in [lower, upper).
EMPHYSEMA_CLASSES: tuple[tuple[str, float, float], ...] = (
    ("none", 0.0, 5.0), ("mild", 5.0, 15.0), ("moderate", 15.0, 25.0), ("severe", 25.0, 100.01),
)
#: Target LAA% drawn per class (inside the class so that the measured score stays in it).
_TARGETS = {"none": (0.0, 2.5), "mild": (7.0, 13.0), "moderate": (17.0, 23.0),
            "severe": (28.0, 42.0)}
PATTERNS = ("centrilobular", "panlobular", "paraseptal")
#: Initial over-marking: blur and noise erode the edges of small LAA clusters. The renderer
#: then corrects once with the measured score (see ``render.render_volume``).
GAIN = 1.15
EMPHYSEMA_HU = -990.0


def emphysema_class(score: float) -> str:
    """Severity class of an LAA%-950 score."""
    for name, lo, hi in EMPHYSEMA_CLASSES:
        if lo <= score < hi:
            return name
    return EMPHYSEMA_CLASSES[-1][0]


def emphysema_score(hu: np.ndarray, lung: np.ndarray) -> float:
    """Percentage of ``lung`` voxels of ``hu`` below -950 HU (both (Z, Y, X))."""
    n = int(lung.sum())
    if n == 0:
        return 0.0
    return 100.0 * float((hu[lung] < LAA_THRESHOLD_HU).sum()) / n


def sample_emphysema(rng: np.random.Generator) -> tuple[str, str, float]:
    """(target class, pattern, target LAA fraction); classes are drawn uniformly."""
    cls = str(rng.choice([c[0] for c in EMPHYSEMA_CLASSES]))
    if cls == "none":
        pattern = "none"
    elif cls == "severe":  # paraseptal disease is rim-limited, so severe disease is not
        pattern = str(rng.choice(PATTERNS[:2], p=[0.6, 0.4]))
    else:
        pattern = str(rng.choice(PATTERNS, p=[0.5, 0.3, 0.2]))
    frac = rng.uniform(*_TARGETS[cls]) / 100.0
    return cls, pattern, float(frac)


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Band-limited noise, unit variance: white noise blurred by ``sigma`` voxels."""
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma, mode="wrap")
    return n / max(float(n.std()), 1e-6)


def laa_field(grid: Grid, lung: np.ndarray, pattern: str, rng: np.random.Generator
              ) -> np.ndarray | None:
    """Score field whose upper quantiles become the emphysematous voxels (None: no disease).

    Regional weight + blob noise: centrilobular weights the upper zones with small clustered
    holes, panlobular the lower zones more diffusely, paraseptal the subpleural rim.

    Returns:
        (Z, Y, X) float32 field, or None for pattern "none".
    """
    if pattern == "none" or not lung.any():
        return None
    ks = np.flatnonzero(lung.any(axis=(1, 2)))
    k0, k1 = float(ks[0]), float(max(ks[-1], ks[0] + 1))
    zrel = ((np.arange(lung.shape[0]) - k0) / (k1 - k0)).astype(np.float32)[:, None, None]
    vox = grid.voxel_mm
    if pattern == "centrilobular":
        return 1.6 * zrel + _blobs(rng, lung.shape, max(0.6, 3.0 / vox))
    if pattern == "panlobular":
        return 1.6 * (1.0 - zrel) + 0.8 * _blobs(rng, lung.shape, max(0.8, 5.0 / vox))
    depth = ndimage.distance_transform_edt(lung, sampling=grid.spacing).astype(np.float32)
    return -depth / 8.0 + 0.6 * _blobs(rng, lung.shape, max(0.6, 4.0 / vox))


def laa_mask(field: np.ndarray | None, lung: np.ndarray, eligible: np.ndarray,
             frac: float) -> np.ndarray:
    """Mark the top of ``field`` inside ``eligible`` so that about ``frac`` of the lung is LAA.

    Args:
        field: from :func:`laa_field`. lung: (Z, Y, X) bool lung mask. eligible: voxels that
            may become LAA (parenchyma away from vessels). frac: target fraction of the lung.

    Returns:
        (Z, Y, X) bool LAA mask.
    """
    out = np.zeros(lung.shape, dtype=bool)
    if field is None or frac <= 0:
        return out
    vals = field[eligible]
    if vals.size == 0:
        return out
    want = min(frac * float(lung.sum()) / vals.size, 1.0)
    thr = float(np.quantile(vals, 1.0 - want))
    out[eligible] = vals > thr
    return out
