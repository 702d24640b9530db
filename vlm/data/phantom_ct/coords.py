"""A normalised anatomical body frame for DrasCLR's location conditioning.

Each subject gets a frame: per array axis, the voxel coordinates that map to -1 and +1.

* x (axis i): -1 at the body's right edge, +1 at its left edge (same sense as i and LPS x).
* y (axis j): -1 at the anterior body edge, +1 at the posterior edge (same sense as j, LPS y).
* z (axis k): +1 at the lung apex, 0 at the lung base (lowest lung voxel), -1 one lung-height
  below the base (same sense as k and LPS z: superior is positive).

The edges come from the body mask (all slices) and the lung mask, so the same anatomy maps to
about the same normalised coordinates across subjects of different size and position. Values
outside the frame (e.g. above the apex) are clipped to [-1, 1] unless ``clip=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

FRAME_DEFINITION = ("k: +1 lung apex, 0 lung base, -1 one lung height below; j: -1 anterior, "
                    "+1 posterior body edge; i: -1 right, +1 left body edge")


def body_frame(body: np.ndarray, lung: np.ndarray) -> dict[str, Any]:
    """Frame parameters from (Z, Y, X) bool body and lung masks (JSON-ready dict).

    Returns:
        {"axes": "kji", "lo": [k, j, i], "hi": [k, j, i], "definition": ...}: voxel
        coordinates mapped to -1 (lo) and +1 (hi) on each axis.
    """
    if not body.any() or not lung.any():
        raise ValueError("body and lung masks must be non-empty")
    ks = np.flatnonzero(lung.any(axis=(1, 2)))
    apex, base = float(ks[-1]), float(ks[0])
    height = max(apex - base, 1.0)
    js = np.flatnonzero(body.any(axis=(0, 2)))
    is_ = np.flatnonzero(body.any(axis=(0, 1)))
    lo = [base - height, float(js[0]), float(is_[0])]
    hi = [apex, float(js[-1]), float(is_[-1])]
    return {"axes": "kji", "lo": [round(v, 3) for v in lo], "hi": [round(v, 3) for v in hi],
            "definition": FRAME_DEFINITION}


def to_body_frame(kji: np.ndarray | list[float], frame: Mapping[str, Any],
                  clip: bool = True) -> np.ndarray:
    """Map voxel (or patch-centre) coordinates (..., 3) in (k, j, i) order to the normalised
    frame (..., 3) in (z, y, x) order."""
    p = np.asarray(kji, dtype=np.float64)
    lo = np.asarray(frame["lo"], dtype=np.float64)
    hi = np.asarray(frame["hi"], dtype=np.float64)
    u = 2.0 * (p - lo) / np.maximum(hi - lo, 1e-6) - 1.0
    return np.clip(u, -1.0, 1.0) if clip else u


def from_body_frame(uvw: np.ndarray | list[float], frame: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`to_body_frame` (without clipping): (..., 3) -> (k, j, i) voxels."""
    u = np.asarray(uvw, dtype=np.float64)
    lo = np.asarray(frame["lo"], dtype=np.float64)
    hi = np.asarray(frame["hi"], dtype=np.float64)
    return lo + (u + 1.0) / 2.0 * (hi - lo)


def patch_centres(shape: tuple[int, int, int], patch: int, stride: int | None = None
                  ) -> np.ndarray:
    """(N, 3) (k, j, i) centres of a regular grid of cubic patches covering ``shape``."""
    stride = stride or patch
    axes = [np.arange(patch / 2 - 0.5, n - patch / 2 + 0.5, stride) for n in shape]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)
