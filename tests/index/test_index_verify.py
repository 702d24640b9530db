"""``radlens index verify``: a whole index passes; a row without its vector, a vector without
its row, a region without its image, a missing thumbnail each fail it (exit 3, one stderr line
each) without changing anything; a stray file is counted, not failed; a damaged file is the
usual one-line checksum error."""

from __future__ import annotations

import json

from index.folder import IndexFolder
from tests.index.conftest import PLAIN_N
from ui.cli import main


def _verify(capsys, index) -> tuple[int, dict | None, list[str]]:
    code = main(["index", "verify", str(index)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err.splitlines()


def test_a_whole_index_passes_and_a_stray_file_is_only_counted(plain_index, capsys):
    stray = plain_index / "thumbs" / "zz" / "left_by_a_killed_build.jpg"
    stray.parent.mkdir()
    stray.write_bytes(b"\xff\xd8")
    code, report, err = _verify(capsys, plain_index)
    assert code == 0 and report["ok"] and err == [] and report["problems"] == []
    image = report["collections"]["image"]
    assert image["rows"] == image["vectors"] == image["faiss_rows"] == PLAIN_N
    assert image["rows_without_vector"] == image["vectors_without_row"] == 0
    assert report["collections"]["region"]["rows"] > 0 and report["orphan_regions"] == 0
    assert report["missing_files"] == 0 and report["unreferenced_files"] == 1


def test_each_kind_of_damage_is_reported_and_nothing_changes(plain_index, capsys):
    with IndexFolder.open(plain_index, mode="w") as ix:
        cat, image = ix.catalog, ix.collection("image")
        a, b, c = cat.filter_ids("image").tolist()[:3]
        image.remove([a])  # a row left without its vector
        cat.remove([b])  # a vector left without its row, and b's regions without an image
        lost = cat.get(c).thumbnail
        ix.save()
        gen = ix.generation
    (plain_index / lost).unlink()
    regions_of_b = 0
    with IndexFolder.open(plain_index) as ix:
        regions_of_b = len(ix.catalog.children([b]))
    code, report, err = _verify(capsys, plain_index)
    assert code == 3 and not report["ok"]
    assert report["collections"]["image"]["rows_without_vector"] == 1
    assert report["collections"]["image"]["vectors_without_row"] == 1
    assert report["orphan_regions"] == regions_of_b > 0 and report["missing_files"] == 1
    assert len(err) == len(report["problems"]) == 4
    assert all(line.startswith("radlens: index problem: ") for line in err)
    assert any(f"ids [{a}]" in line for line in err) and any(lost in line for line in err)
    with IndexFolder.open(plain_index) as ix:
        assert ix.generation == gen  # read-only


def test_a_damaged_file_is_the_checksum_error(plain_index, capsys):
    with IndexFolder.open(plain_index) as ix:
        target = plain_index / ix.generation / "image.ids.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    code, report, err = _verify(capsys, plain_index)
    assert code == 2 and report is None and len(err) == 1 and "checksum" in err[0]
