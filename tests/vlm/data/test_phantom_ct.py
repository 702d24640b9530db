from __future__ import annotations

import hashlib
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from vlm.data.manifest import read_jsonl, split_for
from vlm.data.phantom_ct import (
    LOCATION_CLASSES,
    emphysema_class,
    emphysema_score,
    from_body_frame,
    generate_phantom_ct,
    make_contact_sheet,
    patch_centres,
    to_body_frame,
)
from vlm.data.phantom_ct.coords import body_frame
from vlm.data.phantom_ct.endpoints import simulate_survival
from vlm.data.phantom_ct.geometry import make_grid
from vlm.data.phantom_ct.render import render_volume
from vlm.data.phantom_ct.tissues import HU_RANGES, Tissue, body_mask

SHAPE = (64, 64, 56)  # anisotropic on purpose: (Z, Y, X)
N = 3

# Host tissues allowed under each location class (checked against the internal organ map).
HOST_TISSUES = {
    "lung": {Tissue.LUNG},
    "liver": {Tissue.LIVER},
    "kidney": {Tissue.KIDNEY},
    "bone": {Tissue.CORTICAL_BONE, Tissue.CANCELLOUS_BONE},
    "mediastinum": {Tissue.MEDIASTINAL_FAT},
    "abdomen": {Tissue.ABDOMINAL_FAT, Tissue.BOWEL},
    "pelvis": {Tissue.ABDOMINAL_FAT, Tissue.BOWEL},
    "soft_tissue": {Tissue.SUBCUT_FAT, Tissue.MUSCLE},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], dict]:
    out = tmp_path_factory.mktemp("pct")
    summary = generate_phantom_ct(out, n=N, shape=SHAPE, seed=7, workers=2)
    return out, list(read_jsonl(out / "manifest.jsonl")), summary


@pytest.fixture(scope="module")
def rendered() -> list:
    grid = make_grid((72, 72, 72))
    return [render_volume(grid, seed=3, index=i) for i in range(5)]


def _nifti_zyx(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)


