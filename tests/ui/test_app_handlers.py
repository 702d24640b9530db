"""The app's handlers on a tiny engine (no browser): uploads, search, similar cases, grounding,
the index panel, per-session state, only index-owned files served, and the auth file."""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ui import handlers as h
from vlm.errors import RadLensError
from vlm.zeroshot import PromptSet


@pytest.fixture(scope="module")
def dicoms(tiny_archive) -> list[Path]:
    return sorted((tiny_archive / "dicom").iterdir())


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------- uploads
def test_dicom_upload_is_labelled_by_pseudonym_not_file_name(dicoms, tmp_path):
    named = tmp_path / "DOE_JOHN_1960.dcm"
    named.write_bytes(dicoms[0].read_bytes())
    study = h.load_upload(named, max_bytes=2**20)
    assert study.label.startswith("im-") and "DOE" not in study.label
    assert study.image.pixels.shape == (64, 64)
    assert study.lo < study.hi and study.width > 0
    rgb = h.display(study)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(h.display(study, "lung", 0, 1), rgb)  # presets re-render
    custom = h.display(study, h.CUSTOM_WINDOW, (study.lo + study.hi) / 2, study.hi - study.lo)
    assert custom.std() > 0


def test_png_and_jpeg_uploads(tmp_path):
    for name in ("x.png", "x.jpg"):
        Image.fromarray((np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)).save(
            tmp_path / name)
        assert h.load_upload(tmp_path / name, 2**20).image.pixels.shape == (64, 64)


