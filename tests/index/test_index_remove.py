"""``radlens index remove``: an erased patient, study or file leaves every byte of the index
folder (rows, vectors, regions, thumbnails, older generations), is not added back by a rerun
or a merge, and its ids are never handed out again; a raw identifier under another site
secret, or nothing matching, changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from index.folder import IndexFolder
from index.ingest import ingest
from index.merge import merge_indexes
from tests.index.conftest import PLAIN_N
from ui.cli import main
from vlm.inference import Encoder
from vlm.io.deid import default_pseudonymizer
from vlm.io.dicom_write import uid_from

N = PLAIN_N


@pytest.fixture
def archive(plain_archive) -> Path:
    return plain_archive


@pytest.fixture
def index(plain_index) -> Path:
    return plain_index


def _run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = main(["index", "remove", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def _rows(index: Path) -> dict[str, list]:
    with IndexFolder.open(index) as ix:
        cat = ix.catalog
        return {c: [it for it in cat.get_many(cat.filter_ids(c).tolist()) if it]
                for c in ("image", "region")}


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.fixture
def no_default_secure_delete(monkeypatch):
    """SQLite as most builds ship it: Debian's turns secure delete on by default, which would
    hide deleted rows' bytes left in free pages here."""
    import sqlite3

    import index.catalog

    connect = sqlite3.connect

    def insecure(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.execute("PRAGMA secure_delete=OFF")
        return db

    monkeypatch.setattr(index.catalog.sqlite3, "connect", insecure)


def test_an_erased_patient_leaves_no_trace_and_stays_out(index, archive, tiny_model, capsys,
                                                         no_default_secure_delete):
    patient = default_pseudonymizer()("pt", "P003")
    before = _rows(index)
    target = next(it for it in before["image"] if it.extra.get("patient") == patient)
    study = target.study
    regions = [r for r in before["region"] if r.extra["parent"] == target.id]
    assert regions and (index / target.thumbnail).is_file()
    with IndexFolder.open(index) as ix:
        vector = ix.collection("image").vectors([target.id])[0]
    assert study.encode() in _all_bytes(index)

    code, report, err = _run(capsys, str(index), "--patient", "P003")
    assert code == 0, err
    assert report["matched"] == {"image": 1, "region": len(regions)}
    assert report["removed"] == 1 + len(regions) and report["files_deleted"] == 1
    assert report["withheld"] == 2  # its content hash and instance pseudonym
    after = _rows(index)
    assert len(after["image"]) == N - 1 and target.id not in {it.id for it in after["image"]}
    assert len(after["region"]) == len(before["region"]) - len(regions)
    assert not (index / target.thumbnail).exists()
    with IndexFolder.open(index) as ix:
        coll = ix.collection("image")
        assert coll.dead == 0 and len(coll) == N - 1  # compacted: the vector left the arrays
        stored = coll.vectors(coll.ids())
        assert not (stored == vector).all(axis=1).any()
        assert ix.collection("region").dead == 0
    generations = [p for p in index.iterdir() if p.is_dir() and p.name.startswith("gen")]
    assert len(generations) == 1, generations  # the older ones held the patient
    everything = _all_bytes(index)
    assert study.encode() not in everything and patient.encode() not in everything

    again = ingest(Encoder(tiny_model), archive, index, workers=0, progress=False)
    assert (again.added, again.withheld, again.already_indexed) == (0, 1, N - 1)
    code = main(["index", "info", str(index)])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["withheld"] == {"hash": 1, "instance": 1,
                                                               "series": 0}


def test_allow_readd_lets_a_rerun_add_it_back(index, archive, tiny_model, capsys):
    code, report, _ = _run(capsys, str(index), "--patient", "P004", "--allow-readd")
    assert code == 0 and report["withheld"] == 0 and report["removed"] >= 1
    again = ingest(Encoder(tiny_model), archive, index, workers=0, progress=False)
    assert (again.added, again.withheld) == (1, 0)


def test_by_study_uid_by_file_dry_run_and_nothing_matching(index, archive, capsys):
    with IndexFolder.open(index) as ix:
        gen = ix.generation
    code, report, _ = _run(capsys, str(index), "--study", uid_from("tiny", 5), "--dry-run")
    assert code == 0 and report["dry_run"] and report["matched"]["image"] == 1
    assert report["removed"] == 0
    with IndexFolder.open(index) as ix:
        assert ix.generation == gen  # untouched
    one = sorted(archive.glob("*.dcm"))[2]
    code, report, err = _run(capsys, str(index), "--file", str(one), "--study",
                             "st-" + "0" * 20)
    assert code == 3 and report["matched"]["image"] == 1 and report["removed"] >= 1
    assert err.strip() == f"radlens: matched nothing: study st-{'0' * 20}"
    assert len(_rows(index)["image"]) == N - 1
    code, report, err = _run(capsys, str(index), "--patient", "NOBODY")
    assert code == 3 and report["removed"] == 0 and "NOBODY" not in err  # by pseudonym
    assert report["generation"] is None


def test_refusals_change_nothing(index, capsys, monkeypatch):
    with IndexFolder.open(index) as ix:
        gen = ix.generation
    for args, says in [((), "nothing to remove"),
                       (("--study", "se-" + "1" * 20), "is a se- pseudonym, not a st- one"),
                       (("--file", str(index / "no_such.dcm")), "no such file or folder")]:
        code, report, err = _run(capsys, str(index), *args)
        assert code == 2 and report is None and says in err and len(err.splitlines()) == 1
    monkeypatch.setenv("RADLENS_SITE_SECRET", "another-site-secret-0123456789abcdef")
    code, _, err = _run(capsys, str(index), "--patient", "P001")
    assert code == 2 and "another site secret" in err and "P001" not in err
    with IndexFolder.open(index) as ix:
        assert ix.generation == gen and ix.catalog.count("image") == N


def test_erased_ids_are_never_reused_and_a_merge_does_not_bring_them_back(index, tmp_path,
                                                                          capsys):
    shard = tmp_path / "old_copy"
    shutil.copytree(index, shard)  # a copy from before the erasure
    with IndexFolder.open(index) as ix:
        top = max(ix.catalog.filter_ids("image").tolist())
        last = ix.catalog.get(top)
        high = ix.catalog.next_id()
    code, _, _ = _run(capsys, str(index), "--instance", last.instance)
    assert code == 0
    with IndexFolder.open(index, mode="w") as ix:
        assert ix.catalog.next_id() == high  # the erased ids stay used
        got = ix.add("image", np.ones((1, ix.manifest["dim"]), np.float32),
                     [{"instance": "im-" + "a" * 20, "content_hash": "f" * 64}])
        assert int(got[0]) == high
        ix.save()
    report = merge_indexes([shard], index, progress=False)
    assert report.withheld == 1 and report.added.get("image", 0) == 0
    assert last.id not in {it.id for it in _rows(index)["image"]}
    assert last.instance not in {it.instance for it in _rows(index)["image"]}


def test_a_rerun_deletes_what_a_killed_run_left_behind(index, capsys):
    """Files are deleted after the save; a run killed in between leaves them unreferenced,
    and the next run (here one that matches nothing) deletes them, and only them."""
    orphan = index / "thumbs" / "zz" / ("0" * 64 + ".jpg")
    orphan.parent.mkdir()
    orphan.write_bytes(b"\xff\xd8 a thumbnail of an erased study")
    kept = {p for p in (index / "thumbs").rglob("*") if p.is_file()} - {orphan}
    assert len(kept) == N
    code, report, _ = _run(capsys, str(index), "--study", "st-" + "0" * 20)
    assert code == 3 and report["removed"] == 0 and report["files_deleted"] == 1
    assert not orphan.exists() and all(p.is_file() for p in kept)
    code, report, _ = _run(capsys, str(index), "--study", "st-" + "0" * 20, "--dry-run")
    assert report["files_deleted"] == 0  # a dry run deletes nothing
