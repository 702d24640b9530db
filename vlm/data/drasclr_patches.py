"""DrasCLR inputs: CT preprocessing, the anatomical patch grid, patch extraction, augmentations.

Without atlas registration RadLens takes the anatomical frame from:

* PhantomCT: the manifest's ``body_frame`` (known anatomy; see
  :mod:`vlm.data.phantom_ct.coords`: z from the lung apex/base, y/x from the body edges).
* Real CT: :func:`bbox_frame`, coordinates normalised inside the body's bounding box
  (HU > -500) on every axis. This is coarser than registration: subjects of different build
  map the same organ to somewhat different coordinates.

Two grids: :func:`patch_grid` is the official voxel grid (patch 32, step 26) for volumes that
share an atlas space; :func:`lattice_grid` puts patches at fixed frame coordinates, so that a
location id means the same anatomy in unregistered subjects (PhantomCT, real CT).

Augmentations are plain tensor functions on preprocessed patches (values in [-1, 1]) that take
a ``torch.Generator``; their defaults follow the official MONAI pipeline ("agc": RandAffine,
RandGaussianNoise std 50 HU p 0.25, RandAdjustContrast p 0.25).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm.data.phantom_ct.coords import from_body_frame, patch_centres, to_body_frame

HU_MIN, HU_MAX = -1024.0, 240.0


def preprocess_hu(hu: torch.Tensor, hu_min: float = HU_MIN, hu_max: float = HU_MAX
                  ) -> torch.Tensor:
    """HU clipped to [hu_min, hu_max] and scaled linearly to [-1, 1]."""
    x = hu.float().clamp(hu_min, hu_max)
    return 2.0 * (x - hu_min) / (hu_max - hu_min) - 1.0


def bbox_frame(hu: np.ndarray, threshold: float = -500.0) -> dict[str, Any]:
    """A body frame for real CT: the body's bounding box (voxels > threshold HU) -> [-1, 1]^3."""
    body = hu > threshold
    if not body.any():
        raise ValueError(f"no voxel above {threshold} HU: not a CT volume in HU?")
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(body.any(axis=other))
        lo.append(float(idx[0]))
        hi.append(float(idx[-1]))
    return {"axes": "kji", "lo": lo, "hi": hi,
            "definition": f"body bounding box (HU > {threshold:g}) on every axis"}


@dataclass
class PatchGrid:
    """The patches of one subject. ``location`` ids are what the per-location queues and the
    location-wise features are keyed by; they mean the same anatomy in every subject."""

    location: np.ndarray  # (N,) location ids (index into the full grid / lattice)
    centres: np.ndarray  # (N, 3) voxel centres (k, j, i)
    coords: np.ndarray  # (N, 3) anatomical coordinates (z, y, x) in [-1, 1], float32
    neighbours: np.ndarray  # (N, n) row indices of the nearest other patches (atlas distance)

    def __len__(self) -> int:
        return int(self.centres.shape[0])


def nearest_neighbours(points: np.ndarray, n: int = 2) -> np.ndarray:
    """(N, 3) -> (N, n) indices of the n nearest other points (ties: lower index first)."""
    if points.shape[0] <= n:
        raise ValueError(f"{points.shape[0]} patches cannot have {n} neighbours each")
    d = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)  # (N, N)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :n]


def _select(shape: tuple[int, int, int], centres: np.ndarray, keep: np.ndarray | None
            ) -> np.ndarray:
    """Bool (N,): centre inside the volume and (if given) inside the ``keep`` mask."""
    idx = np.round(centres).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
    if keep is not None:
        inside = np.zeros(len(idx), dtype=bool)
        inside[ok] = keep[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        ok = inside
    return ok


def patch_grid(shape: tuple[int, int, int], frame: Mapping[str, Any], patch: int = 32,
               step: int = 26, keep: np.ndarray | None = None,
               n_neighbours: int = 2) -> PatchGrid:
    """The official voxel grid: patches of side ``patch`` every ``step`` voxels over ``shape``.

    Location ids are grid indices, so they agree across subjects only when volumes share one
    atlas space (registered, same shape); otherwise use :func:`lattice_grid`.

    Args:
        frame: a PhantomCT ``body_frame`` or :func:`bbox_frame` of the volume.
        keep: optional (Z, Y, X) bool mask (e.g. the lung); only patches whose centre voxel
            lies in it are kept.
    """
    centres = patch_centres(shape, patch, step)  # (L, 3)
    ok = _select(shape, centres, keep)
    centres = centres[ok]
    coords = to_body_frame(centres, frame).astype(np.float32)
    return PatchGrid(np.flatnonzero(ok), centres, coords,
                     nearest_neighbours(centres, n_neighbours))


def anatomical_lattice(steps: tuple[int, int, int] = (9, 9, 9)) -> np.ndarray:
    """(L, 3) cell centres of a regular (z, y, x) lattice over the frame cube [-1, 1]^3."""
    axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in steps]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def lattice_grid(shape: tuple[int, int, int], frame: Mapping[str, Any], lattice: np.ndarray,
                 keep: np.ndarray | None = None, n_neighbours: int = 2) -> PatchGrid:
    """Patches at fixed anatomical coordinates (no registration): the stand-in for the atlas.

    Each lattice point (from :func:`anatomical_lattice`) is mapped into this subject's voxels
    through its frame; points outside the volume (or ``keep``) are dropped. Location ids are
    lattice indices and mean the same anatomy in every subject; neighbours are nearest in
    lattice coordinates among the kept points.
    """
    centres = from_body_frame(lattice, frame)  # (L, 3) (k, j, i)
    ok = _select(shape, centres, keep)
    coords = lattice[ok].astype(np.float32)
    return PatchGrid(np.flatnonzero(ok), centres[ok], coords,
                     nearest_neighbours(coords, n_neighbours))


