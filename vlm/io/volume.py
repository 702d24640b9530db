"""DICOM series and NIfTI -> :class:`Volume` on one canonical grid.

Canonical grid: array (Z, Y, X) whose indices (k, j, i) increase towards patient superior,
posterior and left (the DICOM LPS axes), so a volume from a DICOM series and the same volume
from NIfTI come out identical, whatever orientation either file was stored in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vlm.errors import ImageReadError, SeriesError
from vlm.io.deid import Pseudonymizer
from vlm.io.types import ImageData, ImageMeta, Volume

logger = logging.getLogger(__name__)

# (array axis -> (world axis, direction)) for the canonical grid: k->S(z), j->P(y), i->L(x).
_CANONICAL = np.array([[2, 1], [1, 1], [0, 1]], dtype=float)
ORIENTATION_TOLERANCE = 1e-3
GAP_TOLERANCE = 0.2  # relative deviation of a slice step from the median step


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient (array, affine: index -> LPS mm) to the canonical (S, P, L) grid."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    start = io_orientation(affine)
    transform = ornt_transform(start, _CANONICAL)
    out = apply_orientation(array, transform)
    new_affine = affine @ inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out, dtype=np.float32), new_affine


def _series_files(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
                  ) -> list[Path]:
    if isinstance(source, str | os.PathLike):
        root = Path(source)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file()
                           and not p.name.startswith(".") and p.name != "DICOMDIR")
            if not files:
                raise SeriesError(root, "folder holds no files")
            return files
        return [root]
    return [Path(p) for p in source]


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def read_series(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                pseudonymizer: Pseudonymizer | None = None, keep_identifiers: bool = False
                ) -> Volume:
    """Assemble one DICOM series (a folder or a list of slice files) into a volume.

    Slices are sorted along the slice normal (cross product of the orientation cosines) by
    ImagePositionPatient; the slice spacing comes from the positions, not SliceThickness.
    Each slice gets its own modality LUT (rescale may differ per slice).

    Raises:
        SeriesError: mixed series, differing orientation or size, duplicate positions,
            missing slices (a gap in the positions) or non-uniform spacing.
        ImageReadError: a slice that cannot be read.
    """
    from vlm.io.dicom import INVALID_PIXEL_SPACING, read_dicom

    files = _series_files(source)
    where = Path(os.path.commonpath([str(f) for f in files])) if len(files) > 1 else files[0]
    images: list[ImageData] = [read_dicom(f, pseudonymizer=pseudonymizer,
                                          keep_identifiers=keep_identifiers) for f in files]
    if len(images) == 1 and images[0].meta.frames > 1:
        raise SeriesError(where, "a single multi-frame file: read it with read_image; "
                                 "enhanced multi-frame volumes are not assembled yet")
    series = {im.meta.series_pseudonym for im in images}
    if len(series) > 1:
        raise SeriesError(where, f"mixed series: the files belong to {len(series)} different "
                                 "series; pass one series at a time")
    shapes = {im.pixels.shape for im in images}
    if len(shapes) > 1 or images[0].meta.is_color:
        raise SeriesError(where, f"slices differ in size or are not grayscale: {sorted(shapes)}")
    orientations = [im.meta.image_orientation for im in images]
    positions = [im.meta.image_position for im in images]
    if any(o is None for o in orientations) or any(p is None for p in positions):
        raise SeriesError(where, "slices lack ImageOrientationPatient/ImagePositionPatient, "
                                 "so their order in space is unknown")
    iop = np.asarray(orientations, dtype=np.float64)  # (N, 6)
    ipp = np.asarray(positions, dtype=np.float64)  # (N, 3)
    for name, values in (("ImageOrientationPatient", iop), ("ImagePositionPatient", ipp)):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
            raise SeriesError(files[int(bad[0])], f"{name} is not finite (NaN or infinite) "
                                                  f"in {bad.size} of {len(images)} slices")
    if np.abs(iop - iop[0]).max() > ORIENTATION_TOLERANCE:
        raise SeriesError(where, "inconsistent orientation: slices have different "
                                 "ImageOrientationPatient values")
    row_dir, col_dir = _unit(iop[0, :3]), _unit(iop[0, 3:])
    normal = _unit(np.cross(row_dir, col_dir))
    if np.linalg.norm(normal) < 0.5:  # a zero cosine, or row and column parallel
        raise SeriesError(where, "ImageOrientationPatient has a zero or parallel row and "
                                 "column direction, so the slice plane is unknown")
    for f, im in zip(files, images, strict=True):
        if im.meta.spacing_source == INVALID_PIXEL_SPACING:
            raise SeriesError(f, "PixelSpacing is zero, negative or not finite; the voxel size "
                                 "is unknown")
    dist = ipp @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    meta0 = images[order[0]].meta
    spacing_rc = meta0.pixel_spacing or (1.0, 1.0)
    if meta0.pixel_spacing is None:
        logger.warning("%s: no PixelSpacing; assuming 1 mm pixels", where)
    if len(images) > 1:
        steps = np.diff(dist)
        if np.any(steps < 1e-3):
            raise SeriesError(where, "two or more slices share the same position")
        step = float(np.median(steps))
        worst = int(np.argmax(np.abs(steps - step)))
        if abs(steps[worst] - step) > GAP_TOLERANCE * step:
            if steps[worst] > step:
                missing = round(steps[worst] / step) - 1
                raise SeriesError(where, f"missing slice(s): a gap of {steps[worst]:.2f} mm after "
                                         f"slice {worst + 1} of {len(images)} where the spacing is "
                                         f"{step:.2f} mm (about {max(missing, 1)} missing)")
            raise SeriesError(where, f"non-uniform slice spacing ({steps.min():.2f} to "
                                     f"{steps.max():.2f} mm)")
        in_plane = ipp[order] - np.outer(dist, normal)
        if np.abs(in_plane - in_plane[0]).max() > 0.5 * max(spacing_rc):
            logger.debug("slice origins drift in-plane (gantry tilt?); using the first origin")
    else:
        thickness = meta0.slice_thickness
        if thickness is not None and not 0 < thickness < np.inf:
            raise SeriesError(files[0], f"SliceThickness {thickness} is zero, negative or not "
                                        "finite; the slice spacing is unknown")
        step = float(thickness or 1.0)
    array = np.stack([images[i].pixels for i in order]).astype(np.float32)  # (N, rows, cols)
    affine = np.eye(4)
    affine[:3, 0] = normal * step           # k: slice index
    affine[:3, 1] = col_dir * spacing_rc[0]  # j: row index moves along the column cosine
    affine[:3, 2] = row_dir * spacing_rc[1]  # i: column index moves along the row cosine
    affine[:3, 3] = ipp[order[0]]
    array, affine = to_canonical(array, affine)
    meta = meta0.replace(source_format="dicom-series", frames=int(array.shape[0]),
                         rows=int(array.shape[1]), columns=int(array.shape[2]),
                         image_position=(float(affine[0, 3]), float(affine[1, 3]),
                                         float(affine[2, 3])),
                         instance_pseudonym=None, slice_thickness=step)
    return Volume(array=array, affine=affine, meta=meta)


#: NIfTI ``xyzt_units`` spatial codes (as nibabel names them) -> millimetres per unit; an
#: unset code ("unknown") is read as mm, as nibabel and most tools do
NIFTI_MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3, "unknown": 1.0}


def _affine_in_mm(path: Path, img: Any, affine: np.ndarray) -> np.ndarray:
    """The voxel -> world affine with the world in mm, whatever ``xyzt_units`` says the header
    stores (NIfTI's pixdim and qform/sform are in that unit)."""
    header = getattr(img, "header", None)
    get_units = getattr(header, "get_xyzt_units", None)
    if get_units is None:  # not a NIfTI header (Analyze, MGH, ...): mm by definition
        return affine
    try:
        unit = str(get_units()[0])
    except Exception:  # an undefined unit code: nibabel cannot name it
        unit = "undefined"
    scale = NIFTI_MM_PER_UNIT.get(unit)
    if scale is None:
        raise ImageReadError(path, f"the NIfTI header's spatial unit ({unit}) is not a length "
                                   "(mm, meter or micron)")
    if scale == 1.0:
        return affine
    out = affine.copy()
    out[:3, :] *= scale  # directions, spacing and origin alike
    return out


def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI (.nii / .nii.gz) volume into the canonical grid (values as scaled by the
    header's scl_slope/scl_inter; world coordinates converted to mm from the header's
    ``xyzt_units``, so a volume stored in metres or microns gets its true voxel size)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    try:
        img: Any = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        ras_affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ImageReadError(path, f"unreadable NIfTI ({' '.join(str(exc).split())[:200]})"
                             ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ImageReadError(path, f"expected a 3-D volume, got shape {data.shape}")
    if not np.all(np.isfinite(ras_affine)) or abs(np.linalg.det(ras_affine[:3, :3])) < 1e-12:
        raise ImageReadError(path, "the NIfTI affine is missing or singular")
    ras_affine = _affine_in_mm(path, img, ras_affine)
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine  # nibabel world is RAS
    array, affine = to_canonical(data, lps_affine)
    dz, dy, dx = np.linalg.norm(affine[:3, :3], axis=0)
    meta = ImageMeta(source_format="nifti", modality=None, frames=int(array.shape[0]),
                     rows=int(array.shape[1]), columns=int(array.shape[2]),
                     pixel_spacing=(float(dy), float(dx)), spacing_source="affine",
                     slice_thickness=float(dz), units="raw",
                     image_position=(float(affine[0, 3]), float(affine[1, 3]),
                                     float(affine[2, 3])))
    return Volume(array=array, affine=affine, meta=meta)
