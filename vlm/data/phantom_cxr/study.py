"""Render one PhantomCXR study: anatomy + finding layers -> stored pixels, masks, boxes, contrast.

All random draws come from generators seeded by ``(seed, report uid)`` (and, per finding, by
``(seed, report uid, index, term)``), so a study renders identically whatever the worker count,
and rendering with or without any subset of findings shares every other draw, including noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlm.data.iu_reports import Finding
from vlm.data.phantom_cxr.anatomy import build_anatomy, load_lung_masks
from vlm.data.phantom_cxr.findings import LAYERS
from vlm.data.phantom_cxr.render import (
    INTERNAL_MAX,
    Acquisition,
    Transfer,
    cut_floor,
    item_rng,
    sample_acquisition,
    sample_params,
    warp,
)

# Documented visibility range: mean change of the noise-free display value (0 = black,
# 1 = white, MONOCHROME2 sense) over the finding mask. Negative for lucent findings.
CONTRAST_RANGE = {
    "atelectasis": (0.004, 0.45), "calcified_granuloma": (0.015, 0.6),
    "cardiomegaly": (0.05, 0.6), "emphysema": (-0.45, -0.02), "fracture": (0.01, 0.45),
    "lung_opacity": (0.004, 0.45), "nodule": (0.015, 0.5), "pleural_effusion": (0.012, 0.6),
    "pneumothorax": (-0.4, -0.008), "pulmonary_edema": (0.01, 0.4), "scoliosis": (0.008, 0.3),
    "support_devices": (0.012, 0.7),
}
# Every finding must also change at least 5% of its mask pixels by this much (95th percentile
# of |change|), so even a finding stacked on another one is visible somewhere. A mild scoliosis
# moves the spine behind the (bright) mediastinum, so its floor is lower.
MIN_PEAK_CONTRAST = {name: 0.02 for name in CONTRAST_RANGE} | {"scoliosis": 0.012}
OCCUPYING = ("cardiomegaly", "pleural_effusion")
# Scoliosis moves bone and a healed fracture adds callus next to the gap (both signs), so their
# visibility is measured as the mean |change| instead.
ABSOLUTE_CONTRAST = ("fracture", "scoliosis")
MAX_SATURATED = 0.05  # at most this fraction of a mask may sit at (near) black or white


@dataclass
class StudyRender:
    """Everything one rendered study produces."""

    pixels: np.ndarray  # stored uint16 values (photometric as in ``acq``)
    acq: Acquisition
    masks: list[np.ndarray]  # bool (size, size) per finding
    boxes: list[list[int] | None]  # [x0, y0, x1, y1) per finding, None if empty
    contrasts: list[float]
    peaks: list[float]  # 95th percentile of |change| over each mask
    saturated: list[float]  # fraction of each mask at black/white
    lung_mask_name: str


def render_study(uid: str, findings: Sequence[Finding], *, size: int = 512, seed: int = 0,
                 view: str = "", include: Sequence[int] | None = None,
                 photometric: str | None = None, bits_stored: int | None = None
                 ) -> StudyRender:
    """Render the frontal radiograph of one report.

    Args:
        uid: report uid (seeds every draw together with ``seed``).
        findings: mapped findings, drawn in this order.
        size: output rows = columns.
        view: 'PA'/'AP' from the source metadata, '' to draw one.
        include: indices of the findings to draw (default all); masks, boxes and contrasts
            are always computed for every finding.
        photometric / bits_stored: override the drawn header values (used by tests).
    """
    rng = item_rng(seed, uid)
    params = sample_params(rng)
    masks_all = load_lung_masks()
    lung = masks_all[int(rng.integers(len(masks_all)))]
    acq = sample_acquisition(rng, size, view)
    if photometric is not None:
        acq.photometric = photometric
    if bits_stored is not None:
        acq.bits_stored = int(bits_stored)
    inner = min(size, INTERNAL_MAX)
    anat = build_anatomy(inner, params, lung)
    base = warp(anat.base, acq, size)
    mm = acq.pixel_spacing * size / inner / acq.scale  # patient-frame pixel size
    # Space-occupying findings first: lung findings are then placed outside them.
    order = sorted(range(len(findings)), key=lambda i: findings[i].finding not in OCCUPYING)
    by_index: dict[int, np.ndarray] = {}
    for k in order:
        f = findings[k]
        frng = item_rng(seed, f"{uid}|{k}|{f.term}")
        layer = LAYERS[f.finding](anat, f, frng, mm)
        if f.finding in OCCUPYING:
            anat.avoid |= layer > 0.05 * float(layer.max(initial=0.0))
        by_index[k] = cut_floor(warp(layer, acq, size))
    layers = [by_index[k] for k in range(len(findings))]
    transfer = Transfer.from_base(base, acq)
    chosen = range(len(layers)) if include is None else sorted(set(include))
    total = base.copy()
    for k in chosen:
        total += layers[k]
    if len(chosen) == len(layers):
        full = total
    else:
        full = base.copy()
        for layer in layers:
            full += layer
    shown = transfer.display(full)
    pixels = transfer.stored_from_display(shown if full is total else transfer.display(total),
                                          acq.bits_stored, acq.photometric)
    masks: list[np.ndarray] = []
    boxes: list[list[int] | None] = []
    contrasts: list[float] = []
    peaks: list[float] = []
    saturated: list[float] = []
    for k, layer in enumerate(layers):
        m = layer != 0
        masks.append(m)
        if not m.any():
            boxes.append(None)
            contrasts.append(0.0)
            peaks.append(0.0)
            saturated.append(0.0)
            continue
        ys, xs = np.nonzero(m)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
        without = transfer.display(full - layer)
        diff = (shown - without)[m]
        name = findings[k].finding
        value = float(np.abs(diff).mean() if name in ABSOLUTE_CONTRAST else diff.mean())
        contrasts.append(round(value, 4))
        peaks.append(round(float(np.percentile(np.abs(diff), 95)), 4))
        sat = (shown[m] <= 0.005) | (shown[m] >= 0.985)
        saturated.append(round(float(sat.mean()), 4))
    return StudyRender(pixels, acq, masks, boxes, contrasts, peaks, saturated, lung.name)
