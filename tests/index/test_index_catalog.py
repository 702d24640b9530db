from __future__ import annotations

import sqlite3

import pytest

from index.catalog import Catalog, CatalogItem
from vlm.errors import RadLensError


def _items() -> list[CatalogItem]:
    rows = []
    for i in range(40):
        rows.append(CatalogItem(
            id=1000 + i, collection="image" if i < 30 else "region",
            source_uri=f"file:///archive/{i}.dcm", study=f"st-{i // 4:020x}",
            series=f"se-{i // 2:020x}", instance=f"im-{i:020x}",
            modality=["CR", "CT", "MR"][i % 3], body_part=["CHEST", "HEAD"][i % 2],
            view=["PA", "AP", "LATERAL", None][i % 4], year=2000 + i % 20, rows=512, cols=512,
            box=(1.0, 2.0, 30.0, 40.0) if i >= 30 else None, thumbnail=f"thumbs/{i}.png",
            model="lrclr", content_hash=f"{i % 35:064x}", extra={"note": i}))
    return rows


@pytest.fixture
def cat(tmp_path):
    c = Catalog(tmp_path / "cat.sqlite")
    c.add(_items())
    yield c
    c.close()


def test_wal_mode_and_roundtrip(cat, tmp_path):
    mode = sqlite3.connect(tmp_path / "cat.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"
    got = cat.get(1031)
    assert got is not None and got.box == (1.0, 2.0, 30.0, 40.0) and got.extra == {"note": 31}
    assert got.collection == "region" and got.ingested_at > 0
    assert cat.get(5) is None
    many = cat.get_many([1002, -1, 7, 1001])
    assert [m.id if m else None for m in many] == [1002, None, None, 1001]
    assert cat.count() == 40 and cat.counts() == {"image": 30, "region": 10}
    assert cat.next_id() == 1040


def test_dedupe_lookups(cat):
    assert sorted(i.id for i in cat.find_by_hash(f"{3:064x}")) == [1003, 1038]
    assert [i.id for i in cat.find_by_hash(f"{3:064x}", collection="image")] == [1003]
    assert cat.find_by_hash(f"{3:064x}", model="other") == []
    assert [i.id for i in cat.find_by_instance(f"im-{7:020x}")] == [1007]
    assert cat.content_hashes() == {f"{i:064x}" for i in range(35)}
    assert len(cat.content_hashes("region")) == 10


def test_filters(cat):
    items = {it.id: it for it in _items()}
    ids = cat.filter_ids("image", modality="cr", body_part="CHEST", year_min=2005, year_max=2015)
    want = [i for i, it in items.items() if it.collection == "image" and it.modality == "CR"
            and it.body_part == "CHEST" and 2005 <= (it.year or 0) <= 2015]
    assert ids.tolist() == sorted(want) and len(want) > 0
    ids = cat.filter_ids(view=["PA", "AP"])
    assert ids.tolist() == sorted(i for i, it in items.items() if it.view in ("PA", "AP"))
    assert cat.filter_ids().tolist() == sorted(items)


def test_add_remove_upsert(cat):
    with pytest.raises(RadLensError, match="already present"):
        cat.add([CatalogItem(id=1000, collection="image")])
    assert cat.remove([1000, 999]) == 1
    cat.upsert([CatalogItem(id=1001, collection="image", modality="US")])
    assert cat.get(1001).modality == "US" and cat.get(1000) is None


def test_raw_uid_refused(tmp_path):
    c = Catalog(tmp_path / "c.sqlite")
    with pytest.raises(RadLensError) as err:
        c.add([CatalogItem(id=1, collection="image", study="1.2.840.113619.2.55.3.604688119")])
    assert "raw DICOM UID" in str(err.value) and "\n" not in str(err.value)
    assert c.count() == 0


def test_snapshot_is_self_contained_and_readonly(cat, tmp_path):
    snap = tmp_path / "snap.sqlite"
    cat.snapshot_to(snap)
    ro = Catalog(snap, readonly=True)
    assert ro.count() == 40 and ro.get(1010).modality == cat.get(1010).modality
    with pytest.raises(RadLensError, match="read-only"):
        ro.remove([1000])
    ro.close()
    assert not (tmp_path / "snap.sqlite-wal").exists()
