"""PhantomCXR: exact finding masks, visibility, determinism, DICOM round trip, skip reasons."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pydicom
import pytest

from vlm.data.iu_reports import FINDINGS, load_reports, map_mesh_terms
from vlm.data.manifest import read_jsonl
from vlm.data.phantom_cxr import (
    CONTRAST_RANGE,
    generate_phantom_cxr,
    make_contact_sheet,
    render_study,
)
from vlm.data.phantom_cxr.generate import skip_reason
from vlm.data.phantom_cxr.study import MAX_SATURATED, MIN_PEAK_CONTRAST

SIZE = 128


def _examples(per_finding: int) -> dict[str, list]:
    """The first reports (archive order) carrying each finding and renderable."""
    out: dict[str, list] = {name: [] for name in FINDINGS}
    for r in load_reports():
        if skip_reason(r) is not None:
            continue
        for name in r.labels:
            if len(out[name]) < per_finding:
                out[name].append(r)
    return out


def _pixel_hash(path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).pixel_array.tobytes()).hexdigest()


def _check_finding_is_exact(report, name: str, size: int) -> None:
    findings = map_mesh_terms(report.mesh_major)
    full = render_study(report.uid, findings, size=size, seed=0)
    for k, f in enumerate(findings):
        if f.finding != name:
            continue
        others = [i for i in range(len(findings)) if i != k]
        without = render_study(report.uid, findings, size=size, seed=0, include=others)
        diff = full.pixels.astype(np.int64) - without.pixels.astype(np.int64)
        mask = full.masks[k]
        assert mask.any(), (report.uid, f.term)
        assert not diff[~mask].any(), (report.uid, f.term, "difference outside the mask")
        assert diff[mask].any(), (report.uid, f.term, "finding invisible")
        x0, y0, x1, y1 = full.boxes[k]
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        lo, hi = CONTRAST_RANGE[name]
        assert lo <= full.contrasts[k] <= hi, (report.uid, f.term, full.contrasts[k])
        assert full.saturated[k] <= MAX_SATURATED, (report.uid, f.term, full.saturated[k])
        assert full.peaks[k] >= MIN_PEAK_CONTRAST[name], (report.uid, f.term, full.peaks[k])


@pytest.mark.parametrize("name", FINDINGS)
def test_each_finding_difference_is_inside_its_mask(name):
    for report in _examples(2)[name]:
        _check_finding_is_exact(report, name, SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("name", FINDINGS)
def test_finding_contrast_range_on_more_reports(name):
    for report in _examples(12)[name]:
        _check_finding_is_exact(report, name, 192)


def test_monochrome1_is_the_inverted_monochrome2():
    r = _examples(1)["cardiomegaly"][0]
    findings = map_mesh_terms(r.mesh_major)
    m2 = render_study(r.uid, findings, size=96, photometric="MONOCHROME2", bits_stored=12)
    m1 = render_study(r.uid, findings, size=96, photometric="MONOCHROME1", bits_stored=12)
    assert int(m2.pixels.max()) <= 4095
    np.testing.assert_array_equal(m1.pixels.astype(np.int32), 4095 - m2.pixels.astype(np.int32))


def test_monochrome1_file_displays_like_monochrome2(tmp_path):
    from vlm.io import read_image, render
    from vlm.io.dicom_write import build_dataset, save_dataset, uid_from

    r = _examples(1)["nodule"][0]
    findings = map_mesh_terms(r.mesh_major)
    shown = []
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        st = render_study(r.uid, findings, size=96, photometric=photometric, bits_stored=14)
        ds = build_dataset(st.pixels, modality="DX", patient_id="IU-PT-TEST",
                           study_uid=uid_from("t", photometric), series_uid=uid_from("s"),
                           sop_uid=uid_from("i", photometric), pixel_spacing=(0.7, 0.7),
                           photometric=photometric, bits_stored=14, window=(8191.5, 16383.0))
        path = save_dataset(ds, tmp_path / f"{photometric}.dcm")
        shown.append(np.asarray(render(read_image(path)), dtype=np.int16))
    assert np.abs(shown[0] - shown[1]).max() <= 1
    assert shown[1].std() > 20  # a real picture, not a flat field


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cxr")
    summary = generate_phantom_cxr(out, n=10, size=SIZE, seed=0, workers=2)
    return out, summary


def test_every_report_is_rendered_or_skipped_with_a_reason(generated):
    out, summary = generated
    rows = list(read_jsonl(out / "manifest.jsonl"))
    skipped = list(read_jsonl(out / "skipped.jsonl"))
    assert summary["rendered"] == len(rows) == 10
    uids = [r["report_uid"] for r in rows] + [s["report_uid"] for s in skipped]
    assert sorted(uids) == sorted(r.uid for r in load_reports())
    reasons = {s["reason"] for s in skipped}
    assert reasons == {"no image in the report", "no frontal image (only lateral views)",
                       "no findings or impression text", "not selected (n=10)"}
    assert json.loads((out / "summary.json").read_text())["rendered"] == 10


def test_manifest_rows_and_dicom_round_trip(generated):
    from vlm.io import read_image

    out, _ = generated
    for row in read_jsonl(out / "manifest.jsonl"):
        assert row["labels"] == sorted({f["finding"] for f in row["findings"]})
        assert row["split"] in ("train", "val", "test")
        assert row["patient_id"].startswith("IU-PT-")
        ds = pydicom.dcmread(out / row["file"])
        assert ds.pixel_array.shape == (SIZE, SIZE)
        assert ds.PhotometricInterpretation == row["photometric"]
        assert int(ds.BitsStored) == row["bits_stored"]
        assert int(ds.pixel_array.max()) <= 2 ** row["bits_stored"] - 1
        assert [float(v) for v in ds.PixelSpacing] == row["pixel_spacing"]
        assert ds.Modality == row["modality"] and ds.ViewPosition == row["view"]
        assert ds.StudyInstanceUID == row["study_uid"]
        image = read_image(out / row["file"])
        assert image.pixels.shape == (SIZE, SIZE)
        assert image.meta.photometric == row["photometric"]
        assert tuple(image.meta.pixel_spacing) == pytest.approx(tuple(row["pixel_spacing"]))
        # Display sense: the spine/mediastinum column is whiter than the lateral lung fields.
        shown = image.pixels.astype(np.float64)
        if row["photometric"] == "MONOCHROME1":
            shown = -shown
        band = shown[int(0.3 * SIZE): int(0.5 * SIZE)]
        centre = band[:, SIZE // 2 - 3: SIZE // 2 + 3].mean()
        lungs = band[:, int(0.28 * SIZE): int(0.36 * SIZE)].mean()
        assert centre > lungs, row["id"]
        for f in row["findings"]:
            assert (out / f["mask"]).exists()


def test_same_seed_is_identical_other_seed_differs(generated, tmp_path):
    out, _ = generated
    again = tmp_path / "again"
    generate_phantom_cxr(again, n=10, size=SIZE, seed=0, workers=1)
    assert (again / "manifest.jsonl").read_bytes() == (out / "manifest.jsonl").read_bytes()
    rows = list(read_jsonl(out / "manifest.jsonl"))
    for row in rows:
        assert _pixel_hash(again / row["file"]) == _pixel_hash(out / row["file"])
    other = tmp_path / "other"
    generate_phantom_cxr(other, n=10, size=SIZE, seed=1, workers=2)
    rows1 = list(read_jsonl(other / "manifest.jsonl"))
    assert [r["report_uid"] for r in rows1] == [r["report_uid"] for r in rows]
    assert sum(a["lung_mask"] != b["lung_mask"] for a, b in zip(rows, rows1, strict=True)) >= 8
    assert all(_pixel_hash(other / b["file"]) != _pixel_hash(out / a["file"])
               for a, b in zip(rows, rows1, strict=True))


def test_contact_sheet(generated, tmp_path):
    out, _ = generated
    path = make_contact_sheet(out, tmp_path / "sheet.png", per_finding=2, tile=64)
    from PIL import Image

    with Image.open(path) as img:
        assert img.size == (120 + 2 * 64, (len(FINDINGS) + 1) * 64)


def test_data_card_documents_vocabulary_and_contrast_ranges():
    from pathlib import Path

    card = (Path(__file__).resolve().parents[3] / "data_cards" / "phantom_cxr.md").read_text()
    documented = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in FINDINGS and "–" in cells[3]:
            lo, hi = cells[3].split("(")[0].replace("−", "-").split("–")
            documented[cells[0]] = (float(lo), float(hi))
    assert documented == {k: tuple(v) for k, v in CONTRAST_RANGE.items()}


@pytest.mark.parametrize(("args", "expect"), [
    (["--size", "0"], "image size must be 64 to 4096 pixels, got 0"),  # ZeroDivisionError
    (["--size", "100000"], "image size must be 64 to 4096 pixels, got 100000"),  # 10 GB
    (["--seed", "-1"], "seed must be a non-negative integer, got -1"),
    (["--workers", "-2"], "--workers must be 0 (this process) or a number of processes"),
    (["--out-is-a-file"], "is a file, not a folder"),
])
def test_bad_generator_options_are_one_line_before_any_work(tmp_path, capsys, args, expect):
    from ui.cli import main

    out = tmp_path / "out"
    if args == ["--out-is-a-file"]:
        out.write_text("a file the user keeps")
        args = []
    code = main(["data", "phantom-cxr", "--out", str(out), "--n", "1", "--workers", "1", *args])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("radlens: error: "), err
    assert expect in err[0]
    assert not out.is_dir()


def test_regenerating_into_a_used_folder_leaves_nothing_stale(tmp_path):
    """A second run with a smaller --n left the first run's extra DICOMs and masks in place,
    and CXRDataset served the first run's 64-pixel images from its cache (keyed by file names)
    after a rerun at another --size."""
    from vlm.data.cxr_dataset import CXRDataset, _load_one
    from vlm.models.config import PreprocessConfig

    root = tmp_path / "cxr"
    generate_phantom_cxr(root, n=4, size=64, seed=0, workers=1)
    rows = list(read_jsonl(root / "manifest.jsonl"))
    split = rows[0]["split"]
    pre = PreprocessConfig(image_size=64)
    old = np.array(CXRDataset(root, split, pre, workers=0).images)
    assert list((root / ".cache").glob("images-*.npy"))
    mine = [root / "notes.txt", root / "dicom" / "README", root / "masks" / "mine.png",
            root / ".cache" / "mine.npy", root / "dicom" / "own" / "x.dcm"]
    for path in mine:  # files of the user's own are left alone
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    generate_phantom_cxr(root, n=2, size=256, seed=0, workers=1)
    new = list(read_jsonl(root / "manifest.jsonl"))
    assert [r["file"] for r in new] == [r["file"] for r in rows[:2]]
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("dicom/IU-*/*")) == sorted(
        r["file"] for r in new)
    assert not (root / rows[3]["file"]).parent.exists()
    masks = {f["mask"] for r in new for f in r["findings"]}
    assert {p.relative_to(root).as_posix() for p in root.glob("masks/CXR*")} == masks
    assert not list((root / ".cache").glob("images-*"))
    assert all(p.read_text() == "mine" for p in mine)
    assert json.loads((root / "summary.json").read_text())["dataset"] == "phantom_cxr"
    ds = CXRDataset(root, [r["split"] for r in new], pre, workers=0)
    fresh = np.stack([_load_one((str(root / r["file"]), vars(pre)))[0] for r in ds.rows])
    np.testing.assert_array_equal(np.asarray(ds.images), fresh)
    assert not np.array_equal(np.asarray(ds.images)[0], old[0])