def extract_patches(volume: torch.Tensor, centres: np.ndarray, patch: int = 32,
                    fill: float = -1.0) -> torch.Tensor:
    """Cubes (N, 1, P, P, P) around centres (N, 3) of a (Z, Y, X) volume, ``fill`` outside."""
    pad = patch
    vol = F.pad(volume[None, None], (pad,) * 6, value=fill)[0, 0]
    starts = np.round(centres - (patch - 1) / 2.0).astype(int) + pad
    out = [vol[k: k + patch, j: j + patch, i: i + patch] for k, j, i in starts]
    return torch.stack(out)[:, None]


# --------------------------------------------------------------------------- augmentations

def random_affine(x: torch.Tensor, generator: torch.Generator | None = None,
                  degrees: float = 10.0, scale: float = 0.1,
                  translate: float = 12.0) -> torch.Tensor:
    """Per-sample random affine of (B, C, D, H, W), as MONAI ``RandAffine`` in the official code.

    Rotation U(-degrees, degrees) about each axis, per-axis scale 1 + U(-scale, scale), shift
    U(-translate, translate) voxels per axis; bilinear, border values repeated.
    """
    b = x.shape[0]
    ang = (torch.rand(b, 3, generator=generator) * 2 - 1) * math.radians(degrees)
    s = 1.0 + (torch.rand(b, 3, generator=generator) * 2 - 1) * scale  # (B, 3)
    size = torch.tensor([x.shape[-1], x.shape[-2], x.shape[-3]], dtype=torch.float32)  # x y z
    t = (torch.rand(b, 3, generator=generator) * 2 - 1) * translate * 2 / size  # grid units
    c, sn = torch.cos(ang), torch.sin(ang)
    one, zero = torch.ones(b), torch.zeros(b)
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -sn[:, 0], zero, sn[:, 0], c[:, 0]], 1)
    ry = torch.stack([c[:, 1], zero, sn[:, 1], zero, one, zero, -sn[:, 1], zero, c[:, 1]], 1)
    rz = torch.stack([c[:, 2], -sn[:, 2], zero, sn[:, 2], c[:, 2], zero, zero, zero, one], 1)
    rot = rz.view(b, 3, 3) @ ry.view(b, 3, 3) @ rx.view(b, 3, 3)
    theta = torch.cat([rot / s[:, None, :], t[:, :, None]], dim=2).to(x)  # (B, 3, 4)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_noise(x: torch.Tensor, generator: torch.Generator | None = None,
                   std_hu: float = 50.0, p: float = 0.25, hu_min: float = HU_MIN,
                   hu_max: float = HU_MAX) -> torch.Tensor:
    """With probability p per sample add N(0, std_hu) noise, expressed in the [-1, 1] scale."""
    b = x.shape[0]
    apply = (torch.rand(b, generator=generator) < p).to(x).view(b, *([1] * (x.ndim - 1)))
    std = 2.0 * std_hu / (hu_max - hu_min)
    noise = torch.randn(x.shape, generator=generator).to(x) * std
    return (x + apply * noise).clamp(-1.0, 1.0)


def random_contrast(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.25,
                    gamma: tuple[float, float] = (0.5, 4.5)) -> torch.Tensor:
    """With probability p per sample apply a gamma curve between the sample's min and max.

    x' = ((x - min) / (max - min)) ** g * (max - min) + min, g ~ U(gamma) (MONAI
    ``RandAdjustContrast`` defaults, as the official code).
    """
    b = x.shape[0]
    shape = (b, *([1] * (x.ndim - 1)))
    apply = (torch.rand(b, generator=generator) < p).view(shape)
    g = (gamma[0] + (gamma[1] - gamma[0]) * torch.rand(b, generator=generator)).view(shape)
    dims = tuple(range(1, x.ndim))
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    rng = (hi - lo).clamp_min(1e-7)
    y = ((x - lo) / rng).clamp(0.0, 1.0) ** g.to(x) * rng + lo
    return torch.where(apply, y, x)


def augment(x: torch.Tensor, generator: torch.Generator | None = None, noise_std_hu: float = 50.0,
            noise_p: float = 0.25, contrast_p: float = 0.25, degrees: float = 10.0,
            scale: float = 0.1, translate: float = 12.0) -> torch.Tensor:
    """DrasCLR augmentation ("agc"): random affine, Gaussian noise, contrast."""
    x = random_affine(x, generator, degrees, scale, translate)
    x = gaussian_noise(x, generator, noise_std_hu, noise_p)
    return random_contrast(x, generator, contrast_p)
