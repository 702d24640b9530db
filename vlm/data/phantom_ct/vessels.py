"""Tubular structures: great vessels, airways and the branching pulmonary vessel trees."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlm.data.phantom_ct.geometry import Grid, polyline, render_tubes

Segment = tuple[np.ndarray, np.ndarray, float, float]


def great_vessels(fr: dict[str, Any], rng: np.random.Generator) -> dict[str, list[Segment]]:
    """Centre lines (z, y, x mm) of the aorta, pulmonary arteries, SVC, trachea and bronchi."""
    bx, hy, hx = fr["bx"], fr["heart_c"][1], fr["heart_c"][2]
    top = fr["heart_top"]
    y_ant = fr["y_vb_chest"] - fr["r_vb_chest"]  # anterior surface of the thoracic spine
    arch = fr["carina_z"] + rng.uniform(15.0, 30.0)
    ra = rng.uniform(12.0, 15.0)
    aorta = polyline(
        [(top - 10.0, hy - 10.0, bx - 8.0), (arch - 12.0, hy - 18.0, bx - 12.0),
         (arch, 0.5 * (hy - 18.0 + y_ant - 12.0), bx + 2.0),
         (arch - 14.0, y_ant - 12.0, bx + 20.0), (fr["dome_mid"], y_ant - 10.0, bx + 16.0),
         (fr["crest_z"] + 15.0, fr["y_vb_abd"] - fr["r_vb_abd"] - 9.0, bx + 6.0)],
        [ra, ra - 1.0, ra - 1.5, ra - 2.0, ra - 3.0, ra - 4.0])
    bif = aorta[-1][1]
    # supra-aortic branches: brachiocephalic trunk, left common carotid, left subclavian
    arch_y = 0.5 * (hy - 18.0 + y_ant - 12.0)
    for dxb, dyb, rb in ((-10.0, -8.0, 6.5), (4.0, 0.0, 4.5), (16.0, 8.0, 5.0)):
        aorta += polyline([(arch, arch_y + dyb, bx + dxb),
                           (fr["z_top"] + 10.0, arch_y + dyb - 4.0, bx + 2.2 * dxb - 6.0)],
                          [rb, rb - 0.5])
    for side in (-1.0, 1.0):
        aorta += polyline([tuple(bif), (bif[0] - 50.0, bif[1] - 5.0, bx + side * 45.0),
                           (bif[0] - 120.0, bif[1] + 5.0, bx + side * 70.0)], [6.5, 6.0, 5.5])
    hil_r, hil_l = fr["hilum_r"], fr["hilum_l"]
    pt = (fr["carina_z"] - 18.0, hy - 10.0, bx + 22.0)
    pulm = polyline([(top - 15.0, hy - 25.0, hx + 10.0), pt], [13.0, 12.0])
    pulm += polyline([pt, hil_l], [11.0, 9.0])
    pulm += polyline([pt, (pt[0] - 4.0, hy + 5.0, bx), hil_r], [10.0, 10.0, 9.0])
    svc = polyline([(fr["apex_z"] - 30.0, hy - 15.0, bx - 32.0), (top - 5.0, hy - 10.0, bx - 30.0)],
                   [9.0, 10.0])
    y_tr = y_ant - 22.0
    trachea = polyline([(fr["z_top"] + 10.0, y_tr - 4.0, bx), (fr["carina_z"], y_tr, bx)],
                       [8.5, 8.5])
    bronchi = polyline([(fr["carina_z"], y_tr, bx), hil_r], [6.5, 5.5])
    bronchi += polyline([(fr["carina_z"], y_tr, bx), hil_l], [6.0, 5.0])
    esophagus = polyline([(fr["z_top"] + 10.0, y_tr + 14.0, bx + 4.0),
                          (fr["carina_z"] - 40.0, y_ant - 6.0, bx + 6.0),
                          (fr["dome_mid"] - 15.0, y_ant - 30.0, bx + 25.0)], [6.0, 6.0, 6.0])
    return {"aorta": aorta, "pulmonary": pulm, "svc": svc, "airway": trachea + bronchi,
            "esophagus": esophagus}


def _rotate_towards(d: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate unit vector ``d`` by ``angle`` about a random axis perpendicular to it."""
    a = rng.standard_normal(3)
    a -= (a @ d) * d
    a /= np.linalg.norm(a) + 1e-9
    return np.cos(angle) * d + np.sin(angle) * a


