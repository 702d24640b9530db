"""Voxel grid, smooth random fields and tube rasterisation for the PhantomCT generator.

World coordinates are DICOM patient LPS millimetres: x grows to the patient's left, y grows
posteriorly, z grows superiorly. Array index order is (k, j, i) = (z, y, x), k = 0 is the most
inferior slice, so a standard axial series (ImageOrientationPatient [1,0,0,0,1,0]) needs no flips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Default physical field of view (z, y, x) in mm: chest, abdomen and upper pelvis.
DEFAULT_FOV_MM: tuple[float, float, float] = (480.0, 350.0, 350.0)


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid in LPS millimetres.

    Attributes:
        shape: (Z, Y, X) voxels.
        spacing: (dz, dy, dx) in mm (rounded to 4 decimals so DICOM DS strings stay short).
        origin: LPS (x, y, z) of voxel (0, 0, 0) in mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def z(self) -> np.ndarray:
        """(Z, 1, 1) slice positions in mm."""
        return (self.origin[2] + np.arange(self.shape[0]) * self.spacing[0]).astype(
            np.float32)[:, None, None]

    @property
    def y(self) -> np.ndarray:
        """(1, Y, 1) row positions in mm."""
        return (self.origin[1] + np.arange(self.shape[1]) * self.spacing[1]).astype(
            np.float32)[None, :, None]

    @property
    def x(self) -> np.ndarray:
        """(1, 1, X) column positions in mm."""
        return (self.origin[0] + np.arange(self.shape[2]) * self.spacing[2]).astype(
            np.float32)[None, None, :]

    @property
    def voxel_mm(self) -> float:
        """Geometric-mean voxel size in mm."""
        dz, dy, dx = self.spacing
        return float((dz * dy * dx) ** (1.0 / 3.0))

    def lps_affine(self) -> np.ndarray:
        """4x4 affine mapping (k, j, i, 1) to LPS (x, y, z, 1) mm."""
        dz, dy, dx = self.spacing
        x0, y0, z0 = self.origin
        return np.array([[0.0, 0.0, dx, x0],
                         [0.0, dy, 0.0, y0],
                         [dz, 0.0, 0.0, z0],
                         [0.0, 0.0, 0.0, 1.0]])

    def to_index(self, zyx_mm: np.ndarray) -> np.ndarray:
        """(..., 3) (z, y, x) mm -> (..., 3) fractional (k, j, i) indices."""
        p = np.asarray(zyx_mm, dtype=np.float64)
        o = np.array([self.origin[2], self.origin[1], self.origin[0]])
        return (p - o) / np.asarray(self.spacing)

    def to_mm(self, kji: np.ndarray) -> np.ndarray:
        """(..., 3) (k, j, i) indices -> (..., 3) (z, y, x) mm."""
        o = np.array([self.origin[2], self.origin[1], self.origin[0]])
        return np.asarray(kji, dtype=np.float64) * np.asarray(self.spacing) + o


def make_grid(shape: tuple[int, int, int],
              fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM) -> Grid:
    """Grid whose spacing follows from ``shape`` and the physical field of view.

    The axial plane is centred on the scanner axis (x = y = 0); z starts at 0 at the bottom slice.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (Z, Y, X) with every side >= 8, got {shape}")
    spacing = tuple(round(f / n, 4) for f, n in zip(fov_mm, shape, strict=True))
    dz, dy, dx = spacing
    origin = (round(-(shape[2] - 1) / 2 * dx, 4), round(-(shape[1] - 1) / 2 * dy, 4), 0.0)
    return Grid(shape=(int(shape[0]), int(shape[1]), int(shape[2])),
                spacing=(dz, dy, dx), origin=origin)