def test_multi_frame_upload_with_few_frames_opens_its_middle_frame(tmp_path):
    """A 3-frame DICOM was refused as "not a 2-D image": the size check read (F, H, W)[:2]."""
    import pydicom

    from tests.vlm.io.conftest import sample_file

    ds = pydicom.dcmread(sample_file("emri_small.dcm"))  # 10 frames of 64 x 64 MR
    frame_bytes = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    frames = ds.pixel_array[:3]
    ds.NumberOfFrames = 3
    ds.PixelData = ds.PixelData[: 3 * frame_bytes]
    ds.save_as(tmp_path / "three.dcm")
    study = h.load_upload(tmp_path / "three.dcm", max_bytes=2**20)
    assert study.image.pixels.shape == (64, 64) and study.image.meta.frames == 1
    np.testing.assert_array_equal(study.image.pixels, frames[1])  # the middle frame
    assert h.display(study).shape == (64, 64, 3)
    with pytest.raises(RadLensError, match="too large"):  # the byte limit still holds
        h.load_upload(tmp_path / "three.dcm", max_bytes=1000)
    tiny = tmp_path / "tiny.dcm"  # and so does the smallest image side
    ds.Rows = ds.Columns = 4
    ds.PixelData = ds.PixelData[: 3 * 4 * 4 * ds.BitsAllocated // 8]
    ds.save_as(tiny)
    with pytest.raises(RadLensError, match=r"^cannot use the upload: too small to read \(4x4"):
        h.load_upload(tiny, max_bytes=2**20)
    from PIL import Image

    Image.new("L", (64, 64), 0).save(tmp_path / "black.png")  # blank: said on upload
    with pytest.raises(RadLensError, match=r"^cannot use the upload: blank \(every pixel is 0"):
        h.load_upload(tmp_path / "black.png", max_bytes=2**20)


@pytest.mark.parametrize("kind, expect", [
    ("truncated", "cannot read the upload"), ("text_dcm", "cannot read the upload"),
    ("text_txt", "unsupported file type '.txt'"), ("empty", "empty"), ("big", "too large"),
    ("bad_png", "cannot read the upload")])
def test_malformed_uploads_give_one_line(kind, expect, dicoms, tmp_path):
    good = dicoms[0].read_bytes()
    files = {"truncated": ("t.dcm", good[:600]), "text_dcm": ("notes.dcm", b"hello\n" * 40),
             "text_txt": ("notes.txt", b"hello\n"), "empty": ("e.dcm", b""),
             "big": ("b.dcm", good), "bad_png": ("b.png", b"\x89PNG\r\n\x1a\nbroken")}
    name, data = files[kind]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(RadLensError) as exc:
        h.load_upload(tmp_path / name, max_bytes=1000 if kind == "big" else 2**20)
    message = _one_line(exc)
    assert expect in message
    assert str(tmp_path) not in message  # no server paths in the page


def test_guarded_handler_turns_errors_into_a_status_line():
    from ui.app import _guarded

    def bad(_x):
        raise RadLensError("cannot read the upload: truncated")

    def broken(_x):
        raise KeyError("internal detail")

    out = _guarded(bad, 3, status_index=1)(None)
    assert "cannot read the upload" in out[1] and "⚠" in out[1]
    out = _guarded(broken, 2, status_index=0)(None)
    assert "internal error (KeyError)" in out[0] and "detail" not in out[0]


# ---------------------------------------------------------------------------- session state
def test_sessions_hold_their_own_study_and_prompts(dicoms):
    a = h.load_upload(dicoms[0], 2**20)
    b = h.load_upload(dicoms[1], 2**20)
    assert a.label != b.label and a.image is not b.image
    base = PromptSet.load()
    n = len(base.findings)
    mine = h.add_finding(base, "Pleural Thickening", "pleural thickening", "no pleural "
                         "thickening; normal pleura")
    assert "pleural_thickening" in mine.findings and len(base.findings) == n  # copy, not edit
    assert mine.findings["pleural_thickening"].negative == ["no pleural thickening",
                                                            "normal pleura"]
    with pytest.raises(RadLensError):
        h.add_finding(base, "x", "", "negative")
    with pytest.raises(RadLensError):
        h.add_finding(base, "  ", "a", "b")


def test_app_builds_with_per_session_state_only(tiny_engine):
    import gradio as gr

    import ui.app as app_module
    from ui.app import build_app

    app = build_app(tiny_engine)
    assert isinstance(app, gr.Blocks)
    states = [b for b in app.blocks.values() if isinstance(b, gr.State)]
    assert len(states) >= 4
    assert {type(s.value).__name__ for s in states} <= {"NoneType", "PromptSet", "list", "str"}
    # module globals are constants only: nothing a handler could write a user's data into
    mutable = [k for k, v in vars(app_module).items() if not k.startswith("__")
               and isinstance(v, list | dict | set)]
    assert mutable == []
    assert build_app(tiny_engine) is not app


# ---------------------------------------------------------------------------- zero-shot
def test_classify_sorted_probabilities_and_custom_finding(tiny_engine, dicoms):
    study = h.load_upload(dicoms[1], 2**20)
    probs = h.classify(tiny_engine, study, None)
    values = list(probs.values())
    assert values == sorted(values, reverse=True) and all(0 <= v <= 1 for v in values)
    table = h.probability_table(probs)
    assert table.count("\n") == len(probs) + 1 and "pleural_effusion" in table
    mine = h.add_finding(PromptSet.load(), "hernia", "hiatal hernia", "no hernia")
    assert "hernia" in h.classify(tiny_engine, study, mine)
    assert "hernia" in h.prompt_summary(mine)


# ---------------------------------------------------------------------------- search
def test_text_search_gallery_serves_only_index_files(tiny_engine):
    hits = h.search_text(tiny_engine, "opacity in the left lung", 5, "any", "any", "any", "")
    assert len(hits) == 5
    items = h.gallery(tiny_engine, hits)
    root = tiny_engine.index.path.resolve()
    assert len(items) == 5 and all(root in Path(p).resolve().parents for p, _ in items)
    assert all(c.split(" · ")[0].replace(".", "").lstrip("-").isdigit() for _, c in items)
    assert h.search_text(tiny_engine, "opacity", 5, modality="MR") == []
    # the checkbox "rank against a normal study": on = the engine default, off = plain cosine
    raw = h.search_text(tiny_engine, "opacity in the left lung", 5, contrast=False)
    assert [r.id for r in raw] == [r.id for r in tiny_engine.search_text(
        "opacity in the left lung", k=5, contrast=None)]
    assert [r.id for r in hits] == [r.id for r in tiny_engine.search_text(
        "opacity in the left lung", k=5)]
    with pytest.raises(RadLensError):
        h.search_text(tiny_engine, "   ", 5)
    with pytest.raises(RadLensError):
        h.search_text(tiny_engine, "x", 5, year_min="last year")


def test_forged_thumbnail_paths_are_never_served(tiny_engine, tmp_path):
    hit = h.search_text(tiny_engine, "opacity", 1)[0]
    secret = tmp_path / "secret.png"
    Image.new("L", (8, 8)).save(secret)
    for bad in ("../../../../etc/passwd", str(secret), "thumbs/../../outside.png"):
        forged = dataclasses.replace(hit, item=dataclasses.replace(hit.item, thumbnail=bad))
        assert tiny_engine.item_path(forged.item) is None
        assert h.gallery(tiny_engine, [forged]) == []
        with pytest.raises(RadLensError):
            h.result_view(tiny_engine, forged, "opacity")


def test_selected_result_has_heatmap_and_deidentified_card(tiny_engine):
    hit = h.search_text(tiny_engine, "opacity in the left lung", 3)[0]
    rgb, card = h.result_view(tiny_engine, hit, "opacity in the left lung")
    assert rgb.ndim == 3 and max(rgb.shape[:2]) == h.VIEW_SIDE
    assert hit.item.study in card and "Report" in card
    assert hit.item.source_uri not in card and "src-" not in card
    plain, _ = h.result_view(tiny_engine, hit, "")
    assert not np.array_equal(plain, rgb)


def test_examples_open_from_thumbnails_only(tiny_engine):
    choices = h.example_choices(tiny_engine, n=5)
    assert 0 < len(choices) <= 5
    label, item_id = choices[0]
    assert "opacity" in label  # labelled studies first
    study = h.load_example(tiny_engine, item_id)
    assert study.label.startswith(f"#{item_id}") and study.image.pixels.ndim == 2
    with pytest.raises(RadLensError):
        h.load_example(tiny_engine, 10**9)
    assert h.facet_values(tiny_engine, "modality") == ["DX"]
    with pytest.raises(ValueError):
        h.facet_values(tiny_engine, "source_uri")


# ---------------------------------------------------------------------------- similar, grounding
def test_similar_cases_with_region_boxes(tiny_engine, dicoms):
    study = h.load_upload(dicoms[2], 2**20)
    query, cards = h.similar(tiny_engine, study, 4)
    assert query.ndim == 3 and max(query.shape[:2]) == h.VIEW_SIDE
    assert len(cards) == 4 and all(img.ndim == 3 for img, _ in cards)
    assert cards[0][1].startswith("1.000")  # the study itself is indexed


def test_grounding_one_colour_per_phrase(tiny_engine, dicoms):
    study = h.load_upload(dicoms[1], 2**20)
    grounded = h.ground(tiny_engine, study, "left lung opacity\n\nheart\n")
    assert [g.phrase for g in grounded] == ["left lung opacity", "heart"]
    assert grounded[0].heatmap.shape == study.image.pixels.shape
    base = h.display(study)
    img, legend = h.grounding_overlay(base, grounded, 0.6)
    assert img.shape[:2] == (h.VIEW_SIDE, h.VIEW_SIDE)
    assert legend.count("■") == 2 and str(h.rd.colour_for(1)) in legend
    faint, _ = h.grounding_overlay(base, grounded, 0.0)
    assert not np.array_equal(faint, img)
    with pytest.raises(RadLensError):
        h.ground(tiny_engine, study, "  \n ")
    with pytest.raises(RadLensError):
        h.ground(tiny_engine, study, "\n".join(f"p{i}" for i in range(9)))


# ---------------------------------------------------------------------------- index panel
def test_index_summary_lists_collections(tiny_engine):
    text = h.index_summary(tiny_engine.info())
    assert "lrclr-tiny" in text and "| image | 12 |" in text and "region" in text
    assert str(tiny_engine.index.path) not in text


def test_build_from_the_app_only_under_ingest_roots(tiny_model, tmp_path):
    from index.engine import Engine
    from tests.tiny_cxr import make_tiny_cxr
    from tests.ui.conftest import build_index

    first = make_tiny_cxr(tmp_path / "a", n=3, size=48, seed=1)
    engine = Engine.open(build_index(tiny_model, first, tmp_path / "idx"))
    more = make_tiny_cxr(tmp_path / "roots" / "b", n=4, size=48, seed=2)
    (more / "dicom" / "broken.dcm").write_bytes(b"not dicom" * 20)
    (more / "manifest.jsonl").unlink()  # a plain folder: every file, the broken one too
    with pytest.raises(RadLensError, match="off"):
        h.build_index(engine, str(more), None)
    with pytest.raises(RadLensError, match="outside"):
        h.build_index(engine, str(first), [tmp_path / "roots"])
    with pytest.raises(RadLensError, match="outside"):
        h.build_index(engine, str(tmp_path / "roots" / ".." / "a"), [tmp_path / "roots"])
    summary, failures = h.build_index(engine, str(more), [tmp_path / "roots"])
    assert "added **4**" in summary and "**1 failed**" in summary
    assert failures == [[str(Path("dicom") / "broken.dcm"), failures[0][1]]]
    assert engine.info()["collections"]["image"]["count"] == 7  # reloaded


def test_build_from_the_app_from_an_allowed_dicomweb_server(tiny_model, tmp_path):
    """A DICOMweb URL is built from only when its service root is an ingest root; failures
    name the instance by the pseudonyms of its UIDs, never the UIDs."""
    from index.engine import Engine
    from tests.index.dicomweb_server import Archive, Server
    from tests.tiny_cxr import make_tiny_cxr
    from tests.ui.conftest import build_index

    first = make_tiny_cxr(tmp_path / "a", n=3, size=48, seed=1)
    engine = Engine.open(build_index(tiny_model, first, tmp_path / "idx"))
    archive = Archive()
    # images 3-6 of a second archive: their UIDs differ from the first's (the tiny archive's
    # UIDs follow the image number), so nothing counts as already indexed
    for f in sorted((make_tiny_cxr(tmp_path / "b", n=7, size=48, seed=2) / "dicom").iterdir())[3:]:
        archive.add_file(f)
    bad = archive.add_file(f, sop="1.2.826.0.1.3680043.10.3.1")
    archive.fail_instances.add(bad.sop)
    with Server(archive) as url:
        with pytest.raises(RadLensError, match="not an allowed ingest root"):
            h.build_index(engine, url, [str(tmp_path), "http://127.0.0.1:1/dicom-web"])
        summary, failures = h.build_index(engine, url + "?ModalitiesInStudy=DX",
                                          [str(tmp_path), url + "/"])
    assert "added **4**" in summary and "**1 failed**" in summary
    assert len(failures) == 1 and failures[0][0].startswith("studies/st-")
    assert "/series/se-" in failures[0][0] and "/instances/im-" in failures[0][0]
    assert bad.sop not in failures[0][0] and bad.study not in failures[0][0]
    assert engine.info()["collections"]["image"]["count"] == 7  # reloaded


# ---------------------------------------------------------------------------- auth
def test_password_hash_round_trip_and_auth_file(tmp_path, monkeypatch, capsys):
    from ui import serve

    encoded = serve.hash_password("correct horse")
    assert encoded.startswith("scrypt$") and "correct" not in encoded
    assert serve.verify_password("correct horse", encoded)
    assert not serve.verify_password("wrong", encoded)
    assert not serve.verify_password("x", "garbage")
    assert serve.hash_password("same") != serve.hash_password("same")  # salted

    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert serve.main(["hash-password", "alice", "--stdin"]) == 0
    line = capsys.readouterr().out.strip()
    auth = tmp_path / "auth.txt"
    auth.write_text(f"# users\n{line}\nbob:{serve.hash_password('hunter2')}\n")
    users = serve.load_auth_file(auth)
    assert sorted(users) == ["alice", "bob"]
    check = serve.make_auth(users)
    assert check("alice", "s3cret") and check("bob", "hunter2")
    assert not check("alice", "hunter2") and not check("mallory", "s3cret")

    auth.write_text("alice:plaintext-password\n")
    with pytest.raises(RadLensError, match="line 1"):
        serve.load_auth_file(auth)
    with pytest.raises(RadLensError, match="not found"):
        serve.load_auth_file(tmp_path / "missing.txt")
    assert serve.main(["hash-password", "a:b", "--stdin"]) == 2
    # a newline split the printed line (the file was then refused), '#carol' read as a
    # comment and ' dave' stripped on load: each could never sign in
    for user in ("a\nb", "#carol", " dave", "eve\t"):
        assert serve.main(["hash-password", user, "--stdin"]) == 2, repr(user)


def test_served_app_needs_login_and_serves_only_index_files(tiny_engine, tmp_path):
    import httpx

    from tests.ui.chromium import free_port
    from ui.app import build_app
    from ui.serve import hash_password, launch, make_auth

    port = free_port()
    app = build_app(tiny_engine)
    launch(app, tiny_engine, port=port, prevent_thread_lock=True,
           auth=make_auth({"alice": hash_password("pw")}))
    secret = tmp_path / "outside.png"
    Image.new("L", (8, 8)).save(secret)
    thumb = tiny_engine.item_path(h.search_text(tiny_engine, "opacity", 1)[0].item)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.get("/config").status_code == 401
            assert c.post("/login", data={"username": "alice", "password": "x"}).is_error
            assert c.post("/login", data={"username": "alice", "password": "pw"}).is_success
            assert c.get("/config").status_code == 200
            assert c.get(f"/gradio_api/file={secret}").status_code in (403, 404)
            for private in tiny_engine.index.path.rglob("*"):  # catalog, vectors, report
                if private.is_file() and "thumbs" not in private.parts:
                    assert c.get(f"/gradio_api/file={private}").status_code in (403, 404)
            assert c.get(f"/gradio_api/file={thumb}").status_code == 200
    finally:
        app.close()


def test_auth_file_lines_that_could_never_log_in_are_refused(tmp_path):
    """Unparsable scrypt parameters were accepted (every login then failed in silence) and a
    binary file was an internal UnicodeDecodeError. The line number is named, the secret not."""
    from ui import serve

    good = serve.hash_password("pw")
    _, n, r, p, salt, digest = good.split("$")
    auth = tmp_path / "auth.txt"
    bad_lines = {
        f"scrypt$abc${r}${p}${salt}${digest}": "not whole numbers",
        f"scrypt$1000${r}${p}${salt}${digest}": "out of range",  # N not a power of two
        f"scrypt${n}$0${p}${salt}${digest}": "out of range",
        f"scrypt${2**30}${r}${p}${salt}${digest}": "out of range",  # beyond scrypt's memory
        f"scrypt${n}${r}${p}$not*base64${digest}": "not base64",
        f"scrypt${n}${r}${p}${salt}$c2hvcnQ=": "not 32 bytes",
        f"bcrypt${n}${r}${p}${salt}${digest}": "expected 'user:scrypt$…'",
    }
    for encoded, why in bad_lines.items():
        auth.write_text(f"# users\nalice:{good}\nbob:{encoded}\n")
        with pytest.raises(RadLensError) as info:
            serve.load_auth_file(auth)
        message = _one_line(info)
        assert f"auth file {auth} line 3: " in message and why in message, message
        assert salt not in message and digest not in message
    auth.write_bytes(b"alice:" + good.encode() + b"\n\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(RadLensError) as info:
        serve.load_auth_file(auth)
    assert _one_line(info) == (f"auth file {auth} line 2: not UTF-8 text (is it the right "
                               "file?)")
    auth.write_text(f"alice:{good}\n")
    assert serve.load_auth_file(auth) == {"alice": good}  # a real line still loads


def test_the_app_serves_on_an_ipv6_address(tiny_engine):
    """``--host ::1`` made gradio build ``http://::1:PORT/`` and fail with an internal
    InvalidURL after the model had loaded."""
    import socket

    import httpx

    from ui.app import build_app
    from ui.serve import check_port, launch, url_host

    assert url_host("::1") == url_host("[::1]") == "[::1]" and url_host("0.0.0.0") == "0.0.0.0"
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback here")
    check_port("::1", port)
    app = build_app(tiny_engine)
    # a fractional limit (python -m ui.serve takes floats) was an internal error in gradio
    launch(app, tiny_engine, host="::1", port=port, prevent_thread_lock=True, max_upload_mb=2.5)
    try:
        assert app.max_file_size == int(2.5 * 2**20)
        with httpx.Client(base_url=f"http://[::1]:{port}", timeout=30) as c:
            assert c.get("/config").status_code == 200
    finally:
        app.close()


# ---------------------------------------------------------------------------- uploads on disk
def test_discard_upload_deletes_the_file_and_its_folder_only_under_the_root(tmp_path):
    root = tmp_path / "gradio"
    upload = root / "0f1" / "DOE_JOHN_1960.dcm"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(b"x")
    other = root / "0f2" / "keep.png"
    other.parent.mkdir()
    other.write_bytes(b"y")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"z")
    h.discard_upload(upload, root)
    assert not upload.exists() and not upload.parent.exists()  # no name left on disk
    assert other.is_file() and root.is_dir()
    h.discard_upload(outside, root)  # not gradio's: left alone
    h.discard_upload(root / ".." / "outside.dcm", root)
    assert outside.is_file()
    h.discard_upload(upload, root)  # already gone, or nothing uploaded: no error
    h.discard_upload(None, root)


def test_an_upload_leaves_no_file_under_its_name(tiny_engine, dicoms, tmp_path):
    """Gradio keeps an upload as <temp>/<sha256>/<original name> (folders 0755) for up to an
    hour; file names of studies often name the patient. The app deletes it once read."""
    import uuid

    from gradio_client import Client, handle_file

    from tests.ui.chromium import free_port
    from ui.app import build_app
    from ui.serve import launch

    name = f"DOE_JOHN_{uuid.uuid4().hex[:8]}.dcm"
    (tmp_path / name).write_bytes(dicoms[0].read_bytes())
    port = free_port()
    app = build_app(tiny_engine)
    root = Path(app.GRADIO_CACHE)
    launch(app, tiny_engine, port=port, prevent_thread_lock=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        out = client.predict(handle_file(str(tmp_path / name)), api_name="/on_upload")
        assert "im-" in out[0] and "DOE" not in out[0]  # it was read, labelled by pseudonym
        assert not list(root.rglob(name)), "the upload is still on disk under its name"
        bad = tmp_path / name.replace(".dcm", ".png")
        bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")  # a refused upload is deleted too
        out = client.predict(handle_file(str(bad)), api_name="/on_upload")
        assert "cannot read the upload" in out[0]
        assert not list(root.rglob(bad.name))
    finally:
        app.close()


def test_serve_keeps_gradio_files_in_a_private_folder(monkeypatch, tmp_path):
    from ui.serve import private_temp_dir

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "mine"))
    assert private_temp_dir() == tmp_path / "mine"  # the user's choice is kept
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    folder = private_temp_dir()
    try:
        assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
        assert folder.name.startswith("radlens-gradio-")
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
    finally:
        folder.rmdir()
