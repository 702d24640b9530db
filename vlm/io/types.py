"""Typed results of the readers: pixels in physical units plus de-identified metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: the smallest image side, in pixels, that a model is asked to read
MIN_IMAGE_SIDE = 16
#: the fewest slices a volume needs (as a DICOM series needs to be grouped into one)
MIN_VOLUME_SLICES = 3


def _blank(values: np.ndarray, unit: str) -> str | None:
    """Why ``values`` hold no image content (all equal, or none finite), or None."""
    flat = values.reshape(-1)
    sample = flat[::97]  # most images differ within a sparse sample: no full pass
    if sample.size and sample.min() < sample.max():
        return None
    if flat.size:
        lo, hi = flat.min(), flat.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or infinity somewhere
            finite = flat[np.isfinite(flat)]
            if not finite.size:
                return f"blank (no {unit} has a finite value): no image content"
            lo, hi = finite.min(), finite.max()
        if lo == hi:
            return f"blank (every {unit} is {float(lo):g}): no image content"
    return None


@dataclass(frozen=True)
class VOIWindow:
    """One VOI window stored in a file (a DICOM multi-valued window gives several)."""

    center: float
    width: float
    explanation: str | None = None


@dataclass(frozen=True)
class VOILut:
    """A VOI LUT Sequence item: ``first_mapped`` input maps to ``data[0]``."""

    first_mapped: int
    bits: int
    data: np.ndarray = field(repr=False)
    explanation: str | None = None


@dataclass(frozen=True)
class ImageMeta:
    """An allow-list of non-identifying fields, plus keyed pseudonyms for the identifiers.

    Raw identifiers appear only in ``identifiers`` and only when a reader was asked for them
    (``keep_identifiers=True``); otherwise it is ``None``.
    """

    source_format: str  # "dicom" | "dicom-series" | "nifti" | "png" | "jpeg" | ...
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    laterality: str | None = None
    photometric: str = "MONOCHROME2"
    rows: int = 0
    columns: int = 0
    frames: int = 1
    samples_per_pixel: int = 1
    bits_stored: int | None = None
    pixel_spacing: tuple[float, float] | None = None  # (row spacing, column spacing) in mm
    # PixelSpacing | ImagerPixelSpacing | affine | None, or "invalid PixelSpacing" (stated but
    # zero, negative or not finite: pixel_spacing is None then)
    spacing_source: str | None = None
    slice_thickness: float | None = None
    image_orientation: tuple[float, ...] | None = None  # DICOM row and column cosines (LPS)
    image_position: tuple[float, float, float] | None = None  # mm, LPS
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    study_year: int | None = None
    transfer_syntax: str | None = None
    sop_class: str | None = None
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    has_modality_lut_sequence: bool = False
    units: str = "raw"  # "HU" for CT after the modality LUT
    windows: tuple[VOIWindow, ...] = ()
    voi_function: str = "LINEAR"
    voi_luts: tuple[VOILut, ...] = field(default=(), repr=False)
    patient_pseudonym: str | None = None
    study_pseudonym: str | None = None
    series_pseudonym: str | None = None
    instance_pseudonym: str | None = None
    accession_pseudonym: str | None = None
    identifiers: dict[str, str] | None = field(default=None, repr=False)

    @property
    def is_monochrome1(self) -> bool:
        return self.photometric == "MONOCHROME1"

    @property
    def is_color(self) -> bool:
        return self.samples_per_pixel > 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no LUT arrays; identifiers only if they were kept)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "voi_luts":
                out["voi_lut_count"] = len(value)
                continue
            if f.name == "windows":
                value = [dataclasses.asdict(w) for w in value]
            elif isinstance(value, tuple):
                value = list(value)
            if f.name == "identifiers" and value is None:
                continue
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> ImageMeta:
        return dataclasses.replace(self, **changes)


@dataclass
class ImageData:
    """A 2-D image (or a stack of frames) in physical units.

    ``pixels`` is float32: (H, W) grayscale, (F, H, W) multi-frame grayscale, (H, W, 3) colour
    or (F, H, W, 3) multi-frame colour. Grayscale DICOM has its modality LUT applied (HU for CT);
    the VOI LUT and MONOCHROME1 inversion are display steps (see :func:`vlm.io.render`).
    """

    pixels: np.ndarray
    meta: ImageMeta

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    def content_problem(self) -> str | None:
        """Why this image holds nothing a model can read, or None: smaller than
        :data:`MIN_IMAGE_SIDE` pixels a side, or blank (every pixel the same value, e.g. a
        zero-filled export). Such an image still encodes to a unit vector, and that vector
        ranked an archive like any other."""
        frames = self.meta.frames > 1
        height, width = self.pixels.shape[1:3] if frames else self.pixels.shape[:2]
        if min(height, width) < MIN_IMAGE_SIDE:
            return (f"too small to read ({width}x{height} pixels; at least {MIN_IMAGE_SIDE} a "
                    "side)")
        return _blank(self.pixels, "pixel")

    def frame(self, index: int = 0) -> ImageData:
        """One frame of a multi-frame image (the image itself if single-frame)."""
        if self.meta.frames <= 1:
            return self
        return ImageData(self.pixels[index], self.meta.replace(frames=1))


@dataclass
class Volume:
    """A 3-D volume in physical units (HU for CT) on a canonical grid.

    ``array`` is float32 (Z, Y, X): index k runs inferior->superior, j anterior->posterior and
    i patient right->left (the DICOM LPS axes), whatever the orientation of the source.
    ``affine`` maps (k, j, i, 1) to LPS millimetres; ``spacing`` is (dz, dy, dx) in mm.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: ImageMeta

    def content_problem(self) -> str | None:
        """Why this volume holds nothing a model can read, or None: fewer than
        :data:`MIN_VOLUME_SLICES` slices, slices under :data:`MIN_IMAGE_SIDE` voxels a side,
        or blank (every voxel the same value, e.g. a zero-filled export)."""
        depth, height, width = self.array.shape
        if depth < MIN_VOLUME_SLICES or min(height, width) < MIN_IMAGE_SIDE:
            return (f"too small to read ({depth}x{height}x{width} voxels; at least "
                    f"{MIN_VOLUME_SLICES} slices of {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})")
        return _blank(self.array, "voxel")

    @property
    def spacing(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return (int(z), int(y), int(x))

    def slice_image(self, k: int) -> ImageData:
        """Axial slice ``k`` as an image (for rendering and 2-D encoders)."""
        _dz, dy, dx = self.spacing
        meta = self.meta.replace(frames=1, rows=self.shape[1], columns=self.shape[2],
                                 pixel_spacing=(dy, dx), spacing_source="affine")
        return ImageData(self.array[k], meta)
