"""Bones of the phantom: vertebral column, ribs, costal cartilage, sternum and iliac wings."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlm.data.phantom_ct.geometry import Grid
from vlm.data.phantom_ct.tissues import Tissue


def spine_geometry(grid: Grid, frame: dict[str, Any], rng: np.random.Generator
                   ) -> dict[str, np.ndarray]:
    """Per-slice vertebral-body centre and radii (all (Z, 1, 1) float32 arrays, mm)."""
    z = grid.z
    zs = frame["z_ctrl"]
    r = np.interp(z.ravel(), zs, [22.0, 21.0, 19.0, 15.5, 14.0, 13.0, 12.0]).astype(np.float32)
    r *= rng.uniform(0.9, 1.1)
    rx = (r * 1.15)[:, None, None]
    ry = (r * 0.95)[:, None, None]
    y_vb = frame["back_in"] - ry - 38.0
    return {"rx": rx, "ry": ry, "y_vb": y_vb.astype(np.float32),
            "x_vb": np.full_like(rx, frame["bx"])}


def paint_spine(labels: np.ndarray, grid: Grid, sp: dict[str, np.ndarray], frame: dict[str, Any],
                rng: np.random.Generator) -> np.ndarray:
    """Vertebral bodies, discs, spinal canal and posterior elements. Returns the (Z, Y, X) mask
    of vertebral bodies (cancellous + cortical), the host for bone lesions in the spine."""
    z, y, x = grid.z, grid.y, grid.x
    dx_ = x - sp["x_vb"]  # (Z, 1, X)
    dy_ = y - sp["y_vb"]  # (Z, Y, 1)
    q = (dx_ / sp["rx"]) ** 2 + (dy_ / sp["ry"]) ** 2  # (Z, Y, X)
    pitch = rng.uniform(26.0, 31.0)
    phase = rng.uniform(0.0, pitch)
    u = ((z - phase) / pitch) % 1.0  # (Z, 1, 1) position within a motion segment
    disc = u < 0.2
    endplate = (u < 0.2 + 2.0 / pitch) | (u > 1.0 - 2.0 / pitch)
    body = q < 1.0
    shell = q > (1.0 - 3.0 / sp["rx"]) ** 2
    labels[body] = Tissue.CANCELLOUS_BONE
    labels[body & (shell | endplate)] = Tissue.CORTICAL_BONE
    labels[body & disc] = Tissue.DISC
    vertebra = body & ~disc
    # posterior elements: canal (CSF), lamina ring, spinous and transverse processes
    yc = sp["y_vb"] + sp["ry"] + 8.0  # (Z, 1, 1)
    rc2 = dx_ ** 2 + (y - yc) ** 2
    ring = (rc2 < 14.0 ** 2) & (y > yc - 6.0)
    spinous = (np.abs(dx_) < 4.0) & (y > yc) & (y < yc + 28.0)
    mid = np.abs(u - 0.6) < 0.15
    # transverse processes run laterally and backwards from the pedicles
    transverse = (np.abs(y - yc - 0.35 * (np.abs(dx_) - 10.0)) < 4.0) & (
        np.abs(dx_) > 8.0) & (np.abs(dx_) < 30.0) & mid
    labels[(ring | spinous | transverse) & ~disc & (labels != Tissue.AIR)] = Tissue.CORTICAL_BONE
    labels[rc2 < 7.5 ** 2] = Tissue.CSF
    return vertebra


def paint_ribs(labels: np.ndarray, grid: Grid, frame: dict[str, Any], s_cav: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Ribs (sloping bands just outside the pleura), costal cartilage and sternum.

    Args:
        s_cav: (Z, Y, X) superellipse value of the chest cavity (< 1 inside).

    Returns:
        (Z, Y, X) bool mask of the ribs and sternum.
    """
    z, y, x = grid.z, grid.y, grid.x
    xx = x - frame["bx"]
    yy = y - frame["by"]
    theta = np.arctan2(yy, xx)  # (1, Y, X): +pi/2 posterior, -pi/2 anterior
    from_back = np.abs(np.angle(np.exp(1j * (theta - np.pi / 2))))  # 0 at the back, pi front
    post = 1.0 - from_back / np.pi  # 1 at the back, 0 at the front, linear in angle
    pitch = rng.uniform(26.0, 32.0)
    drop = rng.uniform(55.0, 80.0)  # ribs descend from the spine to the front
    phase = rng.uniform(0.0, pitch)
    zr = (z - phase + drop * (1.0 - post)) / pitch  # (Z, Y, X)
    v = np.abs((zr % 1.0) - 0.5) * pitch  # mm from the rib's centre line
    band = (s_cav >= 1.0) & (s_cav < frame["rib_band"])
    chest = (z > frame["dome_low"] - 30.0) & (z < frame["apex_z"] + 5.0)
    lateral = np.abs(xx) > 26.0  # no ribs over the spine or the sternum
    rib = band & chest & (v < 5.0) & lateral
    front = post < 0.22
    core = rib & (v < 2.2) & (s_cav > 1.02) & (s_cav < frame["rib_band"] - 0.02)
    labels[rib] = Tissue.CORTICAL_BONE
    labels[core] = Tissue.CANCELLOUS_BONE
    labels[rib & front & (np.abs(xx) < 70.0)] = Tissue.CARTILAGE
    # sternum: anterior midline plate
    ster = (np.abs(xx) < 16.0) & band & (yy < 0) & chest & (z < frame["apex_z"] - 20.0) & (
        z > frame["dome_mid"] - 10.0)
    labels[ster] = Tissue.CORTICAL_BONE
    labels[ster & (s_cav > 1.03) & (s_cav < frame["rib_band"] - 0.03) & (
        np.abs(xx) < 11.0)] = Tissue.CANCELLOUS_BONE
    return rib | ster


def paint_pelvis(labels: np.ndarray, grid: Grid, frame: dict[str, Any], sp: dict[str, np.ndarray],
                 rng: np.random.Generator) -> np.ndarray:
    """Iliac wings below the iliac crest (curved plates from the sacrum sweeping laterally).

    Returns:
        (Z, Y, X) bool mask of the iliac bones.
    """
    z, y, x = grid.z, grid.y, grid.x
    crest = frame["crest_z"]
    below = np.clip((crest - z) / 60.0, 0.0, 1.0)  # (Z, 1, 1): 0 at the crest
    inside = z < crest
    out = np.zeros(labels.shape, dtype=bool)
    if not inside.any():
        return out
    ac = frame["ac0"]
    thick = rng.uniform(7.0, 10.0)
    for side in (-1.0, 1.0):
        cx = frame["bx"] + side * (0.12 * ac - 10.0 * below)
        cy = sp["y_vb"] - 4.0
        rx = 0.62 * ac + 8.0 * below
        ry = 0.5 * frame["b0"]
        r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)  # (Z, Y, X)
        ang = np.arctan2(y - cy, side * (x - cx))  # 0 lateral, +pi/2 posterior
        wing = (np.abs(r - 1.0) * rx < thick / 2) & (ang > -0.5) & (ang < 1.75) & inside
        core = (np.abs(r - 1.0) * rx < thick / 2 - 2.5) & wing
        sel = wing & (labels != Tissue.AIR)
        labels[sel] = Tissue.CORTICAL_BONE
        labels[core & sel] = Tissue.CANCELLOUS_BONE
        out |= sel
    return out