def _basis(n: int, cells: int) -> np.ndarray:
    """(n, cells) Gaussian radial basis along one axis."""
    centres = np.linspace(-0.5, n - 0.5, cells)
    width = max(n / max(cells - 1, 1), 1.0)
    t = (np.arange(n)[:, None] - centres[None, :]) / width
    return np.exp(-0.5 * t * t).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int],
                 cells: tuple[int, int, int]) -> np.ndarray:
    """Smooth random field, roughly zero mean and unit variance.

    A tensor product of Gaussian bases over a coarse random lattice of ``cells`` nodes; costs
    three small matrix products instead of an interpolation of the full volume.

    Returns:
        (Z, Y, X) float32.
    """
    g = rng.standard_normal(cells).astype(np.float32)  # (cz, cy, cx)
    bz, by, bx = (_basis(n, c) for n, c in zip(shape, cells, strict=True))
    t = np.tensordot(bz, g, axes=(1, 0))  # (Z, cy, cx)
    t = np.tensordot(t, by, axes=(1, 1))  # (Z, cx, Y)
    t = np.tensordot(t, bx, axes=(1, 1))  # (Z, Y, X)
    std = float(t.std())
    return (t - t.mean()) / (std if std > 0 else 1.0)


def ellipsoid_q(grid: Grid, centre: tuple[float, float, float],
                semi: tuple[float, float, float]) -> np.ndarray:
    """Squared normalised ellipsoid radius over the whole grid (< 1 inside).

    Args:
        centre: (z, y, x) mm. semi: (sz, sy, sx) semi-axes in mm.

    Returns:
        (Z, Y, X) float32.
    """
    cz, cy, cx = centre
    sz, sy, sx = semi
    return (((grid.z - cz) / sz) ** 2 + ((grid.y - cy) / sy) ** 2
            + ((grid.x - cx) / sx) ** 2).astype(np.float32)


def render_tubes(grid: Grid, segments: list[tuple[np.ndarray, np.ndarray, float, float]],
                 out: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
    """Max-accumulate partial-volume occupancy of tapered tubes into ``out``.

    Args:
        segments: (p0, p1, r0, r1): end points as (z, y, x) mm and radii in mm.
        out: (Z, Y, X) float32 occupancy in [0, 1], updated in place.
        margin_mm: added to every radius (used to build padded regions).

    Returns:
        ``out``.
    """
    spacing = np.asarray(grid.spacing)
    soft = 0.5 * grid.voxel_mm
    for p0, p1, r0, r1 in segments:
        p0 = np.asarray(p0, dtype=np.float64)
        p1 = np.asarray(p1, dtype=np.float64)
        rmax = max(r0, r1) + margin_mm + soft
        lo = np.floor(grid.to_index(np.minimum(p0, p1) - rmax)).astype(int)
        hi = np.ceil(grid.to_index(np.maximum(p0, p1) + rmax)).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.asarray(grid.shape))
        if np.any(hi <= lo):
            continue
        zz = (grid.origin[2] + np.arange(lo[0], hi[0]) * spacing[0])[:, None, None] - p0[0]
        yy = (grid.origin[1] + np.arange(lo[1], hi[1]) * spacing[1])[None, :, None] - p0[1]
        xx = (grid.origin[0] + np.arange(lo[2], hi[2]) * spacing[2])[None, None, :] - p0[2]
        d = p1 - p0
        dd = float(d @ d)
        t = (zz * d[0] + yy * d[1] + xx * d[2]) / dd if dd > 0 else np.zeros((1, 1, 1))
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt((zz - t * d[0]) ** 2 + (yy - t * d[1]) ** 2 + (xx - t * d[2]) ** 2)
        r = r0 + t * (r1 - r0) + margin_mm
        frac = np.clip((r - dist) / (2 * soft) + 0.5, 0.0, 1.0).astype(np.float32)
        view = out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(view, frac, out=view)
    return out


def polyline(points: list[tuple[float, float, float]], radii: list[float]
             ) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Segments of a tube through ``points`` ((z, y, x) mm) with a radius per point."""
    pts = [np.asarray(p, dtype=np.float64) for p in points]
    return [(pts[n], pts[n + 1], radii[n], radii[n + 1]) for n in range(len(pts) - 1)]
