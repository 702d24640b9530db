"""From anatomy to a finished HU volume: tissue values, vessels, emphysema, lesions, blur, noise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from vlm.data.phantom_ct.anatomy import build_anatomy
from vlm.data.phantom_ct.emphysema import (
    EMPHYSEMA_CLASSES,
    EMPHYSEMA_HU,
    GAIN,
    emphysema_class,
    emphysema_score,
    laa_field,
    laa_mask,
    sample_emphysema,
)
from vlm.data.phantom_ct.geometry import Grid, smooth_noise
from vlm.data.phantom_ct.lesions import box3d, paint_lesions, place_lesions
from vlm.data.phantom_ct.tissues import Tissue, body_mask, sample_hu
from vlm.data.phantom_ct.writers import HU_MAX, HU_MIN

VESSEL_HU = 40.0


@dataclass
class RenderedVolume:
    """One finished subject.

    Attributes:
        hu: (Z, Y, X) int16 HU (what the DICOM and NIfTI files hold).
        labels: (Z, Y, X) uint8 organ map (:class:`Tissue`), not written to disk by default.
        lesion_map: (Z, Y, X) uint8, label = lesion index + 1.
        lung: (Z, Y, X) bool lung mask.
        lesions: per-lesion records (box, location, kind, diameter, mean HU, ...).
        info: emphysema and noise parameters.
    """

    hu: np.ndarray
    labels: np.ndarray
    lesion_map: np.ndarray
    lung: np.ndarray
    lesions: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    landmarks: dict[str, float] = field(default_factory=dict)


def volume_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """Independent random stream ``stream`` of volume ``index`` (independent of worker count)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), int(stream)]))


def _target_of(cls: str, frac: float) -> float:
    """Clamp a target LAA% into the interior of its class range."""
    for name, lo, hi in EMPHYSEMA_CLASSES:
        if name == cls:
            return float(np.clip(100.0 * frac, lo + 1.0, min(hi, 60.0) - 1.0))
    return 100.0 * frac


def render_volume(grid: Grid, seed: int, index: int) -> RenderedVolume:
    """Generate subject ``index`` of dataset ``seed`` on ``grid``.

    Emphysema is first marked with a fixed over-marking gain; if the score measured on the
    finished volume falls outside the drawn class, the LAA fraction is rescaled once and the
    (deterministic) finishing steps are repeated.
    """
    rng = volume_rng(seed, index)
    an = build_anatomy(grid, rng)
    lut = sample_hu(rng)
    labels = an.labels
    base = lut[labels]  # (Z, Y, X) float32
    lung = an.lung
    # gravity-dependent lung density (posterior denser) and soft-tissue texture
    grad = 25.0 * np.clip((grid.y - an.landmarks["by"]) / 110.0, -1.0, 1.0)  # (1, Y, 1)
    base += np.where(lung, grad, 0.0).astype(np.float32)
    cells = tuple(max(3, int(n * s / 15.0)) for n, s in zip(grid.shape, grid.spacing,
                                                            strict=True))
    tex = smooth_noise(rng, grid.shape, cells)  # type: ignore[arg-type]
    soft = body_mask(labels) & (labels != Tissue.GAS) & (labels != Tissue.AIRWAY)
    base += np.where(soft & ~lung, 4.0 * tex, np.where(lung, 8.0 * tex, 0.0)).astype(np.float32)
    vf = an.vessel_frac
    # emphysema, lesions and scanner noise each use their own stream
    emph_rng = volume_rng(seed, index, 2)
    emph_target, pattern, frac = sample_emphysema(emph_rng)
    # "none" still has a few physiological low-attenuation voxels (target 0-2.5 %)
    field = laa_field(grid, lung, "centrilobular" if pattern == "none" else pattern, emph_rng)
    eligible = lung & (vf < 0.15)
    lesion_map, lesions = place_lesions(grid, an.hosts, lut, volume_rng(seed, index, 3))
    noise_rng = volume_rng(seed, index, 4)
    noise_sd = float(noise_rng.uniform(10.0, 20.0))
    noise = ndimage.gaussian_filter(noise_rng.standard_normal(grid.shape, dtype=np.float32), 0.6)
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    sigma = tuple(float(np.clip(1.2 / s, 0.3, 0.8)) for s in grid.spacing)

    def finish(f: float) -> np.ndarray:
        hu = base.copy()
        hu[laa_mask(field, lung, eligible, f)] = EMPHYSEMA_HU
        hu = np.where(vf > 0, hu * (1.0 - vf) + VESSEL_HU * vf, hu).astype(np.float32)
        paint_lesions(hu, lesion_map, lesions, volume_rng(seed, index, 5))
        hu = ndimage.gaussian_filter(hu, sigma) + noise  # point spread, correlated noise
        return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)

    hu_i = finish(frac * GAIN)
    score = emphysema_score(hu_i, lung)
    if field is not None and emphysema_class(score) != emph_target and score > 0:
        target = _target_of(emph_target, frac)
        hu_i = finish(frac * GAIN * target / score)
        score = emphysema_score(hu_i, lung)
    for rec in lesions:
        sel = lesion_map == rec["label"]
        rec["box"] = box3d(sel)
        rec["n_voxels"] = int(sel.sum())
        rec["mean_hu"] = round(float(hu_i[sel].mean()), 1)
        vol_mm3 = rec["n_voxels"] * float(np.prod(grid.spacing))
        rec["equivalent_diameter_mm"] = round(float((6.0 * vol_mm3 / np.pi) ** (1 / 3)), 2)
    info = {"emphysema_score": round(score, 3), "emphysema_class": emphysema_class(score),
            "emphysema_pattern": pattern, "emphysema_target_class": emph_target,
            "noise_sd_hu": round(noise_sd, 2)}
    return RenderedVolume(hu=hu_i, labels=labels, lesion_map=lesion_map, lung=lung,
                          lesions=lesions, info=info, landmarks=an.landmarks)
