"""Random chest-abdomen anatomy as an organ label map (no HU yet).

Every size is drawn per subject and organ positions are expressed relative to the body and
cavity size, so the anatomy varies between subjects yet keeps a consistent layout (which is
what makes the normalised body frame of :mod:`coords` meaningful).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vlm.data.phantom_ct.geometry import Grid, ellipsoid_q, render_tubes, smooth_noise
from vlm.data.phantom_ct.skeleton import paint_pelvis, paint_ribs, paint_spine, spine_geometry
from vlm.data.phantom_ct.tissues import Tissue
from vlm.data.phantom_ct.vessels import great_vessels, pulmonary_vessels


@dataclass
class Anatomy:
    """Output of :func:`build_anatomy`.

    Attributes:
        labels: (Z, Y, X) uint8 :class:`Tissue` map.
        vessel_frac: (Z, Y, X) float32 pulmonary-vessel occupancy inside the lungs.
        hosts: (Z, Y, X) bool masks of the lesion host regions keyed by location class.
        landmarks: scalar landmarks in mm (apex_z, dome_r, dome_l, crest_z, carina_z, ...).
    """

    labels: np.ndarray
    vessel_frac: np.ndarray
    hosts: dict[str, np.ndarray] = field(default_factory=dict)
    landmarks: dict[str, float] = field(default_factory=dict)

    @property
    def lung(self) -> np.ndarray:
        """(Z, Y, X) bool lung mask (parenchyma and the pulmonary vessels within it)."""
        return self.labels == Tissue.LUNG


def _se(xx: np.ndarray, yy: np.ndarray, a: np.ndarray, b_front: np.ndarray,
        b_back: np.ndarray) -> np.ndarray:
    """Superellipse value, round in front (p = 2) and flatter at the back (p = 3); < 1 inside."""
    ty = np.where(yy < 0, (yy / b_front) ** 2, np.abs(yy / b_back) ** 3)  # (Z, Y, 1)
    return ((xx / a) ** 2 + ty).astype(np.float32)  # (Z, Y, X)


def _sample_frame(grid: Grid, rng: np.random.Generator) -> dict[str, Any]:
    """Per-subject body size, position and cranio-caudal landmarks (mm)."""
    fz = grid.shape[0] * grid.spacing[0]
    fy = grid.shape[1] * grid.spacing[1]
    fx = grid.shape[2] * grid.spacing[2]
    z_top = grid.origin[2] + (grid.shape[0] - 1) * grid.spacing[0]
    fr: dict[str, Any] = {"z_top": z_top, "bx": rng.uniform(-8.0, 8.0),
                          "by": rng.uniform(-4.0, 12.0)}
    fr["A"] = rng.uniform(0.37, 0.43) * fx  # chest half-width
    fr["B"] = rng.uniform(0.26, 0.31) * fy  # chest half-depth
    fr["apex_z"] = z_top - rng.uniform(0.03, 0.07) * fz
    fr["dome_r"] = fr["apex_z"] - rng.uniform(0.40, 0.47) * fz
    fr["dome_l"] = fr["dome_r"] - rng.uniform(0.015, 0.04) * fz
    fr["dome_mid"] = 0.5 * (fr["dome_r"] + fr["dome_l"])
    fr["crest_z"] = fr["dome_r"] - rng.uniform(0.31, 0.36) * fz
    fr["carina_z"] = fr["apex_z"] - rng.uniform(0.19, 0.23) * fz
    fr["z_ctrl"] = [min(0.0, fr["crest_z"] - 1.0), fr["crest_z"],
                    0.5 * (fr["crest_z"] + fr["dome_r"]), fr["dome_r"],
                    0.5 * (fr["dome_r"] + fr["apex_z"]), fr["apex_z"], max(z_top, fr["apex_z"] + 1)]
    return fr


def _paint_table(labels: np.ndarray, grid: Grid, y_back: float,
                 rng: np.random.Generator) -> None:
    """CT couch top: a thin plate curved up at the sides, just behind the patient's back."""
    y0 = y_back + rng.uniform(2.0, 6.0)
    x = grid.x[0]  # (1, X)
    top = y0 - 0.0008 * x ** 2  # (1, X), curves towards the patient at the sides
    y = grid.y[0]  # (Y, 1)
    plate = (y >= top) & (y < top + 4.0) & (np.abs(x) < 0.85 * abs(grid.origin[0]))  # (Y, X)
    if plate.any():
        labels[plate[None] & (labels == Tissue.AIR)] = Tissue.TABLE


