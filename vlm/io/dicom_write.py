"""Write small, standard-conformant DICOM files (used by the phantom generators and tests).

Only what RadLens produces itself: uncompressed little-endian, monochrome, one frame per file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset as _Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

# SOP classes RadLens writes.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_STORAGE_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SOP_CLASS_BY_MODALITY = {"CT": CT_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE_PRESENTATION,
                         "CR": CR_IMAGE_STORAGE}

def uid_from(*parts: object) -> str:
    """A deterministic UID derived from ``parts`` (same parts -> same UID).

    Uses the registration-free ``2.25.<128-bit integer>`` form (PS3.5 B.2), so RadLens needs no
    organisational UID root.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def build_dataset(
    pixels: np.ndarray,
    *,
    modality: str,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    pixel_spacing: Sequence[float],
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    window: tuple[float, float] | None = None,
    study_date: _dt.date | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    extra: Mapping[str, Any] | None = None,
) -> _Dataset:
    """Build a single-frame monochrome dataset around stored values ``pixels``.

    Args:
        pixels: (rows, cols) stored values, uint8/uint16 (unsigned) or int16 (signed).
        modality: "CT", "DX" or "CR" (chooses the SOP class).
        patient_id / study_uid / series_uid / sop_uid: identifiers (pseudonymous for phantoms).
        pixel_spacing: (row spacing, column spacing) in mm.
        bits_stored: defaults to the dtype's width.
        rescale_slope / rescale_intercept: modality LUT (CT: HU = slope * stored + intercept).
        window: (centre, width) written as the default VOI window.
        extra: further top-level keywords (e.g. ImagePositionPatient, ViewPosition).
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"unsupported stored dtype {pixels.dtype}; use uint8, uint16 or int16")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"only monochrome output is written, not {photometric}")
    bits_allocated = pixels.dtype.itemsize * 8
    bits_stored = bits_allocated if bits_stored is None else int(bits_stored)
    sop_class = SOP_CLASS_BY_MODALITY[modality]
    date = study_date or _dt.date(2000, 1, 1)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = _Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.Modality = modality
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "RadLens"
    ds.ManufacturerModelName = "phantom"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    if rescale_slope is not None or rescale_intercept is not None:
        ds.RescaleSlope = float(1.0 if rescale_slope is None else rescale_slope)
        ds.RescaleIntercept = float(0.0 if rescale_intercept is None else rescale_intercept)
        ds.RescaleType = "HU" if modality == "CT" else "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def save_dataset(ds: _Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` atomically (temporary file, fsync, rename) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
