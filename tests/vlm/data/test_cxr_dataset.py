"""CXRDataset: unreadable images, --workers 0 and negative, a cache that follows its files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_cxr import make_tiny_cxr
from vlm.data import cxr_dataset
from vlm.data.cxr_dataset import CXRDataset
from vlm.data.manifest import read_jsonl
from vlm.errors import RadLensError
from vlm.models.config import PreprocessConfig

PRE = PreprocessConfig(image_size=32)


def _break_two(root: Path) -> tuple[str, str]:
    """Make one train row's file garbage and another's missing; returns their files."""
    rows = [r for r in read_jsonl(root / "manifest.jsonl") if r["split"] == "train"]
    garbage, missing = rows[1]["file"], rows[3]["file"]
    (root / garbage).write_bytes(b"not a dicom " * 50)
    (root / missing).unlink()
    return garbage, missing


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_left_out_with_one_warning(tmp_path, caplog, workers):
    """A garbage or missing .dcm broke the decode pool (ImageReadError did not unpickle):
    'internal error: BrokenProcessPool'. The rows are now left out, named in one warning."""
    root = make_tiny_cxr(tmp_path / "d", n=10, size=48)
    garbage, missing = _break_two(root)
    with caplog.at_level(logging.WARNING, logger="vlm.data.cxr_dataset"):
        ds = CXRDataset(root, "train", PRE, workers=workers)
    assert len(ds) == 4 == len(ds.texts) == len(ds.images)
    assert [s["file"] for s in ds.skipped] == [garbage, missing]
    assert "not a DICOM file" in ds.skipped[0]["reason"]
    assert ds.skipped[1]["reason"] == "no such file"
    assert garbage not in {r["file"] for r in ds.rows}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and garbage in warnings[0] and missing in warnings[0]
    assert "2 of 6 images" in warnings[0]
    # images, rows and texts stay aligned: each kept row's image is its own file's
    fresh = CXRDataset(root, "train", PRE, workers=0)  # from the cache: same rows left out
    assert fresh.skipped == ds.skipped and fresh.rows == ds.rows
    np.testing.assert_array_equal(np.asarray(fresh.images), np.asarray(ds.images))
    one = cxr_dataset._load_one((str(root / ds.rows[2]["file"]), vars(PRE)))[0]
    np.testing.assert_array_equal(np.asarray(ds.images[2]), one)


def test_a_split_with_no_readable_image_is_one_line(tmp_path):
    root = make_tiny_cxr(tmp_path / "d", n=10, size=48)
    for r in read_jsonl(root / "manifest.jsonl"):
        if r["split"] == "val":
            (root / r["file"]).write_bytes(b"junk")
    with pytest.raises(RadLensError, match="none of the 2 images of this split can be read"):
        CXRDataset(root, "val", PRE, workers=0)


def test_an_unknown_split_names_the_splits_there_are(tmp_path):
    root = make_tiny_cxr(tmp_path / "d", n=10, size=48)
    with pytest.raises(RadLensError, match=r"no rows in split \['tset'\] \(its splits: "
                                           r"test, train, val\)$"):
        CXRDataset(root, "tset", PRE, workers=0)


def test_workers_zero_decodes_in_this_process_and_negative_is_refused(tmp_path, monkeypatch):
    """``workers or cpu_count()`` made 0 mean all cores."""
    root = make_tiny_cxr(tmp_path / "d", n=10, size=48)

    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started for workers=0")

    monkeypatch.setattr(cxr_dataset, "ProcessPoolExecutor", no_pool)
    assert len(CXRDataset(root, "train", PRE, workers=0)) == 6
    for bad in (-1, -8):
        with pytest.raises(RadLensError, match=f"--workers must be 0 .* got {bad}"):
            CXRDataset(root, "val", PRE, workers=bad)


def test_cached_images_follow_their_files(tmp_path):
    """The cache was keyed by file names and settings only: images rewritten under the same
    names (PhantomCXR regenerated at another --size) were served from the old cache."""
    root = tmp_path / "d"
    make_tiny_cxr(root, n=10, size=48, seed=0)
    first = np.array(CXRDataset(root, "train", PRE, workers=0).images)
    make_tiny_cxr(root, n=10, size=96, seed=1)  # same file names, other pixels and sizes
    again = np.array(CXRDataset(root, "train", PRE, workers=0).images)
    assert not np.array_equal(first, again)
    expect = [cxr_dataset._load_one((str(root / r["file"]), vars(PRE)))[0]
              for r in read_jsonl(root / "manifest.jsonl") if r["split"] == "train"]
    np.testing.assert_array_equal(again, np.stack(expect))
    # same size, other modification time (a rewrite with the same byte count) is decoded too
    row = next(r for r in read_jsonl(root / "manifest.jsonl") if r["split"] == "train")
    other = next(r for r in read_jsonl(root / "manifest.jsonl") if r["split"] == "val")
    (root / row["file"]).write_bytes((root / other["file"]).read_bytes())
    os.utime(root / row["file"], ns=(1, 1))
    third = np.array(CXRDataset(root, "train", PRE, workers=0).images)
    np.testing.assert_array_equal(
        third[0], cxr_dataset._load_one((str(root / other["file"]), vars(PRE)))[0])
    assert json.loads(next((root / ".cache").glob("images-*.skipped.json")).read_text()) == []