def build_anatomy(grid: Grid, rng: np.random.Generator) -> Anatomy:
    """Draw one subject's anatomy on ``grid``."""
    fr = _sample_frame(grid, rng)
    z, y, x = grid.z, grid.y, grid.x
    zf = z.ravel()
    zc = fr["z_ctrl"]
    pel, abd_a, abd_b = rng.uniform(0.98, 1.05), rng.uniform(0.9, 1.0), rng.uniform(0.95, 1.12)
    a = (np.interp(zf, zc, [1.03 * pel, pel, abd_a, 1.0, 1.0, 0.95, 0.9]) * fr["A"])[:, None, None]
    b = (np.interp(zf, zc, [0.93, 0.95, abd_b, 1.0, 1.0, 0.93, 0.85]) * fr["B"])[:, None, None]
    fat_chest, fat_abd = rng.uniform(6.0, 22.0), rng.uniform(1.0, 1.8)
    fat = (np.interp(zf, zc, [fat_abd, fat_abd, fat_abd, 1.0, 1.0, 0.9, 0.9]) * fat_chest)[
        :, None, None]
    a_lean = a - 0.8 * fat_chest
    b_lean = b - 0.8 * fat_chest
    a = a_lean + fat  # subcutaneous fat adds to the lean body
    b = b_lean + fat
    mus = rng.uniform(8.0, 13.0)
    mus_back = rng.uniform(24.0, 32.0)
    xx = x - fr["bx"]
    yy = y - fr["by"]
    labels = np.zeros(grid.shape, dtype=np.uint8)  # (Z, Y, X)
    # irregular outline and fat thickness varying around the body: (1, Y, X) smooth fields
    wob = smooth_noise(rng, (1, grid.shape[1], grid.shape[2]), (1, 6, 6))
    wob_fat = smooth_noise(rng, (1, grid.shape[1], grid.shape[2]), (1, 5, 5))
    labels[_se(xx, yy, a, b, b) < 1 + 0.02 * wob] = Tissue.MUSCLE  # skin
    labels[_se(xx, yy, a - 2, b - 2, b - 2) < 1 + 0.02 * wob] = Tissue.SUBCUT_FAT
    inner = a - 2 - fat
    labels[_se(xx, yy, inner, b - 2 - fat, b - 2 - fat) < 1 + 0.8 * fat / a * wob_fat] = (
        Tissue.MUSCLE)
    ac = a - 2 - fat - mus
    bcf = b - 2 - fat - mus
    bcb = b - 2 - fat - mus_back
    s_cav = _se(xx, yy, ac, bcf, bcb)  # (Z, Y, X)
    cavity = s_cav < 1
    k_d = int(np.clip(np.argmin(np.abs(zf - fr["dome_r"])), 0, grid.shape[0] - 1))
    ac_d = float(ac[k_d, 0, 0])
    fr.update(ac0=ac_d, b0=float(bcf[k_d, 0, 0]), bc_back=bcb, back_in=fr["by"] + b - 2 - fat,
              rib_band=((ac_d + 11.0) / ac_d) ** 2)
    ac0, b0 = fr["ac0"], fr["b0"]

    # diaphragm domes and lung apices as height maps (1, Y, X)
    recess = rng.uniform(45.0, 70.0)
    side_r = xx < 0
    xs = np.where(side_r, -0.45 * ac0, 0.45 * ac0)
    d2 = ((xx - xs) / (0.6 * ac0)) ** 2 + ((yy - 0.1 * b0) / (1.1 * b0)) ** 2
    dome = np.where(side_r, fr["dome_r"], fr["dome_l"]) - recess * d2  # (1, Y, X)
    fr["dome_low"] = float(fr["dome_l"] - recess)
    top = fr["apex_z"] - 60.0 * (((np.abs(xx) - 0.42 * ac0) / (0.5 * ac0)) ** 2
                                 + ((yy - 0.25 * b0) / b0) ** 2)
    chest = cavity & (z > dome)
    abdomen = cavity & (z <= dome - 5.0)
    labels[cavity & (z > top)] = Tissue.MUSCLE  # root of the neck
    labels[cavity & (z <= dome) & (z > dome - 5.0)] = Tissue.MUSCLE  # diaphragm

    # abdominal content: visceral fat with bowel loops and gas
    labels[abdomen] = Tissue.ABDOMINAL_FAT
    cells = tuple(max(3, int(n * s / 13.0)) for n, s in zip(grid.shape, grid.spacing, strict=True))
    n1 = smooth_noise(rng, grid.shape, cells)  # type: ignore[arg-type]
    bowel = abdomen & (n1 > rng.uniform(-0.35, 0.0))  # loops separated by mesenteric fat
    labels[bowel] = Tissue.BOWEL
    n2 = smooth_noise(rng, grid.shape, cells)  # type: ignore[arg-type]
    labels[bowel & (n1 > 1.1) & (n2 > 0.6)] = Tissue.GAS

    # spine geometry is needed by the mediastinum and kidneys
    sp = spine_geometry(grid, fr, rng)
    k_c = int(np.clip(np.argmin(np.abs(zf - fr["carina_z"])), 0, grid.shape[0] - 1))
    k_a = int(np.clip(np.argmin(np.abs(zf - (fr["crest_z"] + 60))), 0, grid.shape[0] - 1))
    fr.update(y_vb_chest=float(sp["y_vb"][k_c, 0, 0]), r_vb_chest=float(sp["ry"][k_c, 0, 0]),
              y_vb_abd=float(sp["y_vb"][k_a, 0, 0]), r_vb_abd=float(sp["ry"][k_a, 0, 0]))

    # heart, tilted so that the apex points left, anterior and down
    hs = (rng.uniform(45.0, 55.0), 0.5 * b0 * rng.uniform(0.9, 1.05),
          0.42 * ac0 * rng.uniform(0.9, 1.1))
    hc = (fr["dome_mid"] - 25.0 + 0.9 * hs[0], fr["by"] - 0.22 * b0, fr["bx"] + 0.15 * ac0)
    fr.update(heart_c=hc, heart_top=hc[0] + 0.85 * hs[0])
    fr["hilum_r"] = (fr["carina_z"] - 25.0, fr["by"] + 0.02 * b0, fr["bx"] - 0.3 * ac0)
    fr["hilum_l"] = (fr["carina_z"] - 18.0, fr["by"] + 0.05 * b0, fr["bx"] + 0.3 * ac0)
    xh = x - hc[2] + 0.35 * (z - hc[0])
    q_heart = ((z - hc[0]) / hs[0]) ** 2 + ((y - hc[1]) / hs[1]) ** 2 + (xh / hs[2]) ** 2
    tubes = great_vessels(fr, rng)
    pad = np.zeros(grid.shape, dtype=np.float32)
    for name in ("aorta", "pulmonary", "svc", "airway", "esophagus"):
        render_tubes(grid, tubes[name], pad, margin_mm=7.0)
    wm = np.interp(zf, [fr["dome_mid"], fr["carina_z"], fr["apex_z"]], [20.0, 26.0, 16.0])
    # keel-shaped band between the lungs: narrow behind the sternum, wide at the spine
    y_front = fr["by"] - bcf  # (Z, 1, 1)
    taper = np.clip((y - y_front) / np.maximum(sp["y_vb"] - y_front, 1.0), 0.0, 1.0)
    band = (np.abs(xx - 4.0) < wm[:, None, None] * (0.3 + 0.7 * taper ** 0.7)) & (
        y < sp["y_vb"])
    medi = chest & (band | (q_heart < 1.35) | (pad > 0.5))
    labels[chest & ~medi & (z <= top)] = Tissue.LUNG
    labels[medi] = Tissue.MEDIASTINAL_FAT
    labels[chest & (q_heart < 1.0)] = Tissue.HEART

    # abdominal organs
    def organ(centre: tuple[float, float, float], semi: tuple[float, float, float],
              wobble: float) -> np.ndarray:
        q = ellipsoid_q(grid, centre, semi)
        return (q + wobble * smooth_noise(rng, grid.shape, (4, 4, 4))) < 1.0

    liv = organ((fr["dome_r"] - 70.0, fr["by"] - 0.02 * b0, fr["bx"] - 0.3 * ac0),
                (85.0, 0.85 * b0, 0.7 * ac0), 0.25)
    liv &= abdomen & (xx / ac0 + 0.6 * yy / b0 < 0.3)  # left lobe only anteriorly
    liv &= ((xx / 48.0) ** 2 + ((y - sp["y_vb"]) / (sp["ry"] + 16.0)) ** 2) > 1.0  # spine, IVC
    labels[liv] = Tissue.LIVER
    sto_c = (fr["dome_l"] - 45.0, fr["by"] - 0.15 * b0, fr["bx"] + 0.3 * ac0)
    sto_s = (45.0, 0.32 * b0, 0.28 * ac0)
    sto = organ(sto_c, sto_s, 0.2) & abdomen
    labels[sto] = Tissue.STOMACH
    labels[sto & (y < sto_c[1] - 0.35 * sto_s[1])] = Tissue.GAS
    spl = organ((fr["dome_l"] - 55.0, fr["by"] + 0.5 * b0, fr["bx"] + 0.62 * ac0),
                (50.0, 0.3 * b0, 0.2 * ac0), 0.25) & abdomen
    labels[spl] = Tissue.SPLEEN
    kid_any = np.zeros(grid.shape, dtype=bool)
    for side, dz in ((-1.0, 0.0), (1.0, rng.uniform(8.0, 18.0))):
        kc = (fr["dome_r"] - 110.0 + dz, fr["y_vb_abd"] + 2.0, fr["bx"] + side * 0.44 * ac0)
        ks = (rng.uniform(45.0, 55.0), 25.0, 27.0)
        xk = x - kc[2] + side * 0.2 * (z - kc[0])
        qk = ((z - kc[0]) / ks[0]) ** 2 + ((y - kc[1]) / ks[1]) ** 2 + (xk / ks[2]) ** 2
        labels[abdomen & (qk < 1.6)] = Tissue.ABDOMINAL_FAT  # perirenal fat
        kid = abdomen & (qk < 1.0)
        labels[kid] = Tissue.KIDNEY
        xs_ = xk + side * 0.55 * ks[2]
        sinus = ((z - kc[0]) / (0.55 * ks[0])) ** 2 + ((y - kc[1]) / (0.45 * ks[1])) ** 2 + (
            xs_ / (0.45 * ks[2])) ** 2
        labels[kid & (sinus < 1.0)] = Tissue.ABDOMINAL_FAT
        kid_any |= kid & (sinus >= 1.0)
    # psoas muscles grow caudally below the kidneys' upper poles
    grow = np.clip((fr["dome_r"] - 70.0 - z) / 120.0, 0.0, 1.0)  # (Z, 1, 1)
    for side in (-1.0, 1.0):
        px = fr["bx"] + side * (sp["rx"] + 4.0 + 14.0 * grow)
        qp = ((x - px) / (6.0 + 14.0 * grow)) ** 2 + ((y - sp["y_vb"] + 4.0) / (
            8.0 + 10.0 * grow)) ** 2
        labels[abdomen & (grow > 0) & (qp < 1.0)] = Tissue.MUSCLE

    # vessels and airways (drawn last in soft tissue, never into the lungs or bone)
    for name, tissue in (("esophagus", Tissue.MUSCLE), ("aorta", Tissue.VESSEL),
                         ("pulmonary", Tissue.VESSEL), ("svc", Tissue.VESSEL)):
        occ = render_tubes(grid, tubes[name], np.zeros(grid.shape, dtype=np.float32))
        labels[(occ > 0.5) & cavity & (labels != Tissue.LUNG)] = tissue
    occ = render_tubes(grid, tubes["airway"], np.zeros(grid.shape, dtype=np.float32),
                       margin_mm=2.0)
    labels[(occ > 0.5) & cavity] = Tissue.MUSCLE  # airway wall
    occ = render_tubes(grid, tubes["airway"], np.zeros(grid.shape, dtype=np.float32))
    labels[(occ > 0.5) & cavity] = Tissue.AIRWAY

    # skeleton
    for side in (-1.0, 1.0):  # paraspinal muscles
        qm = ((x - fr["bx"] - side * (sp["rx"] + 14.0)) / 24.0) ** 2 + (
            (y - sp["y_vb"] - sp["ry"] - 24.0) / 24.0) ** 2
        labels[(qm < 1.0) & (labels != Tissue.AIR) & (labels != Tissue.SUBCUT_FAT)] = (
            Tissue.MUSCLE)
    vertebra = paint_spine(labels, grid, sp, fr, rng)
    labels[(labels == Tissue.LUNG) & (np.abs(xx) < sp["rx"] + 6.0)
           & (y > sp["y_vb"] - sp["ry"] - 6.0)] = Tissue.MEDIASTINAL_FAT  # paravertebral
    ribs = paint_ribs(labels, grid, fr, s_cav, rng)
    ilium = paint_pelvis(labels, grid, fr, sp, rng)

    _paint_table(labels, grid, fr["by"] + b.max(), rng)
    lung = labels == Tissue.LUNG
    vessel_frac = pulmonary_vessels(grid, lung, fr, rng)
    bone_lbl = (labels == Tissue.CANCELLOUS_BONE) | (labels == Tissue.CORTICAL_BONE)
    pelvic = z < fr["crest_z"]
    soft_cav = (labels == Tissue.ABDOMINAL_FAT) | (labels == Tissue.BOWEL)
    hosts = {
        "lung": lung,
        "liver": labels == Tissue.LIVER,
        "kidney": (labels == Tissue.KIDNEY) & kid_any,
        "bone": bone_lbl & (vertebra | ilium | ribs),
        "mediastinum": labels == Tissue.MEDIASTINAL_FAT,
        "abdomen": soft_cav & ~pelvic,
        "pelvis": soft_cav & pelvic & (np.abs(xx) < 0.45 * ac0),  # inside the iliac wings
        "soft_tissue": ((labels == Tissue.SUBCUT_FAT) | (labels == Tissue.MUSCLE)) & ~cavity,
    }
    marks = {k: float(fr[k]) for k in ("apex_z", "dome_r", "dome_l", "crest_z", "carina_z",
                                       "bx", "by")}
    return Anatomy(labels=labels, vessel_frac=vessel_frac, hosts=hosts, landmarks=marks)
