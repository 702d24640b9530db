"""The CLI's one-line answers to bad search options and to Ctrl-C."""

from __future__ import annotations

import pytest

from index.engine import parse_filters
from ui.cli import main
from vlm.errors import RadLensError


def _run(capsys, args: list[str]) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.splitlines()


def test_filters_parse_years_ranges_and_lists():
    assert parse_filters([]) == {}
    assert parse_filters(["modality=CR", " view = PA,AP ", "year=2005-2010"]) == {
        "modality": "CR", "view": ["PA", "AP"], "year_min": 2005, "year_max": 2010}
    assert parse_filters(["year=2010"]) == {"year_min": 2010, "year_max": 2010}
    assert parse_filters(["year_min=2001", "body_part=CHEST"]) == {
        "year_min": 2001, "body_part": "CHEST"}


@pytest.mark.parametrize(("item", "message"), [
    ("year=abc", "--filter year needs a year such as 2010, got 'abc'"),
    ("year_min=20x0", "--filter year_min needs a year such as 2010, got '20x0'"),
    ("year=2005-", "--filter year needs a year such as 2010, got ''"),
    ("colour=red", "unknown filter 'colour': use modality, body_part, view, year_min, "
                   "year_max or year"),
    ("modality", "--filter needs KEY=VALUE, got 'modality'"),
    ("view=", "--filter needs KEY=VALUE, got 'view='"),
])
def test_bad_filters_are_refused_in_one_line(item, message):
    with pytest.raises(RadLensError) as info:
        parse_filters([item])
    assert str(info.value) == message


def test_search_checks_its_options_before_opening_the_index(capsys, tmp_path):
    # the index does not exist: the filter is what the user hears about first
    code, err = _run(capsys, ["search", "--index", str(tmp_path), "--text", "effusion",
                              "--filter", "year=abc"])
    assert code == 2 and err == ["radlens: error: --filter year needs a year such as 2010, "
                                 "got 'abc'"]
    code, err = _run(capsys, ["search", "--index", str(tmp_path), "--text", "effusion",
                              "-k", "0"])
    assert code == 2 and any("Invalid value for '-k'" in line for line in err)
    for huge in ("10000000000", "99999999999999999999999"):  # MemoryError / ValueError before
        code, err = _run(capsys, ["search", "--index", str(tmp_path), "--text", "effusion",
                                  "-k", huge])
        assert code == 2 and any("Invalid value for '-k'" in line for line in err), err


def test_ctrl_c_in_any_command_exits_130_with_one_line(capsys, monkeypatch, tmp_path):
    from index.folder import IndexFolder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexFolder, "open", interrupted)
    code, err = _run(capsys, ["index", "info", str(tmp_path)])
    assert code == 130 and err[-1] == "radlens: interrupted"
    assert not any("Traceback" in line for line in err)


def test_a_busy_port_is_refused_before_any_index_or_model_loads(capsys, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        want = [f"radlens: error: 127.0.0.1:{port} is already in use (another RadLens app or "
                "demo?): pass --port with a free port"]
        # the index does not even exist: the port is checked first
        code, err = _run(capsys, ["serve", "--index", str(tmp_path / "none"),
                                  "--port", str(port)])
        assert code == 2 and err == want
        # the demo checks before it spends a minute building its archive and index
        code, err = _run(capsys, ["demo", "--out", str(tmp_path / "demo"), "--port", str(port)])
        assert code == 2 and err == want
        assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("command", ["phantom-cxr", "phantom-ct"])
def test_data_commands_need_at_least_one_item(capsys, tmp_path, command):
    """``--n 0`` rendered nothing and exited 0 (phantom-cxr) or raised an internal ValueError
    (phantom-ct)."""
    code, err = _run(capsys, ["data", command, "--out", str(tmp_path / "d"), "--n", "0"])
    assert code == 2 and any("Invalid value for '--n'" in line for line in err)
    assert not (tmp_path / "d").exists()


def test_a_plain_file_as_the_index_is_one_line(capsys, tmp_path):
    """``--out FILE`` / ``--index FILE`` were internal NotADirectoryErrors."""
    from index.folder import IndexFolder

    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (["index", "info", str(afile)],
                 ["search", "--index", str(afile), "--text", "effusion"]):
        code, err = _run(capsys, args)
        assert code == 2 and err == [f"radlens: error: {afile} is a file, not a RadLens index "
                                     "folder: check the path"], err
    with pytest.raises(RadLensError, match="is a file, not a folder"):
        IndexFolder.create(afile, model_name="m", config_hash="h", dim=4)
    assert afile.read_text() == "x"


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "0"], "--port 0: choose a port from 1 to 65535"),
    (["--port", "80000"], "--port 80000: choose a port from 1 to 65535"),
    (["--max-upload-mb", "-5"], "--max-upload-mb -5: the upload limit must be a number of MB "
                                "above 0"),
    (["--max-upload-mb", "0"], "--max-upload-mb 0: the upload limit must be a number of MB "
                               "above 0"),
    (["--host", "0.0.0.0"], "serving on 0.0.0.0 without --auth-file would let anyone who can "
                            "reach it query the archive: pass --auth-file (or "
                            "--allow-unauthenticated on a trusted network)"),
    (["--host", "::"], "serving on :: without --auth-file would let anyone who can reach it "
                       "query the archive: pass --auth-file (or --allow-unauthenticated on a "
                       "trusted network)"),
    (["--ingest-root", "https://alice:pw@pacs.example.org/dicom-web"],
     "a DICOMweb URL must not hold credentials (it is logged and stored): set "
     "RADLENS_DICOMWEB_TOKEN, or RADLENS_DICOMWEB_USER and RADLENS_DICOMWEB_PASSWORD"),
])
def test_serve_options_are_checked_before_the_index_loads(capsys, tmp_path, args, message):
    """Port 0 / 80000 and a negative upload limit were internal errors after the model had
    loaded; serving beyond this machine without a login was only a log warning."""
    code, err = _run(capsys, ["serve", "--index", str(tmp_path / "none"), *args])
    assert code == 2 and err == [f"radlens: error: {message}"]


