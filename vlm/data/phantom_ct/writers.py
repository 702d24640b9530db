"""Write a PhantomCT volume as a DICOM series and NIfTI files."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.uid import UID

from vlm.data.phantom_ct.geometry import Grid
from vlm.io.dicom_write import build_dataset, save_dataset, uid_from

HU_MIN, HU_MAX = -1024, 3071  # representable with uint16 stored values, intercept -1024
RESCALE_INTERCEPT = -1024.0


def _ds(v: float) -> str:
    """Short decimal string for DICOM DS values."""
    return f"{v:.4f}".rstrip("0").rstrip(".") if v != 0 else "0"


def write_dicom_series(hu: np.ndarray, grid: Grid, out_dir: str | os.PathLike[str], *,
                       patient_id: str, study_uid: str, series_uid: str,
                       description: str = "PhantomCT synthetic chest-abdomen") -> Path:
    """One CT file per axial slice, ``<k:04d>.dcm``, k = 0 most inferior.

    Args:
        hu: (Z, Y, X) int16 HU. Stored as uint16 = HU + 1024 (RescaleSlope 1,
            RescaleIntercept -1024), so a reader must apply the modality LUT.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored = (np.clip(hu.astype(np.int32), HU_MIN, HU_MAX) - HU_MIN).astype(np.uint16)
    dz, dy, dx = grid.spacing
    x0, y0, z0 = grid.origin
    frame_uid = uid_from("phantom_ct", "frame", series_uid)
    # Build the first slice with the shared helper, then change only what differs per slice
    # (building every slice from scratch costs more than writing it).
    ds = build_dataset(
        stored[0], modality="CT", patient_id=patient_id, study_uid=study_uid,
        series_uid=series_uid, sop_uid=uid_from("phantom_ct", series_uid, 0),
        pixel_spacing=(dy, dx), bits_stored=12, rescale_slope=1.0,
        rescale_intercept=RESCALE_INTERCEPT, window=(40.0, 400.0), instance_number=1,
        extra={"ImagePositionPatient": [_ds(x0), _ds(y0), _ds(z0)],
               "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
               "SliceThickness": _ds(dz), "SliceLocation": _ds(z0),
               "FrameOfReferenceUID": frame_uid, "PatientPosition": "HFS",
               "BodyPartExamined": "CHEST",
               "StudyDescription": description, "SeriesDescription": description,
               "StudyID": "1", "AccessionNumber": "", "PatientBirthDate": "",
               "PatientSex": "O", "ReferringPhysicianName": "", "KVP": "120"})
    for k in range(hu.shape[0]):
        z = z0 + k * dz
        sop_uid = uid_from("phantom_ct", series_uid, k)
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        save_dataset(ds, out / f"{k:04d}.dcm")
    return out


def nifti_affine(grid: Grid) -> np.ndarray:
    """RAS affine for arrays stored in NIfTI's (X, Y, Z) = (i, j, k) order."""
    dz, dy, dx = grid.spacing
    x0, y0, z0 = grid.origin
    return np.array([[-dx, 0.0, 0.0, -x0],
                     [0.0, -dy, 0.0, -y0],
                     [0.0, 0.0, dz, z0],
                     [0.0, 0.0, 0.0, 1.0]])


def write_nifti(array: np.ndarray, grid: Grid, path: str | os.PathLike[str]) -> Path:
    """Save a (Z, Y, X) array as NIfTI in the conventional (i, j, k) order with a RAS affine
    (LPS with x and y negated), atomically; dtype is kept (int16 HU, uint8 masks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(array.transpose(2, 1, 0))  # (X, Y, Z)
    img = nib.Nifti1Image(data, nifti_affine(grid))
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)
    return path