def _read_dicom_hu(folder: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Independent read-back with pydicom: sort by IPP z, apply the modality LUT."""
    dss = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    for d in dss:
        assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert d.Modality == "CT" and d.PatientID.startswith("PCT-")
    vol = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope)
                    + float(d.RescaleIntercept) for d in dss])
    dz = float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2])
    dy, dx = (float(v) for v in dss[0].PixelSpacing)
    assert dss[0].pixel_array.dtype == np.uint16 and float(dss[0].RescaleIntercept) == -1024
    return vol, (dz, dy, dx)


def test_layout_manifest_and_summary(dataset):
    out, rows, summary = dataset
    assert len(rows) == N and summary["n_volumes"] == N
    assert summary["volumes_per_s"] > 0 and (out / "summary.json").exists()
    for row in rows:
        assert row["shape"] == list(SHAPE)
        assert len(list((out / row["dicom_dir"]).glob("*.dcm"))) == SHAPE[0]
        for rel in (row["nifti"], row["masks"]["lesions"], row["masks"]["lung"]):
            assert (out / rel).exists()
        assert row["split"] == split_for(row["patient_id"], 7)
        assert set(row["location_labels"]) == set(LOCATION_CLASSES)
        assert sum(row["location_labels"].values()) == len({les["location"]
                                                            for les in row["lesions"]})
        assert len(row["slice_flags"]) == SHAPE[0]
        assert row["time"] > 0 and row["event"] in (0, 1)
        assert row["emphysema_class"] == emphysema_class(row["emphysema_score"])


def test_dicom_matches_nifti_and_spacing(dataset):
    out, rows, _ = dataset
    row = rows[0]
    hu, spacing = _read_dicom_hu(out / row["dicom_dir"])
    nii = _nifti_zyx(out / row["nifti"])
    assert nii.shape == SHAPE
    np.testing.assert_array_equal(hu, nii.astype(np.float32))
    np.testing.assert_allclose(spacing, row["spacing"], atol=1e-4)
    img = nib.load(str(out / row["nifti"]))
    np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), row["spacing"][::-1],
                               atol=1e-4)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # i: R->L, j: A->P, k: I->S


def test_reader_roundtrip_when_available(dataset):
    vio = pytest.importorskip("vlm.io")
    if not hasattr(vio, "read_series"):
        pytest.skip("vlm.io.read_series not available yet")
    out, rows, _ = dataset
    row = rows[1]
    vol = vio.read_series(out / row["dicom_dir"])
    nii = vio.read_nifti(out / row["nifti"])
    ref = _nifti_zyx(out / row["nifti"]).astype(np.float32)
    np.testing.assert_array_equal(vol.array, ref)
    np.testing.assert_array_equal(nii.array, ref)
    np.testing.assert_allclose(vol.spacing, row["spacing"], atol=1e-4)
    np.testing.assert_allclose(vol.affine, nii.affine, atol=1e-3)


def test_lesion_boxes_and_slice_annotations_match_masks(dataset):
    out, rows, _ = dataset
    n_seen = 0
    for row in rows:
        lesions = _nifti_zyx(out / row["masks"]["lesions"])
        hu = _nifti_zyx(out / row["nifti"]).astype(np.float64)
        assert int(lesions.max()) == len(row["lesions"])
        for les in row["lesions"]:
            n_seen += 1
            m = lesions == les["label"]
            z0, y0, x0, z1, y1, x1 = les["box"]
            inside = np.zeros_like(m)
            inside[z0:z1, y0:y1, x0:x1] = True
            assert m.sum() == les["n_voxels"] > 0 and not (m & ~inside).any()
            # the box is tight: every face touches the lesion
            assert m[z0].any() and m[z1 - 1].any() and m[:, y0].any() and m[:, y1 - 1].any()
            assert m[:, :, x0].any() and m[:, :, x1 - 1].any()
            assert les["location"] in LOCATION_CLASSES
            assert 5.0 <= les["diameter_mm"] <= 30.0
            assert les["mean_hu"] == pytest.approx(hu[m].mean(), abs=0.06)
            assert all(-1.0 <= v <= 1.0 for v in les["centre_body_frame"])
        any_lesion = lesions > 0
        flags = [int(v) for v in any_lesion.any(axis=(1, 2))]
        assert flags == row["slice_flags"]
        for k in np.flatnonzero(flags):
            boxes = row["slice_boxes"][str(k)]
            labels = row["slice_box_labels"][str(k)]
            assert labels == sorted(set(np.unique(lesions[k])) - {0})
            for (b0, b1, b2, b3), lab in zip(boxes, labels, strict=True):
                m2 = lesions[k] == lab
                ys, xs = np.nonzero(m2)
                assert [b0, b1, b2, b3] == [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
        assert set(row["slice_boxes"]) == {str(k) for k in np.flatnonzero(flags)}
    assert n_seen > 0


def test_lesions_lie_inside_their_host(rendered):
    n = 0
    for vol in rendered:
        for les in vol.lesions:
            allowed = {int(t) for t in HOST_TISSUES[les["location"]]}
            under = set(np.unique(vol.labels[vol.lesion_map == les["label"]]).tolist())
            assert under <= allowed, (les["location"], under)
            n += 1
    assert n >= 3


def test_tissue_hu_in_real_ranges(rendered):
    for vol in rendered[:2]:
        for tissue, (lo, hi) in HU_RANGES.items():
            core = ndimage.binary_erosion(vol.labels == tissue) & (vol.lesion_map == 0)
            if core.sum() < 30:
                continue
            med = float(np.median(vol.hu[core]))
            assert lo <= med <= hi, (tissue.name, med)
        cortical = vol.hu[vol.labels == Tissue.CORTICAL_BONE]
        assert np.percentile(cortical, 90) > 700
        assert np.median(vol.hu[vol.labels == Tissue.AIR]) < -950


def test_emphysema_score_recomputed_from_files(dataset):
    out, rows, _ = dataset
    for row in rows:
        hu = _nifti_zyx(out / row["nifti"])
        lung = _nifti_zyx(out / row["masks"]["lung"]).astype(bool)
        assert lung.sum() > 0
        assert emphysema_score(hu, lung) == pytest.approx(row["emphysema_score"], abs=1e-3)


def test_emphysema_reaches_target_class(rendered):
    hits = sum(v.info["emphysema_class"] == v.info["emphysema_target_class"] for v in rendered)
    assert hits >= len(rendered) - 1


def test_determinism_and_worker_independence(dataset, tmp_path):
    out, rows, _ = dataset
    generate_phantom_ct(tmp_path / "a", n=2, shape=SHAPE, seed=7, workers=1)
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == b"".join(lines[:2])
    for row in rows[:2]:
        for rel in (row["nifti"], row["masks"]["lesions"], f"{row['dicom_dir']}/0010.dcm"):
            assert _digest(out / rel) == _digest(tmp_path / "a" / rel), rel
    generate_phantom_ct(tmp_path / "b", n=1, shape=SHAPE, seed=8, workers=1)
    other = next(read_jsonl(tmp_path / "b" / "manifest.jsonl"))
    assert other["patient_id"] != rows[0]["patient_id"]
    assert not np.array_equal(_nifti_zyx(out / rows[0]["nifti"]),
                              _nifti_zyx(tmp_path / "b" / other["nifti"]))


def _digest(path: Path) -> str:
    if path.suffix == ".dcm":
        return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()
    return hashlib.sha256(_nifti_zyx(path).tobytes()).hexdigest()


def test_body_frame_is_consistent_across_subjects(rendered):
    liver_uvw = []
    for vol in rendered:
        frame = body_frame(body_mask(vol.labels), vol.lung)
        liver = np.argwhere(vol.labels == Tissue.LIVER).mean(axis=0)
        liver_uvw.append(to_body_frame(liver, frame))
        centres = patch_centres(vol.hu.shape, 16)
        uvw = to_body_frame(centres, frame)
        assert uvw.min() >= -1.0 and uvw.max() <= 1.0
        raw = to_body_frame(centres, frame, clip=False)
        np.testing.assert_allclose(from_body_frame(raw, frame), centres, atol=1e-9)
    uvw = np.asarray(liver_uvw)
    assert uvw[:, 2].max() < 0.0  # liver on the patient's right
    assert np.all(uvw.std(axis=0) < 0.12), uvw


def test_survival_depends_on_burden():
    rng = np.random.default_rng(0)
    low = [simulate_survival(0.0, 0, rng) for _ in range(400)]
    high = [simulate_survival(35.0, 3, rng) for _ in range(400)]
    assert np.mean([e for _, e in high]) > np.mean([e for _, e in low]) + 0.2
    assert np.median([t for t, _ in high]) < np.median([t for t, _ in low])


def test_contact_sheet(dataset, tmp_path):
    out, _, _ = dataset
    png = make_contact_sheet(out, tmp_path / "sheet.png", max_volumes=2)
    assert png.stat().st_size < 1_500_000
    with Image.open(png) as im:
        assert im.size[0] > 600 and im.size[1] > 300


def test_regenerating_into_a_used_folder_leaves_nothing_stale(tmp_path):
    """A second run into the same folder with fewer, shorter volumes left the first run's
    extra slices in each series folder, its extra volumes and masks, and cached HU arrays
    (keyed by volume id only) that training then read instead of the new volumes."""
    from vlm.data.ct_dataset import CTDataset
    from vlm.io import read_series

    root = tmp_path / "pct"
    generate_phantom_ct(root, n=3, shape=(24, 20, 20), seed=1, workers=1)
    rows = list(read_jsonl(root / "manifest.jsonl"))
    CTDataset(root).content_hash(0)  # fills .cache/volumes for volume 0
    assert (root / ".cache" / "volumes" / f"{rows[0]['volume_id']}.npy").is_file()
    (root / "notes.txt").write_text("mine")  # files of the user's own are left alone
    (root / "dicom" / "README").write_text("mine")
    generate_phantom_ct(root, n=2, shape=(16, 20, 20), seed=1, workers=1)
    new = list(read_jsonl(root / "manifest.jsonl"))
    assert [r["volume_id"] for r in new] == [r["volume_id"] for r in rows[:2]]
    assert len(list((root / new[0]["dicom_dir"]).iterdir())) == 16
    assert read_series(root / new[0]["dicom_dir"]).shape == (16, 20, 20)
    for rel in (rows[2]["dicom_dir"], rows[2]["nifti"], rows[2]["masks"]["lung"]):
        assert not (root / rel).exists(), rel
    assert not (root / ".cache" / "volumes" / f"{rows[0]['volume_id']}.npy").exists()
    ds = CTDataset(root)
    assert ds.volume(0).shape == (16, 20, 20)
    np.testing.assert_array_equal(ds.volume(0), _nifti_zyx(root / new[0]["nifti"]))
    assert (root / "notes.txt").read_text() == "mine"
    assert (root / "dicom" / "README").read_text() == "mine"


def test_a_cached_volume_is_not_used_once_its_file_changed(tmp_path):
    """The HU cache is checked against its NIfTI file's size and modification time, so a
    volume replaced by other pixels under the same id is read again, and its content hash (the
    key of the slice-embedding cache) follows."""
    import os
    import shutil

    from vlm.data.ct_dataset import CTDataset

    root = tmp_path / "pct"
    generate_phantom_ct(root, n=2, shape=(16, 20, 20), seed=2, workers=1)
    ds = CTDataset(root)
    first, hash0, hash1 = np.array(ds.volume(0)), ds.content_hash(0), ds.content_hash(1)
    assert CTDataset(root).content_hash(0) == hash0  # unchanged file: the cache is used
    nifti0 = root / ds.rows[0]["nifti"]
    shutil.copyfile(root / ds.rows[1]["nifti"], nifti0)
    os.utime(nifti0, ns=(1, 1))  # a different stamp even on a coarse clock
    again = CTDataset(root)
    assert not np.array_equal(np.asarray(again.volume(0)), first)
    np.testing.assert_array_equal(again.volume(0), again.volume(1))
    assert again.content_hash(0) == hash1 != hash0


def test_bad_phantom_ct_arguments_are_one_line(tmp_path, capsys):
    """``--seed -1`` died in numpy's SeedSequence and ``--out`` naming a plain file in mkdir,
    both as internal errors."""
    from ui.cli import main

    plain = tmp_path / "file"
    plain.write_text("x")
    for args, expect in ((["--out", str(tmp_path / "a"), "--seed", "-1"], "non-negative"),
                         (["--out", str(plain)], "is a file, not a folder")):
        capsys.readouterr()
        assert main(["data", "phantom-ct", "--n", "1", "--shape", "16,16,16", "--workers", "1",
                     "--no-contact-sheet", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert plain.read_text() == "x" and not (tmp_path / "a").exists()


def test_a_phantom_cxr_folder_given_to_the_ct_recipes_is_one_line(tmp_path, capsys):
    """``train drasclr``, ``train lecl`` and ``eval-volumes`` on a PhantomCXR folder died in
    CTDataset with an internal KeyError: 'volume_id' (or 'shape')."""
    from tests.tiny_cxr import make_tiny_cxr
    from ui.cli import main
    from vlm.data.ct_dataset import CTDataset
    from vlm.data.manifest import write_jsonl
    from vlm.errors import ConfigError

    cxr = make_tiny_cxr(tmp_path / "cxr", n=4, size=48)
    for args in (["train", "drasclr", "--data", str(cxr), "--out", str(tmp_path / "a")],
                 ["train", "lecl", "--data", str(cxr), "--out", str(tmp_path / "b")],
                 ["eval-volumes", "--data", str(cxr), "--out", str(tmp_path / "c")]):
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"radlens: error: {cxr} is not a PhantomCT folder (manifest rows have "
                       "no volume_id); generate one with 'radlens data phantom-ct --out DIR'"]
    assert not (tmp_path / "c").exists()
    pct = tmp_path / "pct"
    pct.mkdir()
    good = {"volume_id": "pct_s0_00000", "split": "train", "nifti": "nifti/x.nii.gz",
            "shape": [4, 4, 4]}
    for rows, expect in (
            ([good, {k: v for k, v in good.items() if k != "shape"}],
             "is not a PhantomCT folder (manifest row 2 has no shape)"),
            ([{**good, "shape": [4, 4]}], "has shape [4, 4], not three positive voxel counts")):
        write_jsonl(pct / "manifest.jsonl", rows)
        with pytest.raises(ConfigError, match=re.escape(expect)):
            CTDataset(pct)
