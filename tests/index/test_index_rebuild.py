"""``radlens index rebuild``: retrain a collection's faiss index from its stored vectors, as
another factory or back to the automatic choice; a factory faiss refuses leaves the index as
it was (one line, exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from index.folder import IndexFolder
from tests.index.conftest import clustered, exact_topk, near, recall
from ui.cli import main
from vlm.errors import RadLensError

DIM = 32


def _index(path, n=3000):
    ix = IndexFolder.create(path, model_name="m", config_hash="c", dim=DIM)
    x = clustered(n, DIM, seed=4)
    items = [{"instance": f"im-{i:020x}", "content_hash": f"{i:064x}"} for i in range(n)]
    ix.collection("image", factory="IVF8,Flat")  # fixed, as a pre-fix automatic one was left
    ids = ix.add("image", x, items)
    ix.collection("region", factory="auto")
    ix.add("region", x[:500], [{**it, "box": (0, 0, 4, 4)} for it in items[:500]])
    ix.remove(ids[:300])
    ix.save()
    ix.close()
    return x, ids


def _run(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_rebuild_as_another_factory_and_back_to_auto(tmp_path, capsys):
    x, ids = _index(tmp_path / "ix")
    q = near(x[300:], 20)
    code, out, _ = _run(capsys, ["index", "rebuild", str(tmp_path / "ix"), "--collection",
                                 "image", "--factory", "IVF16,SQ8"])
    assert code == 0
    report = json.loads(out)
    image = report["collections"]["image"]
    assert list(report["collections"]) == ["image"]  # only the one asked for
    assert image == {**image, "from": "IVF8,Flat", "to": "IVF16,SQ8", "auto": False,
                     "rows": 2700, "dropped": 300, "trained": True}
    with IndexFolder.open(tmp_path / "ix") as ix:
        assert ix.generation == report["generation"]
        coll = ix.collection("image")
        assert coll.factory == "IVF16,SQ8" and coll.dead == 0 and len(coll) == 2700
        found = coll.search(q, 10, nprobe=16).ids
        truth = ids[300:][exact_topk(x[300:], q, 10)]
        assert recall(found, truth) >= 0.95
    code, out, _ = _run(capsys, ["index", "rebuild", str(tmp_path / "ix"), "--factory",
                                 "auto"])
    assert code == 0
    report = json.loads(out)["collections"]
    assert set(report) == {"image", "region"}
    assert report["image"]["to"] == "Flat" and report["image"]["auto"] is True  # by size
    with IndexFolder.open(tmp_path / "ix") as ix:
        assert ix.info()["collections"]["image"]["auto"] is True
        assert recall(ix.collection("image").search(q, 10).ids, truth) >= 0.99  # float16 rows


def test_a_factory_faiss_refuses_is_one_line_and_leaves_the_index(tmp_path, capsys):
    _index(tmp_path / "ix")
    with IndexFolder.open(tmp_path / "ix") as ix:
        gen, info = ix.generation, ix.info()["collections"]
    for factory, says in [("IVF,Nope", "could not parse index string IVF,Nope"),
                          ("IVF16,PQ16x12", "Number of training points (2700) should be at "
                                            "least as large as number of clusters (4096)"),
                          ("  ", "--factory must not be empty")]:
        code, out, err = _run(capsys, ["index", "rebuild", str(tmp_path / "ix"), "--factory",
                                       factory])
        assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1
        assert "Error in" not in err and ".cpp" not in err
    code, _, err = _run(capsys, ["index", "rebuild", str(tmp_path / "ix"), "--collection",
                                 "volume"])
    assert code == 2 and "no collection 'volume'" in err
    with IndexFolder.open(tmp_path / "ix") as ix:
        assert ix.generation == gen and ix.info()["collections"] == info


def test_more_lists_than_rows_is_searched_exactly_until_it_can_train(tmp_path, capsys):
    x, ids = _index(tmp_path / "ix")
    code, out, _ = _run(capsys, ["index", "rebuild", str(tmp_path / "ix"), "--collection",
                                 "image", "--factory", "IVF4096,Flat"])
    assert code == 0 and json.loads(out)["collections"]["image"]["trained"] is False
    q = near(x[300:], 10)
    with IndexFolder.open(tmp_path / "ix") as ix:
        found = ix.collection("image").search(q, 10).ids
    assert recall(found, ids[300:][exact_topk(x[300:], q, 10)]) >= 0.99


def test_a_failed_rebuild_leaves_the_collection_usable(tmp_path):
    """In memory too: the collection keeps its index, rows and tombstones."""
    x, _ = _index(tmp_path / "ix")
    with IndexFolder.open(tmp_path / "ix", mode="w") as ix:
        coll = ix.collection("image")
        q = near(x[300:], 5)
        before = coll.search(q, 10).ids
        with pytest.raises(RadLensError, match="2700 rows"):
            coll.rebuild("IVF16,PQ16x12")
        assert coll.factory == "IVF8,Flat" and coll.dead == 300 and len(coll) == 2700
        assert np.array_equal(coll.search(q, 10).ids, before)
