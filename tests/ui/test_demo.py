"""`make demo`'s build step: demo archive (PhantomCXR test split + real DICOM) and its index,
reused on the second run; the reader-only demo on the real files."""

from __future__ import annotations

import json

import pytest

from ui.demo import REAL_DEMO_FILES, build_demo_index, run_demo
from vlm.models import create_model, get_tokenizer, save_checkpoint


@pytest.mark.slow
def test_demo_index_is_built_once_and_reused(tmp_path, capsys):
    model = tmp_path / "model"
    save_checkpoint(create_model("lrclr-tiny"), model, get_tokenizer("lrclr-tiny"), card="#")
    index = build_demo_index(tmp_path / "demo", model, limit=6, progress=False,
                             volume_model="random:lecl-tiny", volumes=2,
                             volume_shape=(32, 32, 32))
    report = json.loads((index / "ingest_report.json").read_text())
    real = len(list((tmp_path / "demo" / "archive" / "real").iterdir()))
    assert real == len(REAL_DEMO_FILES)
    assert report["added"] == 6 + real and not report["failed"]
    stamp = (index / "CURRENT").read_text(), (index / "ingest_report.json").stat().st_mtime_ns
    capsys.readouterr()
    build_demo_index(tmp_path / "demo", model, limit=6, progress=False,
                     volume_model="random:lecl-tiny", volumes=2, volume_shape=(32, 32, 32))
    second = capsys.readouterr().out
    assert "another model" not in second and "demo: indexed" not in second, second
    assert ((index / "CURRENT").read_text(),
            (index / "ingest_report.json").stat().st_mtime_ns) == stamp  # nothing rebuilt
    # a build stopped early (Ctrl-C) wrote its report too: the next demo completes the build
    # instead of serving a partial index
    for name in ("ingest_report.json", "volume_ingest_report.json"):
        stopped = json.loads((index / name).read_text()) | {"interrupted": True}
        (index / name).write_text(json.dumps(stopped))
    capsys.readouterr()
    build_demo_index(tmp_path / "demo", model, limit=6, progress=False,
                     volume_model="random:lecl-tiny", volumes=2, volume_shape=(32, 32, 32))
    resumed = capsys.readouterr().out
    assert "demo: indexed 0 images" in resumed and "demo: indexed 0 PhantomCT volumes" in resumed
    assert not json.loads((index / "ingest_report.json").read_text())["interrupted"]
    from index.folder import IndexFolder

    ix = IndexFolder.open(index)
    reports = [it.extra.get("report") for it in ix.catalog.get_many(range(ix.catalog.next_id()))
               if it is not None and it.collection == "image"]
    assert sum(1 for r in reports if r) == 6  # phantom studies carry their report text
    assert ix.catalog.count("volume") == 2  # the Volumes tab has PhantomCT volumes to show
    ix.close()

    # a checkout that ships another volume model rebuilds the index too (the old volume
    # collection would refuse the new model's vectors)
    capsys.readouterr()
    build_demo_index(tmp_path / "demo", model, limit=6, progress=False,
                     volume_model="random:drasclr-tiny", volumes=2, volume_shape=(32, 32, 32))
    assert "another volume model" in capsys.readouterr().out
    ix = IndexFolder.open(index)
    assert ix.collection_model("volume").model_name == "drasclr-tiny-random@0"
    assert ix.catalog.count("volume") == 2 and ix.catalog.count("image") == 6 + real
    ix.close()

    # a checkout that ships another default model rebuilds the demo index instead of serving
    # one that the new model would be refused on; a retrained model with the same config
    # (new weights only, as a re-trained shipped checkpoint) counts as another model
    other = tmp_path / "other"
    save_checkpoint(create_model("lrclr-tiny"), other, get_tokenizer("lrclr-tiny"), card="#")
    capsys.readouterr()
    build_demo_index(tmp_path / "demo", other, limit=6, progress=False, volumes=0)
    assert "built with another model" in capsys.readouterr().out
    from vlm.inference import Encoder

    ix = IndexFolder.open(index, expect_config_hash=Encoder(str(other)).config_hash)
    assert ix.catalog.count("image") == 6 + real
    ix.close()


def test_reader_demo_reads_every_real_file(tmp_path, capsys):
    assert run_demo(tmp_path) == []
    assert (tmp_path / "previews.png").is_file()
    rows = (tmp_path / "summary.jsonl").read_text().splitlines()
    assert len(rows) == 9


def test_demo_never_deletes_an_index_it_did_not_build(tmp_path):
    """``demo --out DIR`` deleted ``DIR/index`` whenever its model differed from the demo's,
    even an index the user had built there from another archive (notes and all)."""
    from index.ingest import ingest
    from tests.tiny_cxr import make_tiny_cxr
    from vlm.errors import RadLensError
    from vlm.inference import Encoder

    mine, demo_model = tmp_path / "mine", tmp_path / "model"
    save_checkpoint(create_model("lrclr-tiny"), mine, get_tokenizer("lrclr-tiny"), card="#")
    save_checkpoint(create_model("lrclr-tiny"), demo_model, get_tokenizer("lrclr-tiny"),
                    card="#")
    index = tmp_path / "demo" / "index"
    ingest(Encoder(mine), make_tiny_cxr(tmp_path / "own", n=3, size=64), index,
           progress=False, workers=0)
    (index / "NOTES.txt").write_text("my notes")
    before = sorted(p.name for p in index.iterdir())
    with pytest.raises(RadLensError, match="holds an index the demo did not build"):
        build_demo_index(tmp_path / "demo", demo_model, limit=2, progress=False, volumes=0)
    assert sorted(p.name for p in index.iterdir()) == before
    assert (index / "NOTES.txt").read_text() == "my notes"
