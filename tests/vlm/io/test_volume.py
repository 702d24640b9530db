"""DICOM series -> volume (order, spacing, refusals) and NIfTI on the same canonical grid."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from vlm.errors import ImageReadError, SeriesError
from vlm.io import read, read_nifti, read_series, read_volume
from vlm.io.dicom_write import save_dataset, uid_from

SPACING = 2.5


def write_series(src: pydicom.Dataset, folder: Path, n: int = 8, *, skip: int | None = None,
                 orientation=(1, 0, 0, 0, 1, 0), series: str = "s1", seed: int = 0,
                 tilt_slice: int | None = None) -> list[Path]:
    """Slices of the real CT, each offset by 10*k HU so their order is visible, shuffled."""
    row = np.array(orientation[:3], float)
    col = np.array(orientation[3:], float)
    normal = np.cross(row, col)
    base = src.pixel_array.astype(np.int32)
    info = np.iinfo(src.pixel_array.dtype)
    files = []
    order = np.random.default_rng(seed).permutation(n)
    for rank, k in enumerate(order):
        if k == skip:
            continue
        ds = copy.deepcopy(src)  # Dataset.copy() is shallow: it would mutate src
        ds.PixelData = np.clip(base + 10 * int(k), info.min, info.max).astype(
            src.pixel_array.dtype).tobytes()
        pos = np.array([-100.0, -120.0, 30.0]) + normal * SPACING * float(k)
        ds.ImagePositionPatient = [float(v) for v in pos]
        iop = orientation if k != tilt_slice else (1, 0, 0, 0, 0, -1)
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.SeriesInstanceUID = uid_from(series)
        ds.SOPInstanceUID = uid_from(series, int(k))
        ds.InstanceNumber = int(order[(rank + 3) % n]) + 1  # deliberately wrong: must not be used
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append(save_dataset(ds, folder / f"f{rank:03d}.dcm"))
    return files


def test_shuffled_series_assembles_in_order_with_spacing(ct_slice, tmp_path):
    write_series(ct_slice, tmp_path, n=8)
    vol = read_series(tmp_path)
    assert vol.shape == (8, 128, 128)
    assert vol.spacing == pytest.approx((SPACING, *map(float, ct_slice.PixelSpacing)))
    hu0 = float(ct_slice.RescaleSlope) * ct_slice.pixel_array + float(ct_slice.RescaleIntercept)
    for k in range(8):  # slice k carries +10*k HU; inferior -> superior
        np.testing.assert_allclose(vol.array[k], hu0 + 10 * k, atol=1e-3)
    np.testing.assert_allclose(vol.affine[:3, 3], [-100.0, -120.0, 30.0])
    assert vol.meta.source_format == "dicom-series" and vol.meta.units == "HU"
    # read() and read_volume() dispatch a folder to the same reader
    np.testing.assert_array_equal(read(tmp_path).array, vol.array)  # type: ignore[union-attr]


def test_missing_slice_is_refused(ct_slice, tmp_path):
    write_series(ct_slice, tmp_path, n=8, skip=4)
    with pytest.raises(SeriesError, match="missing slice"):
        read_series(tmp_path)


def test_two_orientations_are_refused(ct_slice, tmp_path):
    write_series(ct_slice, tmp_path, n=6, tilt_slice=2)
    with pytest.raises(SeriesError, match="inconsistent orientation"):
        read_series(tmp_path)


def test_mixed_series_are_refused(ct_slice, tmp_path):
    a = write_series(ct_slice, tmp_path / "a", n=4, series="A")
    b = write_series(ct_slice, tmp_path / "b", n=4, series="B")
    with pytest.raises(SeriesError, match="mixed series") as err:
        read_series(a + b)
    assert uid_from("A") not in str(err.value)  # UIDs are identifiers: never echoed


def test_duplicate_positions_are_refused(ct_slice, tmp_path):
    files = write_series(ct_slice, tmp_path, n=4)
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = uid_from("dup")
    save_dataset(ds, tmp_path / "dup.dcm")
    with pytest.raises(SeriesError, match="same position"):
        read_series(tmp_path)


def test_bad_slice_is_a_read_error(ct_slice, tmp_path):
    write_series(ct_slice, tmp_path, n=4)
    (tmp_path / "broken.dcm").write_text("not dicom")
    with pytest.raises(ImageReadError, match=r"broken\.dcm"):
        read_series(tmp_path)


def test_sagittal_series_lands_on_the_canonical_grid(ct_slice, tmp_path):
    # rows along +y (posterior), columns along -z (inferior); slice normal row x col = -x, so
    # source slice k sits at x = -100 - 2.5k: k=0 is the leftmost slice
    write_series(ct_slice, tmp_path, n=5, orientation=(0, 1, 0, 0, 0, -1))
    vol = read_series(tmp_path)
    z, y, x = vol.shape
    assert (y, x) == (128, 5) and z == 128
    # every axis of the canonical affine points along +S, +P, +L
    direction = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    np.testing.assert_allclose(np.abs(np.diag(direction[::-1])), 1.0, atol=1e-6)
    assert direction[2, 0] > 0 and direction[1, 1] > 0 and direction[0, 2] > 0
    # i grows towards patient left: i=4 is source slice 0 (+0 HU), i=0 is slice 4 (+40 HU)
    assert vol.array[:, :, 0].mean() - vol.array[:, :, 4].mean() == pytest.approx(40, abs=1)


def test_nifti_and_dicom_give_the_same_volume(ct_slice, tmp_path):
    write_series(ct_slice, tmp_path / "dcm", n=6)
    vol = read_series(tmp_path / "dcm")
    # Store as NIfTI in RAS with a flipped, transposed layout (i, j, k) = (x, y, z)
    data_xyz = np.transpose(vol.array, (2, 1, 0))  # (L, P, S) axes
    lps = vol.affine @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    flipped = data_xyz[::-1]  # also flip the first axis in storage
    ras_flipped = ras.copy()
    ras_flipped[:3, 3] = ras[:3, :3] @ [data_xyz.shape[0] - 1, 0, 0] + ras[:3, 3]
    ras_flipped[:3, 0] *= -1
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(flipped), ras_flipped), str(path))
    nvol = read_nifti(path)
    assert nvol.shape == vol.shape
    np.testing.assert_allclose(nvol.array, vol.array, atol=1e-3)
    np.testing.assert_allclose(nvol.affine, vol.affine, atol=1e-4)
    assert nvol.spacing == pytest.approx(vol.spacing)
    np.testing.assert_array_equal(read_volume(path).array, nvol.array)


def test_bad_nifti_is_a_read_error(tmp_path):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ImageReadError, match=r"x\.nii\.gz"):
        read_nifti(path)


@pytest.mark.parametrize(("unit", "mm_per_unit"), [("mm", 1.0), ("meter", 1000.0),
                                                    ("micron", 1e-3), ("unknown", 1.0)])
def test_nifti_units_are_converted_to_mm(tmp_path, unit, mm_per_unit):
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, -30.0]
    img = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), affine)
    img.header.set_xyzt_units(unit)
    path = tmp_path / f"{unit}.nii.gz"
    nib.save(img, str(path))
    vol = read_nifti(path)
    assert vol.spacing == pytest.approx((2.0 * mm_per_unit, 0.5 * mm_per_unit,
                                         0.5 * mm_per_unit))
    # the origin is in the same unit as the spacing (LPS: x and y negated from RAS)
    assert vol.meta.image_position[2] == pytest.approx(-30.0 * mm_per_unit)


def test_nifti_with_an_undefined_spatial_unit_is_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header["xyzt_units"] = 5  # spatial code 5 is not defined by NIfTI-1
    path = tmp_path / "odd.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(ImageReadError, match=r"odd\.nii\.gz: .*spatial unit"):
        read_nifti(path)


@pytest.mark.parametrize("spacing", [[0.0, 0.0], [-0.7, 0.7], ["nan", "nan"], ["inf", "1"]])
def test_unusable_pixel_spacing_is_refused_naming_the_file(ct_slice, tmp_path, spacing):
    files = write_series(ct_slice, tmp_path, n=4)
    ds = pydicom.dcmread(files[2])
    ds.PixelSpacing = spacing
    save_dataset(ds, files[2])
    with pytest.raises(SeriesError, match="PixelSpacing is zero, negative or not finite") as err:
        read_series(tmp_path)
    assert str(err.value).startswith(f"{files[2]}: ")
    assert "\n" not in str(err.value)


def test_unusable_slice_thickness_of_one_slice_is_refused(ct_slice, tmp_path):
    ds = copy.deepcopy(ct_slice)
    for value in ("0", "-2", "nan"):
        ds.SliceThickness = value
        save_dataset(ds, tmp_path / "one.dcm")
        with pytest.raises(SeriesError, match=r"SliceThickness .* zero, negative or not finite"):
            read_series([tmp_path / "one.dcm"])
    ds.SliceThickness = "3"
    save_dataset(ds, tmp_path / "one.dcm")
    assert read_series([tmp_path / "one.dcm"]).spacing[0] == pytest.approx(3.0)


@pytest.mark.parametrize(("keyword", "value"), [
    ("ImagePositionPatient", ["nan", "0", "0"]),
    ("ImagePositionPatient", ["0", "inf", "0"]),
    ("ImageOrientationPatient", ["1", "0", "0", "0", "nan", "0"]),
])
def test_non_finite_position_or_orientation_is_one_line(ct_slice, tmp_path, keyword, value):
    files = write_series(ct_slice, tmp_path, n=4)
    ds = pydicom.dcmread(files[1])
    setattr(ds, keyword, value)
    save_dataset(ds, files[1])
    with pytest.raises(SeriesError, match=f"{keyword} is not finite") as err:
        read_series(tmp_path)
    assert str(err.value).startswith(f"{files[1]}: ")


def test_degenerate_orientation_is_refused(ct_slice, tmp_path):
    write_series(ct_slice, tmp_path, n=4, orientation=(1, 0, 0, 1, 0, 0))
    with pytest.raises(SeriesError, match="zero or parallel row and column"):
        read_series(tmp_path)
