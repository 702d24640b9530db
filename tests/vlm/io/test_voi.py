"""Modality LUT + VOI against pydicom's reference implementation; windows; MONOCHROME1."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from tests.vlm.io.conftest import all_test_files, sample_file
from vlm.errors import ImageReadError, RadLensError
from vlm.io import apply_voi, apply_window, parse_window, read_image, render
from vlm.io.types import ImageMeta, VOILut, VOIWindow


def _single_frame_gray() -> list[Path]:
    out = []
    for path in all_test_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                single_gray = ("Rows" in ds and "BitsAllocated" in ds
                               and int(ds.get("NumberOfFrames") or 1) == 1
                               and int(ds.get("SamplesPerPixel") or 1) == 1
                               and str(ds.get("PhotometricInterpretation", "")
                                       ).startswith("MONOCHROME"))
            except Exception:
                continue
        if single_gray:
            out.append(path)
    return out


GRAY = _single_frame_gray()


def test_there_are_many_grayscale_files():
    assert len(GRAY) >= 40


@pytest.mark.parametrize("path", GRAY, ids=[p.name for p in GRAY])
def test_modality_and_voi_match_pydicom(path: Path):
    try:
        image = read_image(path)
    except ImageReadError:
        pytest.skip("not decodable (recorded by the survey)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        reference_modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        reference_voi = apply_voi_lut(reference_modality, ds).astype(np.float64)
    np.testing.assert_allclose(image.pixels, reference_modality, rtol=1e-5, atol=1e-3)
    ours = apply_voi(image.pixels, image.meta).astype(np.float64)
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    if ours.std() < 1e-9 or reference_voi.std() < 1e-9:
        # a window that saturates the whole image: both must be constant
        assert ours.std() < 1e-9 and reference_voi.std() < 1e-9
        return
    corr = np.corrcoef(ours.ravel(), reference_voi.ravel())[0, 1]
    assert corr > 0.999, f"correlation {corr:.5f}"


def test_monochrome1_chest_cr_shows_dark_lungs():
    image = read_image(sample_file("RG1_UNCI.dcm"))
    assert image.meta.photometric == "MONOCHROME1"
    display = render(image).astype(float)
    h, w = display.shape

    def box(r: float, c: float) -> float:
        return display[int(r * h) - 40:int(r * h) + 40, int(c * w) - 40:int(c * w) + 40].mean()

    lungs = (box(0.35, 0.28) + box(0.35, 0.72)) / 2
    mediastinum = box(0.35, 0.5)
    abdomen = box(0.88, 0.3)
    assert lungs < mediastinum - 30 and lungs < abdomen - 30
    # and without inversion the lungs would be bright: inversion really happened
    raw = apply_voi(image.pixels, image.meta)
    assert raw[int(0.35 * h), int(0.28 * w)] > raw[int(0.35 * h), int(0.5 * w)]


def test_window_functions_follow_the_standard():
    x = np.array([-1000.0, 39.5, 40.0, 240.0, 1000.0])
    lin = apply_window(x, 40, 400, "LINEAR")
    np.testing.assert_allclose(lin[[0, -1]], [0.0, 1.0])
    # LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5)
    np.testing.assert_allclose(lin[2], (40 - 39.5) / 399 + 0.5, rtol=1e-6)
    exact = apply_window(x, 40, 400, "LINEAR_EXACT")
    np.testing.assert_allclose(exact[2], 0.5)
    np.testing.assert_allclose(exact[3], 1.0)
    sig = apply_window(x, 40, 400, "SIGMOID")
    np.testing.assert_allclose(sig[2], 0.5)
    np.testing.assert_allclose(sig[3], 1 / (1 + np.exp(-4 * 200 / 400)), rtol=1e-6)
    # width 1 is the standard's step: x <= c - 0.5 -> 0, above -> 1
    np.testing.assert_array_equal(apply_window(np.array([39.0, 39.5, 39.6, 41.0]), 40, 1),
                                  [0.0, 0.0, 1.0, 1.0])
    # float32 inputs far from zero keep the window's precision
    big = np.array([30000.0, 30000.5, 30001.0], np.float32)
    np.testing.assert_allclose(apply_window(big, 30000.5, 2, "LINEAR_EXACT"), [0.25, 0.5, 0.75],
                               atol=1e-6)
    with pytest.raises(RadLensError):
        apply_window(x, 40, 0.5, "LINEAR")
    with pytest.raises(RadLensError):
        apply_window(x, 40, 10, "CUBIC")


def test_multi_valued_windows_with_explanations_and_lut_sequence():
    windows = (VOIWindow(40, 400, "SOFT TISSUE"), VOIWindow(-600, 1500, "LUNG"))
    meta = ImageMeta(source_format="dicom", windows=windows)
    x = np.linspace(-1200, 400, 50)
    np.testing.assert_allclose(apply_voi(x, meta, voi_index=1),
                               apply_window(x, -600, 1500, "LINEAR"))
    np.testing.assert_allclose(apply_voi(x, meta), apply_window(x, 40, 400, "LINEAR"))
    lut = VOILut(first_mapped=-1000, bits=8, data=np.linspace(0, 255, 1001))
    meta_lut = meta.replace(voi_luts=(lut,))
    y = apply_voi(np.array([-2000.0, -1000.0, -500.0, 0.0, 50.0]), meta_lut)
    np.testing.assert_allclose(y, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-3)


def test_real_file_with_voi_lut_sequence_and_multiple_windows():
    # pydicom's mlut_18 has a Modality LUT Sequence; vlut_04 a VOI LUT Sequence.
    image = read_image(sample_file("vlut_04.dcm"))
    assert image.meta.voi_luts, "VOI LUT Sequence not read"
    image = read_image(sample_file("mlut_18.dcm"))
    assert image.meta.has_modality_lut_sequence


def test_presets_and_window_parsing():
    assert parse_window("lung") == "lung"
    assert parse_window("40,400") == (40.0, 400.0)
    for bad in ("nope", "40", "40,-1", "a,b"):
        with pytest.raises(RadLensError):
            parse_window(bad)
    # NaN and inf parsed as floats and rendered a blank or meaningless preview
    for bad in ("nan,400", "40,nan", "inf,400", "40,inf", "-inf,1", "40,0"):
        with pytest.raises(RadLensError, match=r"finite|> 0") as info:
            parse_window(bad)
        assert "\n" not in str(info.value)
    hu = np.array([[-1000.0, -600.0], [40.0, 1500.0]])
    lung = render(hu, window="lung")
    assert lung.dtype == np.uint8 and lung[0, 0] < lung[0, 1] < lung[1, 0] <= lung[1, 1]
    brain = render(hu, window=(40, 80))
    assert brain[0, 0] == 0 and brain[1, 1] == 255 and 120 <= brain[1, 0] <= 135


def test_ct_slice_in_hounsfield_units():
    image = read_image(sample_file("CT_small.dcm"))
    assert image.meta.units == "HU"
    assert image.meta.rescale_intercept == pytest.approx(-1024.0)
    assert image.pixels.min() >= -1100 and image.pixels.max() > 300  # air and bone present
