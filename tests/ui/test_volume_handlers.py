"""The Volumes tab's handlers (no browser): indexed volumes, the slice viewer and its window
presets, the attention-slice strip, similar volumes, NIfTI and zipped-series uploads, malformed
uploads, and an index without volumes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from ui import handlers as h
from vlm.data.manifest import read_jsonl
from vlm.errors import RadLensError


@pytest.fixture(scope="module")
def engine(volume_index):
    from index.engine import Engine

    return Engine.open(volume_index)


@pytest.fixture(scope="module")
def rows(tiny_ct) -> list[dict]:
    return list(read_jsonl(tiny_ct / "manifest.jsonl"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


def test_indexed_volume_viewer_strip_and_similar(engine, rows):
    choices = h.volume_choices(engine)
    assert len(choices) == len(rows) and all(label.startswith("#") for label, _ in choices)
    label, item_id = next(c for c in choices if "liver lesion" in c[0])
    study = h.load_volume_item(engine, item_id)
    assert study.hu.shape == (32, 32, 32) and study.z_index.tolist() == list(range(32))
    assert study.label == label and study.score_kind == "distinct"
    soft = h.volume_slice(study, 16)
    assert soft.shape == (512, 512, 3) and soft.dtype == np.uint8 and soft.std() > 0
    assert not np.array_equal(h.volume_slice(study, 16, "lung"), soft)  # presets re-render
    assert not np.array_equal(h.volume_slice(study, 3), soft)  # the slider moves
    assert np.array_equal(h.volume_slice(study, 99), h.volume_slice(study, 31))  # clipped
    with pytest.raises(RadLensError, match="unknown window"):
        h.volume_slice(study, 16, "nope")
    strip = h.volume_strip(study)
    assert len(strip) == 5 and all(c.startswith("slice ") for _, c in strip)
    assert [int(c.split()[1]) for _, c in strip] == [k for k, _ in study.salient]
    assert [float(c.split()[-1]) for _, c in strip] == sorted(
        (float(c.split()[-1]) for _, c in strip), reverse=True)
    assert h.strip_slice(study, 0) == study.salient[0][0]  # stack keeps every slice here
    assert np.array_equal(strip[0][0], h.volume_slice(study, study.salient[0][0], side=192))
    assert "not learned attention" in h.strip_label(study)
    items, hits = h.similar_volumes(engine, study, 4)
    assert len(items) == len(hits) == 4 and item_id not in {hit.id for hit in hits}
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    root = engine.index.path.resolve()
    for (path, caption), hit in zip(items, hits, strict=True):
        assert root in Path(path).resolve().parents and caption.startswith(f"{hit.score:.3f}")
        labels = {f"{x} lesion" for x, v in hit.item.extra["location_labels"].items() if v}
        assert all(lab.replace("_", " ") in caption for lab in labels)
    card = h.volume_card(hits[0])
    assert f"#{hits[0].id}" in card and "32×32×32" in card and "src-" not in card
    with pytest.raises(RadLensError, match="no volume chosen"):
        h.load_volume_item(engine, None)
    with pytest.raises(RadLensError, match="not in the index"):
        h.load_volume_item(engine, 10**6)


def test_nifti_and_zipped_series_uploads(engine, rows, tiny_ct, tmp_path):
    named = tmp_path / "DOE_JANE_1960.nii.gz"
    named.write_bytes((tiny_ct / rows[2]["nifti"]).read_bytes())
    study = h.load_volume_upload(engine, named, 2**24)
    assert "DOE" not in study.label and "32×32×32" in study.label
    assert study.hu.shape == (32, 32, 32) and len(study.salient) == 5
    items, hits = h.similar_volumes(engine, study, 3)
    # its DICOM twin (the same voxels, indexed from the series) is the query itself: left out,
    # as it was the top hit at a score of 1
    assert rows[2]["volume_id"] not in {hit.item.extra["dataset_id"] for hit in hits}
    assert len(items) == len(hits) == 3
    zipped = tmp_path / "SMITH_series.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for f in sorted((tiny_ct / rows[2]["dicom_dir"]).iterdir()):
            zf.write(f, f"../evil/{f.name}")  # member paths are never used as given
    study = h.load_volume_upload(engine, zipped, 2**24)
    assert study.label.startswith("se-") and "SMITH" not in study.label
    assert not (tmp_path.parent / "evil").exists()
    _, hits = h.similar_volumes(engine, study, 3)  # the same series is indexed: left out
    assert rows[2]["volume_id"] not in {hit.item.extra["dataset_id"] for hit in hits}


@pytest.mark.parametrize("kind, expect", [
    ("text", "unsupported file type"), ("empty", "empty"), ("big", "too large"),
    ("bad_nifti", "cannot read the upload"), ("bad_zip", "damaged or not a zip"),
    ("junk_zip", "holds 0 volumes"), ("dcm", "unsupported file type")])
def test_malformed_volume_uploads_give_one_line(engine, kind, expect, tmp_path):
    files = {"text": ("notes.txt", b"hello\n"), "empty": ("e.nii.gz", b""),
             "big": ("big.nii", b"\0" * 4096), "bad_nifti": ("b.nii.gz", b"garbage" * 50),
             "bad_zip": ("s.zip", b"PK\x03\x04 not really"), "dcm": ("x.dcm", b"abc")}
    if kind == "junk_zip":
        path = tmp_path / "junk.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a.txt", "not dicom")
    else:
        name, data = files[kind]
        path = tmp_path / name
        path.write_bytes(data)
    with pytest.raises(RadLensError) as err:
        h.load_volume_upload(engine, path, 1024 if kind == "big" else 2**24)
    message = _one_line(err)
    assert expect in message and str(tmp_path) not in message


def test_index_without_volumes_has_no_volume_tab(tiny_engine, engine):
    import gradio as gr

    from ui.app import build_app

    assert tiny_engine.volumes is None and h.volume_choices(tiny_engine) == []
    with pytest.raises(RadLensError, match="no volume collection"):
        h.load_volume_item(tiny_engine, 0)

    def tabs(app: gr.Blocks) -> set[str]:
        return {b.elem_id for b in app.blocks.values() if isinstance(b, gr.Tab) and b.elem_id}

    assert "tab-volumes" not in tabs(build_app(tiny_engine))
    app = build_app(engine)
    assert "tab-volumes" in tabs(app)
    states = [b for b in app.blocks.values() if isinstance(b, gr.State)]
    assert {type(s.value).__name__ for s in states} <= {"NoneType", "PromptSet", "list", "str"}


def test_a_volume_upload_leaves_no_file_under_its_name(engine, tiny_ct, rows, tmp_path):
    """As image uploads: gradio kept <temp>/<sha256>/<original name>; the app deletes it."""
    import uuid

    from gradio_client import Client, handle_file

    from tests.ui.chromium import free_port
    from ui.app import build_app
    from ui.serve import launch

    name = f"DOE_JANE_{uuid.uuid4().hex[:8]}.nii.gz"
    (tmp_path / name).write_bytes((tiny_ct / rows[2]["nifti"]).read_bytes())
    port = free_port()
    app = build_app(engine)
    launch(app, engine, port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        out = client.predict(handle_file(str(tmp_path / name)), "abdomen", 3,
                             api_name="/on_vol_upload")
        assert "similar volumes" in out[0] and "DOE" not in out[0]
        assert not list(Path(app.GRADIO_CACHE).rglob(name))
    finally:
        app.close()
