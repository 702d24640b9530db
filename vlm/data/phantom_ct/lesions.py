"""Focal lesions placed inside their host organ or region, in the eight DeepLesion classes."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from vlm.data.phantom_ct.geometry import Grid, smooth_noise
from vlm.data.phantom_ct.tissues import LOCATION_CLASSES, Tissue

logger = logging.getLogger(__name__)

#: Per class: diameter range (mm), minimum fraction of the lesion ellipsoid inside the host, and
#: (kind, probability, HU range) choices. A range given as ("liver", lo, hi) is relative to the
#: subject's liver HU (hypodense lesions).
LESION_SPECS: dict[str, dict[str, Any]] = {
    "lung": {"diam": (5.0, 30.0), "fit": 0.97,
             "kinds": [("solid_nodule", 1.0, (15.0, 50.0))]},
    "liver": {"diam": (8.0, 30.0), "fit": 0.95,
              "kinds": [("hypodense_mass", 0.6, ("liver", -45.0, -25.0)),
                        ("cyst", 0.4, (0.0, 15.0))]},
    "bone": {"diam": (6.0, 22.0), "fit": 0.8,
             "kinds": [("lytic", 0.5, (40.0, 120.0)), ("sclerotic", 0.5, (750.0, 1000.0))]},
    "kidney": {"diam": (8.0, 25.0), "fit": 0.8,
               "kinds": [("cyst", 0.6, (0.0, 12.0)), ("solid_mass", 0.4, (50.0, 65.0))]},
    "mediastinum": {"diam": (8.0, 25.0), "fit": 0.75,
                    "kinds": [("lymph_node", 1.0, (30.0, 50.0))]},
    "abdomen": {"diam": (10.0, 30.0), "fit": 0.8,
                "kinds": [("lymph_node", 0.6, (30.0, 50.0)), ("mass", 0.4, (35.0, 55.0))]},
    "soft_tissue": {"diam": (8.0, 30.0), "fit": 0.8,
                    "kinds": [("soft_tissue_mass", 1.0, (35.0, 55.0))]},
    "pelvis": {"diam": (10.0, 30.0), "fit": 0.8,
               "kinds": [("lymph_node", 0.5, (30.0, 50.0)), ("mass", 0.5, (35.0, 55.0))]},
}

#: Probabilities of 0, 1, 2, 3, 4 lesions per volume.
N_LESION_PROBS = (0.15, 0.3, 0.3, 0.15, 0.1)


def _try_place(grid: Grid, host: np.ndarray, taken: np.ndarray, centre_idx: np.ndarray,
               semi_mm: np.ndarray, fit: float, rng: np.random.Generator
               ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Lobulated ellipsoid around ``centre_idx`` clipped to ``host``; None if it does not fit."""
    sp = np.asarray(grid.spacing)
    half = np.ceil(semi_mm * 1.2 / sp).astype(int) + 1
    lo = np.maximum(centre_idx - half, 0)
    hi = np.minimum(centre_idx + half + 1, np.asarray(grid.shape))
    sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    kk, jj, ii = (np.arange(a, b) for a, b in zip(lo, hi, strict=True))
    q = (((kk - centre_idx[0]) * sp[0] / semi_mm[0]) ** 2)[:, None, None] + (
        ((jj - centre_idx[1]) * sp[1] / semi_mm[1]) ** 2)[None, :, None] + (
        ((ii - centre_idx[2]) * sp[2] / semi_mm[2]) ** 2)[None, None, :]  # (z, y, x) box
    shape = tuple(int(v) for v in q.shape)
    q = q * (1.0 + 0.15 * smooth_noise(rng, shape, (3, 3, 3)))  # type: ignore[arg-type]
    c = tuple(int(v) for v in centre_idx - lo)
    q[c] = 0.0  # the centre voxel always belongs to the lesion
    ell = q < 1.0
    inside = ell & host[sl]
    if inside.sum() < fit * ell.sum() or (taken[sl] & ell).any():
        return None
    return sl, inside