def test_serving_beyond_this_machine_unauthenticated_needs_the_flag(capsys, tmp_path):
    # with the flag (or an auth file) the next thing checked is the index itself
    code, err = _run(capsys, ["serve", "--index", str(tmp_path / "none"), "--host", "0.0.0.0",
                              "--allow-unauthenticated", "--port", "7999"])
    assert code == 2 and len(err) == 1 and "--auth-file" not in err[0], err
    from ui.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")


def test_the_demo_still_serves_on_this_machine_only(capsys, monkeypatch, tiny_model,
                                                    tiny_engine):
    """The demo has no login: it must bind 127.0.0.1, which needs no --auth-file."""
    import signal

    import ui.demo
    import ui.serve
    from tests.ui.chromium import free_port

    launched = {}

    def fake_launch(app, engine, **kwargs):
        launched.update(kwargs)
        launched["sigterm"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)

    monkeypatch.setattr(ui.demo, "build_demo_index", lambda out, checkpoint: tiny_engine.index.path)
    monkeypatch.setattr(ui.serve, "launch", fake_launch)
    port = free_port()
    assert main(["demo", "--model", str(tiny_model), "--port", str(port)]) == 0
    assert launched["host"] == "127.0.0.1" and launched["auth"] is None
    assert launched["port"] == port
    # SIGTERM stops the server while it runs, and only then: the handler left installed
    # turned a later test's SIGTERM into a KeyboardInterrupt that ended the test session
    assert launched["sigterm"] is not before or before is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("args", [
    ["train", "lrclr", "--data", "D", "--model", "lrclr-tiny"],
    ["train", "lecl", "--data", "D"],
    ["train", "drasclr", "--data", "D"],
    ["train", "lesion-seg", "--data", "D"],
    ["train", "clear", "--data", "D", "--slice-model", "S"],
    ["eval", "--model", "M", "--data", "D"],
    ["eval-volumes", "--data", "D"],
    ["demo"],
])
@pytest.mark.parametrize("below", [False, True])
def test_an_out_folder_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, args,
                                                                 below):
    """``train lrclr --out FILE/run`` trained until its first checkpoint, ``eval --out FILE``
    scored the whole split, before the bare errno text came."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "run" if below else afile
    code = main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{afile} is a file, not a folder" in err
    assert afile.read_text() == "x"


@pytest.mark.parametrize(("args", "message"), [
    (["--text", "effusion", "--contrast", " "], "--contrast is empty"),
    (["--text", "effusion", "--contrast", "normal chest", "--raw"],
     "give --contrast TEXT or --raw, not both"),
    (["--image", "study.dcm", "--raw"], "--contrast and --raw rank --text queries"),
    (["--volume", "ct.nii.gz", "--contrast", "normal"], "--contrast and --raw rank --text"),
])
def test_contrast_options_that_cannot_apply_are_refused(capsys, tmp_path, args, message):
    """An empty --contrast fell back to the normal study, --raw beside --contrast silently
    dropped the contrast, and both were ignored for image and volume queries."""
    code, err = _run(capsys, ["search", "--index", str(tmp_path / "none"), *args])
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_negative_decode_workers_are_refused(tmp_path):
    """``index build --workers -1`` decoded in-process as if 0 had been asked for."""
    from index.ingest import ingest

    with pytest.raises(RadLensError, match=r"--workers must be 0 .* not -1"):
        ingest(object(), tmp_path, tmp_path / "idx", workers=-1)  # type: ignore[arg-type]
    assert not (tmp_path / "idx").exists()
