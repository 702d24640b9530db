"""A collection filled by another model than the folder's (the ``volume`` collection): its
identity in the manifest, add / remove / save / reload, refusal of a wrong model, old folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index import persist
from index.folder import CollectionModel, IndexFolder
from tests.index.conftest import clustered
from vlm.errors import ConfigError, RadLensError

DIM, VDIM = 32, 16
VOL = CollectionModel("lecl-tiny", "vol0hash", VDIM, source="random:lecl-tiny@0")


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"modality": "CT", "content_hash": f"{start + i:064x}",
             "extra": {"labels": ["liver_lesion"] if i % 3 == 0 else []}} for i in range(n)]


def _mixed(path: Path) -> IndexFolder:
    ix = IndexFolder.create(path, model_name="lrclr", config_hash="abc123", dim=DIM)
    ix.add("image", clustered(50, DIM, seed=1), _rows(50))
    ix.add("volume", clustered(20, VDIM, seed=2), _rows(20, 50), model=VOL)
    ix.save()
    return ix


def test_volume_collection_round_trip_with_its_own_model(tmp_path):
    ix = _mixed(tmp_path / "ix")
    q = clustered(3, VDIM, seed=3)
    assert ix.remove([52, 53]) == 2
    ix.add("volume", clustered(2, VDIM, seed=4), _rows(2, 900), model=VOL)
    before = [[(h.id, round(h.score, 5)) for h in row] for row in ix.search("volume", q, 4)]
    gen = ix.save()
    ix.close()

    r = IndexFolder.open(tmp_path / "ix", expect_model="lrclr", expect_config_hash="abc123")
    assert r.collections() == ["image", "volume"]
    assert r.collection_model("volume") == VOL  # the source is kept too
    assert r.collection_model("image") == CollectionModel("lrclr", "abc123", DIM)
    assert r.collection("volume", create=False).dim == VDIM and r.dim == DIM
    after = [[(h.id, round(h.score, 5)) for h in row] for row in r.search("volume", q, 4)]
    assert after == before
    assert not {52, 53} & {h.id for row in r.search("volume", q, 30) for h in row}
    assert len(r.collection("volume", create=False)) == 20
    assert r.catalog.get(51).model == "lecl-tiny" and r.catalog.get(0).model == "lrclr"
    meta = json.loads((tmp_path / "ix" / gen / "manifest.json").read_text())["collections"]
    assert (meta["volume"]["model_name"], meta["volume"]["config_hash"],
            meta["volume"]["dim"], meta["volume"]["model_source"]) == (
        "lecl-tiny", "vol0hash", VDIM, "random:lecl-tiny@0")
    assert (meta["image"]["model_name"], meta["image"]["dim"]) == ("lrclr", DIM)
    info = r.info()["collections"]
    assert info["volume"]["model_name"] == "lecl-tiny" and info["volume"]["dim"] == VDIM
    assert info["image"]["config_hash"] == "abc123"
    r.close()


def test_wrong_model_refused_on_add_and_search_in_one_line(tmp_path):
    ix = _mixed(tmp_path / "ix")
    other = CollectionModel("drasclr-tiny", "zzz999", VDIM)
    with pytest.raises(ConfigError) as err:
        ix.add("volume", clustered(1, VDIM, seed=5), _rows(1, 700), model=other)
    msg = str(err.value)
    assert "\n" not in msg and "lecl-tiny" in msg and "drasclr-tiny" in msg
    assert "vol0hash" in msg and "zzz999" in msg
    with pytest.raises(ConfigError, match="lrclr"):  # image vectors into the volume collection
        ix.add("volume", clustered(1, VDIM, seed=5), _rows(1, 700),
               model=CollectionModel("lrclr", "abc123", DIM))
    with pytest.raises(ConfigError, match="lecl-tiny"):
        ix.search("volume", clustered(1, VDIM, seed=6), 3, expect_model="drasclr-tiny")
    with pytest.raises(ConfigError, match="vol0hash"):
        ix.search("volume", clustered(1, VDIM, seed=6), 3, expect_config_hash="nope")
    assert ix.search("volume", clustered(1, VDIM, seed=6), 3, expect_model="lecl-tiny",
                     expect_config_hash="vol0hash")[0]
    with pytest.raises(ConfigError, match="lrclr"):
        ix.search("image", clustered(1, DIM, seed=6), 3, expect_model="lecl-tiny")
    with pytest.raises(RadLensError, match="16-dimensional"):  # image-sized vector
        ix.search("volume", clustered(1, DIM, seed=6), 3)
    ix.close()
    w = IndexFolder.open(tmp_path / "ix", mode="w")
    with pytest.raises(ConfigError):
        w.collection("volume", model=other)
    w.close()


def test_collections_without_model_fields_inherit_the_folder_model(tmp_path):
    ix = IndexFolder.create(tmp_path / "ix", model_name="lrclr", config_hash="abc123", dim=DIM)
    ix.add("image", clustered(10, DIM, seed=1), _rows(10))
    gen = ix.save()
    ix.close()
    path = tmp_path / "ix" / gen / "manifest.json"  # as written before collections had models
    manifest = json.loads(path.read_text())
    for meta in manifest["collections"].values():
        for key in ("model_name", "config_hash", "model_source"):
            meta.pop(key, None)
    path.write_text(json.dumps(manifest))
    r = IndexFolder.open(tmp_path / "ix", mode="w")
    assert r.collection_model("image") == CollectionModel("lrclr", "abc123", DIM)
    r.add("image", clustered(1, DIM, seed=2), _rows(1, 99),
          model=CollectionModel("lrclr", "abc123", DIM))
    with pytest.raises(ConfigError):
        r.add("image", clustered(1, DIM, seed=2), _rows(1, 98),
              model=CollectionModel("other", "abc123", DIM))
    r.add("volume", clustered(3, VDIM, seed=3), _rows(3, 200), model=VOL)
    new = r.save()
    r.close()
    meta = json.loads((tmp_path / "ix" / new / "manifest.json").read_text())["collections"]
    assert meta["image"]["model_name"] == "lrclr" and meta["volume"]["dim"] == VDIM
    assert persist.read_current(tmp_path / "ix") == new


def test_unknown_collection_model_is_an_error(tmp_path):
    ix = _mixed(tmp_path / "ix")
    with pytest.raises(RadLensError, match="no collection 'region'"):
        ix.collection_model("region")
    ix.close()
    r = IndexFolder.open(tmp_path / "ix")
    with pytest.raises(RadLensError, match="no collection"):
        r.search("region", np.ones(DIM), 3)
    r.close()


@pytest.mark.parametrize("factory", ["auto", "HNSW8", "IVF4,Flat"])
def test_k_larger_than_the_collection_pads_with_missing_hits(factory):
    from index.store import VectorCollection

    n = 300 if factory.startswith("IVF") else 6
    x = clustered(n, 8, seed=7)
    coll = VectorCollection("small", 8, factory)
    coll.add(np.arange(n), x)
    coll.remove([1])
    res = coll.search(x[:2], n + 5)
    assert res.ids.shape == (2, n + 5) and res.scores.shape == (2, n + 5)
    assert ((res.ids >= 0).sum(axis=1) == n - 1).all() and 1 not in res.ids
    assert np.isneginf(res.scores[:, n - 1:]).all() and (res.ids[:, n - 1:] == -1).all()
    assert res.ids[0, 0] == 0


def test_collection_model_from_the_manifest_alone(tmp_path):
    from index.folder import read_collection_model

    _mixed(tmp_path / "ix").close()
    assert read_collection_model(tmp_path / "ix", "volume") == VOL
    assert read_collection_model(tmp_path / "ix", "image") == CollectionModel("lrclr", "abc123",
                                                                              DIM)
    assert read_collection_model(tmp_path / "ix", "region") is None
    with pytest.raises(RadLensError):
        read_collection_model(tmp_path / "nothing", "volume")
