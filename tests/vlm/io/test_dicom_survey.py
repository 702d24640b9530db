"""Every file in pydicom's test data and pydicom-data decodes or fails with ImageReadError.

The survey is written to ``build/test-artifacts/reader_survey.json`` (which decode, which fail
and why) so a reviewer can see the reader's coverage without rerunning anything.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.vlm.io.conftest import all_test_files
from vlm.errors import ImageReadError
from vlm.io import read_image

FILES = all_test_files()
SURVEY: dict[str, dict[str, object]] = {}
ARTIFACTS = Path(__file__).resolve().parents[3] / "build" / "test-artifacts"


def _expected_shape(path: Path) -> tuple[int, ...] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception:
            return None
    frames = int(ds.get("NumberOfFrames") or 1)
    spp = 3 if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR" else int(
        ds.get("SamplesPerPixel") or 1)
    shape: tuple[int, ...] = (rows, cols) if spp == 1 else (rows, cols, spp)
    return (frames, *shape) if frames > 1 else shape


def test_enough_files_are_surveyed():
    assert len(FILES) > 200  # 176 pydicom test files + pydicom-data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.name}" for p in FILES])
def test_file_decodes_or_raises_read_error(path: Path):
    try:
        image = read_image(path)
    except ImageReadError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith(str(path)) and len(message) > len(str(path)) + 5
        SURVEY[str(path)] = {"decoded": False, "reason": exc.reason}
        return
    expected = _expected_shape(path)
    assert expected is not None
    assert image.pixels.shape == expected
    assert image.pixels.dtype == np.float32
    assert image.meta.rows == expected[-2 if image.meta.samples_per_pixel == 1 else -3]
    SURVEY[str(path)] = {"decoded": True, "shape": list(image.pixels.shape),
                         "photometric": image.meta.photometric,
                         "transfer_syntax": image.meta.transfer_syntax}


def test_survey_report_written():
    """Runs after the parametrised cases (file order): records which files decode."""
    if len(SURVEY) < len(FILES):
        pytest.skip("survey incomplete (run the whole module to write the report)")
    decoded = sum(1 for v in SURVEY.values() if v["decoded"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report = {"files": len(SURVEY), "decoded": decoded, "refused": len(SURVEY) - decoded,
              "by_file": {Path(k).name if "dicomdirtests" not in k else k.split("test_files/")[-1]:
                          v for k, v in sorted(SURVEY.items())}}
    (ARTIFACTS / "reader_survey.json").write_text(json.dumps(report, indent=1))
    # Real images must decode: the chest CR, every JPEG 2000 / JPEG-LS / lossless JPEG / RLE
    # sample of pydicom-data, the multi-frame and colour files.
    must = ["RG1_UNCI.dcm", "RG1_J2KR.dcm", "CT_small.dcm", "MR_small.dcm", "emri_small.dcm",
            "SC_rgb.dcm", "JPEG-LL.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
            "US1_J2KR.dcm", "color3d_jpeg_baseline.dcm", "OT-PAL-8-face.dcm"]
    by_name = {Path(k).name: v for k, v in SURVEY.items()}
    failed = [m for m in must if m in by_name and not by_name[m]["decoded"]]
    assert not failed, failed
    assert decoded >= 150


def test_native_pixel_fast_path_equals_pydicom_wherever_it_applies():
    """vlm.io.dicom.native_pixels reads uncompressed grayscale straight from the bytes; on
    every sample file it accepts, it must give pydicom's pixel_array exactly (values, dtype),
    and it must decline compressed, multi-frame, colour and narrow signed files."""
    from vlm.io.dicom import load_dataset, native_pixels

    used, declined = [], 0
    for path in FILES:
        try:
            ds = load_dataset(path)
        except ImageReadError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some samples carry invalid values on purpose
            fast = native_pixels(ds)
        if fast is None:
            declined += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = np.asarray(ds.pixel_array)
        assert fast.dtype == reference.dtype, path.name
        np.testing.assert_array_equal(fast, reference, err_msg=path.name)
        assert fast.flags.writeable and fast.flags.owndata
        used.append(path.name)
    assert len(used) >= 20, used  # CT_small, MR_small, the chest CR RG1_UNCI, ...
    assert "RG1_UNCI.dcm" in used and "CT_small.dcm" in used
    assert declined >= 50  # JPEG / RLE / colour / multi-frame samples go through pydicom


def test_dicom_read_from_bytes_equals_read_from_path(tmp_path):
    """Ingestion hashes a file's bytes and decodes those same bytes: same pixels and record,
    and errors still name the file."""
    from tests.vlm.io.conftest import sample_file

    for name in ("RG1_UNCI.dcm", "CT_small.dcm", "MR_small_RLE.dcm"):
        path = sample_file(name)
        a, b = read_image(path), read_image(path, data=path.read_bytes())
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert a.meta == b.meta
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(sample_file("CT_small.dcm").read_bytes()[:3000])
    with pytest.raises(ImageReadError) as from_bytes:
        read_image(bad, data=bad.read_bytes())
    with pytest.raises(ImageReadError) as from_path:
        read_image(bad)
    assert str(from_bytes.value) == str(from_path.value)
    assert str(from_bytes.value).startswith(str(bad))