def lung_vessel_tree(grid: Grid, lung: np.ndarray, hilum: tuple[float, float, float],
                     trunks: list[np.ndarray], rng: np.random.Generator,
                     r0: float = 4.5) -> list[Segment]:
    """A random bifurcating tree from ``hilum`` that stays inside ``lung``; radii taper from
    ``r0`` to sub-millimetre at the periphery."""
    segs: list[Segment] = []
    shape = np.asarray(grid.shape)

    def inside(p: np.ndarray) -> bool:
        idx = np.rint(grid.to_index(p)).astype(int)
        return bool(np.all(idx >= 0) and np.all(idx < shape) and lung[tuple(idx)])

    stack = [(np.asarray(hilum, dtype=np.float64), d / np.linalg.norm(d), r0, 34.0, 0)
             for d in trunks]
    while stack:
        p, d, r, length, depth = stack.pop()
        q = None
        for scale in (1.0, 0.6, 0.35):
            cand = p + d * length * scale
            if depth == 0 or inside(cand):
                q = cand
                length *= scale
                break
        if q is None:
            continue
        r_end = r * 0.92
        segs.append((p, q, r, r_end))
        if r_end < 0.5 or depth >= 11:
            continue
        for _ in range(2):
            nd = _rotate_towards(d, rng.uniform(0.3, 0.75), rng)
            stack.append((q, nd / np.linalg.norm(nd), r_end * rng.uniform(0.78, 0.9),
                          max(length * rng.uniform(0.75, 0.9), 7.0), depth + 1))
    return segs


def pulmonary_vessels(grid: Grid, lung: np.ndarray, fr: dict[str, Any],
                      rng: np.random.Generator) -> np.ndarray:
    """(Z, Y, X) float32 partial-volume occupancy of the pulmonary vessels inside the lungs."""
    frac = np.zeros(grid.shape, dtype=np.float32)
    for side, hil in ((-1.0, fr["hilum_r"]), (1.0, fr["hilum_l"])):
        trunks = [np.array([0.9, 0.1, side * 0.5]), np.array([0.6, 0.5, side * 0.4]),
                  np.array([0.5, -0.5, side * 0.5]), np.array([0.2, -0.6, side * 0.8]),
                  np.array([0.0, 0.3, side * 1.0]), np.array([-0.2, 0.7, side * 0.5]),
                  np.array([-0.9, 0.5, side * 0.3]), np.array([-0.8, -0.3, side * 0.5]),
                  np.array([-0.6, 0.1, side * 0.9])]
        trunks = [t + 0.2 * rng.standard_normal(3) for t in trunks]
        segs = lung_vessel_tree(grid, lung, hil, trunks, rng)
        render_tubes(grid, segs, frac)
    p0, p1, r0, r1 = peripheral_twigs(grid, lung, fr, rng)
    render_tubes(grid, [(p0[m], p1[m], float(r0[m]), float(r1[m])) for m in range(len(p0))],
                 frac)
    frac *= lung
    return frac


def peripheral_twigs(grid: Grid, lung: np.ndarray, fr: dict[str, Any],
                     rng: np.random.Generator, per_litre: float = 450.0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Short thin vessel segments scattered through the lungs, pointing away from the hila.

    In an axial slice peripheral vessels show as dots and short lines; scattering them is far
    cheaper than growing the tree to its last generations.

    Returns:
        p0, p1 (N, 3) end points (z, y, x) mm and radii r0, r1 (N,) mm.
    """
    idx = np.flatnonzero(lung)
    litres = idx.size * float(np.prod(grid.spacing)) / 1e6
    n = int(per_litre * litres)
    if n == 0:
        e = np.zeros((0, 3))
        return e, e, np.zeros(0), np.zeros(0)
    pick = np.unravel_index(rng.choice(idx, size=n), lung.shape)
    p0 = grid.to_mm(np.stack(pick, axis=1) + rng.uniform(-0.5, 0.5, size=(n, 3)))
    hil = np.where((p0[:, 2] < fr["bx"])[:, None], np.asarray(fr["hilum_r"]),
                   np.asarray(fr["hilum_l"]))
    d = p0 - hil
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    d += 0.35 * rng.standard_normal((n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    dist = np.linalg.norm(p0 - hil, axis=1)
    r0 = np.clip(2.2 - dist / 70.0, 0.5, 1.8) * rng.uniform(0.8, 1.2, size=n)
    length = rng.uniform(6.0, 16.0, size=n)
    p1 = p0 + d * length[:, None]
    return p0, p1, r0, 0.7 * r0
