"""Bad input on the index side: archive entries that cannot be walked, models without trained
weights, damaged manifests, filters that cannot match, output that could be forged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from index import persist
from index.engine import parse_filters
from index.errors import IndexCorruptError
from index.folder import IndexFolder
from index.ingest import ingest, walk
from tests.index.conftest import clustered
from tests.tiny_cxr import make_tiny_cxr
from ui.cli import _printable, main
from vlm.errors import ConfigError, RadLensError

DIM = 16


def _small_index(path: Path, n: int = 30) -> None:
    ix = IndexFolder.create(path, model_name="m", config_hash="c0ffee", dim=DIM)
    ix.add("image", clustered(n, DIM, seed=4),
           [{"modality": "CR", "year": 2000 + i % 5, "content_hash": f"{i:064x}"}
            for i in range(n)])
    ix.save()
    ix.close()


def test_walk_lists_what_it_cannot_read_and_follows_links_once(tmp_path, monkeypatch):
    root = tmp_path / "archive"
    (root / "a").mkdir(parents=True)
    (root / "a" / "one.dcm").write_bytes(b"x")
    (root / "a" / "loop").symlink_to(root)  # a link back to the top: walked once
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "two.dcm").write_bytes(b"y")
    (root / "linked").symlink_to(outside)  # a linked folder (a mount, say): followed
    (root / "broken.dcm").symlink_to(tmp_path / "gone.dcm")
    os.mkfifo(root / "pipe.dcm")  # reading it would wait forever
    (root / "locked").mkdir()
    (root / "locked" / "three.dcm").write_bytes(b"z")
    (root / "ds").mkdir()
    (root / "ds" / "four.dcm").write_bytes(b"w")
    (root / "ds" / "manifest.jsonl").write_text('{"file": "four.dcm"}\nnot json\n')
    real_scandir = os.scandir

    def scandir(path):  # root may read every folder: deny one the way a mount would
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems: list[dict[str, str]] = []
    found = [p.relative_to(root).as_posix() for p in walk(root, {}, problems)]
    assert found == ["a/one.dcm", "linked/two.dcm"]  # ds/ waits for its manifest's fix
    reasons = {Path(p["path"]).relative_to(root).as_posix(): p["reason"] for p in problems}
    assert reasons["broken.dcm"] == "broken symbolic link"
    assert reasons["pipe.dcm"].startswith("not a regular file (a FIFO")
    assert reasons["locked"] == "unreadable folder (Permission denied)"
    assert "not valid JSON" in reasons["ds/manifest.jsonl"]
    assert "not indexed until the manifest is fixed" in reasons["ds/manifest.jsonl"]
    assert len(problems) == 4
    # the volume walk follows the same rules and lists the same problems (it raised on the
    # damaged manifest, and passed the FIFO's and the links' rules through code of its own)
    from index.volumes import discover_volumes

    volumes, skipped = discover_volumes(root)
    assert volumes == []  # single files that are not NIfTI: no series of enough slices
    assert sorted((p["path"], p["reason"]) for p in skipped
                  if p["path"] != str(root / "a" / "one.dcm")
                  and p["path"] != str(root / "linked" / "two.dcm")) == sorted(
        (p["path"], p["reason"]) for p in problems)


def test_build_lists_walk_problems_once_and_refuses_an_empty_source(tiny_model, tmp_path,
                                                                    capsys):
    from vlm.inference import Encoder

    enc = Encoder(tiny_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(RadLensError, match="no image files to index"):
        ingest(enc, empty, tmp_path / "idx", progress=False, workers=0)
    assert not (tmp_path / "idx").exists(), "an empty source must not create an index"
    src = make_tiny_cxr(tmp_path / "src", n=4, size=64)
    (src / "manifest.jsonl").unlink()  # a plain folder: every file is walked
    os.mkfifo(src / "dicom" / "pipe.dcm")
    code = main(["index", "build", "--model", str(tiny_model), "--source", str(src),
                 "--out", str(tmp_path / "idx"), "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err.splitlines()
    assert code == 3  # finished; the FIFO is listed (was: the build hung reading it)
    assert [line for line in err if "pipe.dcm" in line] == [
        f"radlens: skipped: {src / 'dicom' / 'pipe.dcm'}: not a regular file (a FIFO, "
        "socket or device): not read"], err
    report = json.loads((tmp_path / "idx" / "ingest_report.json").read_text())
    assert report["added"] == 4 and len(report["failed"]) == 1
    code = main(["index", "build", "--model", str(tiny_model), "--source", "",
                 "--out", str(tmp_path / "idx2")])
    assert code == 2 and "an empty path" in capsys.readouterr().err
    assert not (tmp_path / "idx2").exists()


def test_a_config_name_is_no_model_for_an_index(tmp_path):
    from vlm.inference import Encoder

    # untrained, unseeded weights: an index of them could never be reopened or matched
    for name in ("lrclr-tiny", str(Path("vlm/model_configs/lrclr-tiny.json").resolve())):
        with pytest.raises(ConfigError, match="without trained weights: give a checkpoint"):
            Encoder(name)
    bad = tmp_path / "bad"
    bad.mkdir()
    for content in (b"garbage{", b"[1]", b"\xff\xfe"):  # was JSONDecodeError, AttributeError
        (bad / "config.json").write_bytes(content)
        with pytest.raises(ConfigError, match="not a model configuration"):
            Encoder(bad)


def test_a_model_mismatch_names_the_recorded_checkpoint_not_the_config_name(tmp_path):
    ix = IndexFolder.create(tmp_path / "ix", model_name="lrclr-r18", config_hash="aa",
                            dim=DIM, preprocessing={"model_path": "/models/run7/best"})
    ix.close()
    with pytest.raises(ConfigError) as info:
        IndexFolder.open(tmp_path / "ix", expect_model="lrclr-r18", expect_config_hash="bb")
    assert str(info.value).endswith("rebuild the index or pass --model /models/run7/best")


def test_filters_refuse_what_cannot_match_and_merge_repeated_values():
    assert parse_filters(["view=PA", "view=AP,PA", "year=2005-2010", "year_min=2005"]) == {
        "view": ["PA", "AP"], "year_min": 2005, "year_max": 2010}
    for items, message in [
        (["year_min=99999999999999999999"], "--filter year_min needs a year such as 2010"),
        (["year=0"], "--filter year needs a year such as 2010"),
        (["year=2010-2005"], "--filter year range 2010-2005 ends before it starts"),
        (["year_min=2012", "year_max=2010"], "--filter year range 2012-2010 ends before"),
        (["year_min=2001", "year_min=2002"], "--filter year_min: year_min is already 2001"),
        (["view=,"], "--filter view needs at least one value, got ','"),
    ]:
        with pytest.raises(RadLensError) as info:
            parse_filters(items)
        assert str(info.value).startswith(message), (items, str(info.value))


def test_search_says_when_nothing_matches_and_escapes_control_characters(
        tmp_path, capsys, monkeypatch):
    class Hit:
        def __init__(self, uri: str) -> None:
            from index.catalog import CatalogItem

            self.item = CatalogItem(id=1, collection="image", source_uri=uri)
            self.id, self.score, self.regions = 1, 0.5, []

        def to_dict(self) -> dict:
            return {"id": 1, "score": 0.5, "item": self.item.to_dict()}

    class FakeEngine:
        results: ClassVar[list] = []

        @classmethod
        def open(cls, *args, **kwargs):
            return cls()

        def search_text(self, *args, **kwargs):
            return self.results

    monkeypatch.setattr("index.engine.Engine", FakeEngine)
    assert main(["search", "--index", str(tmp_path), "--text", "effusion",
                 "--filter", "modality=MR"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ('radlens: no results: no indexed item matches the '
                                         'filters {"modality": "MR"}\n')
    FakeEngine.results = [Hit("evil\nradlens: forged line.dcm")]
    assert main(["search", "--index", str(tmp_path), "--text", "effusion"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].endswith("evil\\nradlens: forged line.dcm")
    assert _printable("plain – ünïcode") == "plain – ünïcode"


def test_an_os_error_with_a_file_name_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/archive/idx/LOCK")

    monkeypatch.setattr(IndexFolder, "open", denied)
    assert main(["index", "info", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "radlens: error: /archive/idx/LOCK: Permission denied\n"


def test_a_catalog_on_a_full_or_read_only_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import sqlite3

    for message in ("attempt to write a readonly database", "database or disk is full"):
        def failing(*args, message=message, **kwargs):
            raise sqlite3.OperationalError(message)

        monkeypatch.setattr(IndexFolder, "open", failing)
        assert main(["index", "info", str(tmp_path)]) == 2
        assert capsys.readouterr().err == (f"radlens: error: index catalog: {message} (check "
                                           "the index folder's permissions and free space)\n")

    def bug(*args, **kwargs):  # an SQL mistake stays an internal error
        raise sqlite3.OperationalError("near \"SELEC\": syntax error")

    monkeypatch.setattr(IndexFolder, "open", bug)
    assert main(["index", "info", str(tmp_path)]) == 1
    assert "internal error: OperationalError" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["files", "collections", "list", "entry"])
def test_a_damaged_manifest_is_one_line(tmp_path, damage):
    _small_index(tmp_path / "ix")
    gen = tmp_path / "ix" / persist.read_current(tmp_path / "ix")
    manifest = json.loads((gen / persist.MANIFEST).read_text())
    if damage == "list":
        manifest = [manifest]
    elif damage == "entry":
        manifest["files"][next(iter(manifest["files"]))] = "abc"
    else:
        del manifest[damage]
    (gen / persist.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="restore it or rebuild the index"):
        IndexFolder.open(tmp_path / "ix")


def test_current_naming_a_missing_generation_is_not_a_retry(tmp_path):
    _small_index(tmp_path / "ix")
    name = persist.read_current(tmp_path / "ix")
    (tmp_path / "ix" / name).rename(tmp_path / "ix" / "moved-away")
    with pytest.raises(IndexCorruptError, match=f"names generation {name}, which is missing"):
        IndexFolder.open(tmp_path / "ix")


def test_a_huge_k_on_a_small_index_costs_nothing(tmp_path):
    _small_index(tmp_path / "ix", n=30)
    ix = IndexFolder.open(tmp_path / "ix")
    try:
        # was: a million result slots allocated and looked up in the catalog per query
        (hits,) = ix.search("image", clustered(1, DIM, seed=9), k=1_000_000)
        assert len(hits) == 30 and len({h.id for h in hits}) == 30
        assert all(h.item is not None for h in hits)
        assert np.all(np.diff([h.score for h in hits]) <= 1e-6)
        (few,) = ix.search("image", clustered(1, DIM, seed=9), k=5, year_min=2004)
        assert len(few) == 5 and all(h.item.year == 2004 for h in few)
    finally:
        ix.close()


def test_binary_bytes_in_current_are_one_line(tmp_path):
    _small_index(tmp_path / "ix")
    (tmp_path / "ix" / persist.CURRENT).write_bytes(b"\xff\xfe")  # a UnicodeDecodeError
    with pytest.raises(IndexCorruptError, match="names no generation"):
        IndexFolder.open(tmp_path / "ix")


def test_pretrained_weights_that_are_no_weights_are_one_line(tmp_path):
    from vlm.models import create_model as build

    for name, content in (("plain.pt", b"hi\n"), ("cut.safetensors", b"\x08\x00\x00")):
        (tmp_path / name).write_bytes(content)  # the text file was an internal KeyError: 105
        with pytest.raises(ConfigError, match="not readable as model weights"):
            build("lrclr-tiny", pretrained=str(tmp_path / name))


def test_blank_and_tiny_images_are_listed_not_indexed_and_refused_as_queries(
        tiny_model, tmp_path, capsys):
    from PIL import Image

    src = make_tiny_cxr(tmp_path / "src", n=4, size=64)
    (src / "manifest.jsonl").unlink()  # a plain folder: every file is walked
    Image.new("L", (64, 64), 0).save(src / "zero_filled.png")
    Image.new("L", (8, 8), 200).save(src / "icon.png")
    idx = tmp_path / "idx"
    code = main(["index", "build", "--model", str(tiny_model), "--source", str(src),
                 "--out", str(idx), "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err.splitlines()
    assert code == 3  # finished, with files passed over
    report = json.loads((idx / "ingest_report.json").read_text())
    reasons = {Path(f["path"]).name: f["reason"] for f in report["failed"]}
    assert reasons == {
        "zero_filled.png": "blank (every pixel is 0): no image content: not indexed",
        "icon.png": "too small to read (8x8 pixels; at least 16 a side): not indexed"}
    assert report["added"] == 4
    assert sum("zero_filled.png" in line for line in err) == 1
    code = main(["search", "--index", str(idx), "--image", str(src / "zero_filled.png")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        f"radlens: error: {src / 'zero_filled.png'}: blank (every pixel is 0): no image "
        "content"]