def place_lesions(grid: Grid, hosts: dict[str, np.ndarray], lut: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw 0-4 lesions with random classes and place each inside its host region.

    Returns:
        (Z, Y, X) uint8 lesion map (label = lesion index + 1) and one record per lesion with
        location, kind, target HU, design diameter and the voxel box (half-open).
    """
    lesion_map = np.zeros(grid.shape, dtype=np.uint8)
    taken = np.zeros(grid.shape, dtype=bool)  # lesions grown by a margin: keep them apart
    records: list[dict[str, Any]] = []
    n = int(rng.choice(len(N_LESION_PROBS), p=N_LESION_PROBS))
    for _ in range(n):
        cls = str(rng.choice(LOCATION_CLASSES))
        spec = LESION_SPECS[cls]
        host = hosts[cls]
        cand = np.flatnonzero(host)
        if cand.size == 0:
            logger.debug("no host voxels for a %s lesion; skipped", cls)
            continue
        placed = None
        d0 = rng.uniform(*spec["diam"])
        for attempt in range(40):
            d = max(spec["diam"][0], d0 * 0.85 ** (attempt // 8))
            semi = d / 2 * np.concatenate([[1.0], rng.uniform(0.75, 1.0, size=2)])
            semi = rng.permutation(semi)
            centre = np.array(np.unravel_index(int(rng.choice(cand)), grid.shape))
            placed = _try_place(grid, host, taken, centre, semi, spec["fit"], rng)
            if placed is not None:
                break
        if placed is None:
            logger.debug("could not fit a %s lesion; skipped", cls)
            continue
        sl, mask = placed
        kinds = spec["kinds"]
        pick = int(rng.choice(len(kinds), p=[k[1] for k in kinds]))
        kind, _, rng_hu = kinds[pick]
        if rng_hu[0] == "liver":
            hu = float(lut[int(Tissue.LIVER)]) + rng.uniform(rng_hu[1], rng_hu[2])
        else:
            hu = rng.uniform(rng_hu[0], rng_hu[1])
        idx = len(records)
        lesion_map[sl][mask] = idx + 1
        grown = np.zeros(grid.shape, dtype=bool)
        grown[sl] = mask
        taken |= _dilate(grown)
        records.append({"index": idx, "label": idx + 1, "location": cls, "kind": kind,
                        "target_hu": round(float(hu), 1),
                        "diameter_mm": round(float(2 * semi.max()), 2),
                        "centre_voxel": [int(v) for v in centre]})
    return lesion_map, records


def _dilate(mask: np.ndarray) -> np.ndarray:
    """6-neighbour binary dilation by one voxel."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    out[:, :, 1:] |= mask[:, :, :-1]
    out[:, :, :-1] |= mask[:, :, 1:]
    return out


def paint_lesions(hu: np.ndarray, lesion_map: np.ndarray, records: list[dict[str, Any]],
                  rng: np.random.Generator) -> None:
    """Set lesion voxels of ``hu`` ((Z, Y, X) float32, before blur and noise) in place."""
    for rec in records:
        sel = lesion_map == rec["label"]
        hu[sel] = rec["target_hu"] + rng.normal(0.0, 4.0, size=int(sel.sum())).astype(np.float32)


def box3d(mask: np.ndarray) -> list[int]:
    """Half-open voxel box [z0, y0, x0, z1, y1, x1] of a non-empty (Z, Y, X) mask."""
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return [out[0][0], out[1][0], out[2][0], out[0][1], out[1][1], out[2][1]]


def slice_annotations(lesion_map: np.ndarray, n_lesions: int
                      ) -> tuple[list[int], dict[str, list[list[int]]], dict[str, list[int]]]:
    """Per-slice lesion flags, 2-D boxes [y0, x0, y1, x1] (half-open) keyed by str(k), and the
    lesion label of each box (same keys and order)."""
    flags = [0] * lesion_map.shape[0]
    boxes: dict[str, list[list[int]]] = {}
    labels: dict[str, list[int]] = {}
    ks = np.flatnonzero(lesion_map.any(axis=(1, 2)))
    for k in ks:
        sl = lesion_map[k]  # (Y, X)
        rows: list[list[int]] = []
        row_labels: list[int] = []
        for label in range(1, n_lesions + 1):
            m = sl == label
            if not m.any():
                continue
            yy = np.flatnonzero(m.any(axis=1))
            xx = np.flatnonzero(m.any(axis=0))
            rows.append([int(yy[0]), int(xx[0]), int(yy[-1]) + 1, int(xx[-1]) + 1])
            row_labels.append(label)
        if rows:
            flags[int(k)] = 1
            boxes[str(int(k))] = rows
            labels[str(int(k))] = row_labels
    return flags, boxes, labels
