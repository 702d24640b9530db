"""``radlens inspect``: one line per bad file, exit code 2, good files still processed,
no identifying value in the output or the logs, no traceback ever."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom
import pytest

from tests.vlm.io.conftest import all_test_files, sample_file
from ui.cli import main
from vlm.io.deid import IDENTIFYING_KEYWORDS


def _run(capsys, args: list[str]) -> tuple[int, list[str], list[str]]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_bad_files_print_one_line_each_and_good_files_go_through(capsys, tmp_path):
    good = sample_file("CT_small.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.dcm"
    text.write_text("this is a text file, not an image\n" * 20)
    out_dir = tmp_path / "previews"
    code, out, err = _run(capsys, ["inspect", str(truncated), str(good), str(text),
                                   "--out", str(out_dir), "--window", "lung"])
    assert code == 2
    assert len(out) == 1
    row = json.loads(out[0])
    assert row["file"] == str(good) and row["meta"]["modality"] == "CT"
    assert Path(row["preview"]).is_file()
    assert len(err) == 2
    assert "truncated.dcm" in err[0] and "notes.dcm" in err[1]
    assert "truncated or incomplete pixel data" in err[0]  # the reason, not just "cannot decode"
    assert all("Traceback" not in line for line in err)


def test_good_files_exit_zero_and_previews_are_windowed(capsys, tmp_path):
    code, out, err = _run(capsys, ["inspect", str(sample_file("RG1_UNCI.dcm")),
                                   str(sample_file("emri_small.dcm")), "--out", str(tmp_path)])
    assert code == 0 and len(out) == 2 and not [e for e in err if "error" in e]
    from PIL import Image

    with Image.open(tmp_path / "RG1_UNCI.png") as im:
        assert im.mode == "L" and im.size == (1841, 1955)


def test_usage_errors_are_one_line(capsys):
    code, _out, err = _run(capsys, ["inspect", str(sample_file("CT_small.dcm")),
                                    "--window", "nonsense"])
    assert code == 2
    assert any("unknown window" in line for line in err)
    assert not any("Traceback" in line for line in err)


def _dataset(path: Path) -> pydicom.Dataset | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            return None


def _identifying_values(ds: pydicom.Dataset, allowed: set[str]) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = set()
        for elem in ds.iterall():
            if elem.keyword in IDENTIFYING_KEYWORDS and elem.value not in (None, ""):
                text = str(elem.value).strip()
                if elem.keyword in ("StudyDate", "StudyTime"):
                    continue  # dates reduced to the year; times never output (checked below)
                if text in allowed:
                    continue  # InstitutionName "GE MEDICAL SYSTEMS" == some Manufacturer
                if (len(text) >= 5 and not text.replace(".", "").isdigit()) or len(text) >= 12:
                    values.add(text)
    return values


@pytest.mark.slow
def test_no_identifying_value_reaches_output_or_logs(tmp_path):
    """Runs the real console entry point (verbose logging on) over every test file."""
    files = [p for p in all_test_files() if p.stat().st_size < 8_000_000]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from ui.cli import main; sys.exit(main())",
         "--verbose", "inspect", *map(str, files), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 2  # some test files are broken on purpose
    out, err = proc.stdout, proc.stderr
    everything = out + err
    datasets = {p: ds for p in files if (ds := _dataset(p)) is not None}
    allowed = {str(ds.get(kw) or "").strip() for ds in datasets.values()
               for kw in ("Manufacturer", "ManufacturerModelName")}
    leaked = {}
    for path, ds in datasets.items():
        for value in _identifying_values(ds, allowed):
            # whole-token match: "TOSHIBA" (institution) inside "TOSHIBA_MEC" (manufacturer)
            # is not a leak
            if re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", everything):
                leaked.setdefault(value, path.name)
    assert not leaked, f"identifiers leaked: {list(leaked.items())[:5]}"
    assert "Traceback" not in err
    assert os.environ["RADLENS_SITE_SECRET"] not in everything
    assert all(line.startswith(("radlens: error: ", "INFO ", "WARNING ")) for line in
               err.splitlines()), err[:2000]
    assert out.count("\n") >= 100  # the files really went through


def test_an_unusable_out_folder_is_one_line_before_any_file(capsys, tmp_path):
    """``--out FILE`` was an internal FileExistsError, ``--out FILE/sub`` a NotADirectoryError;
    both stopped the batch with nothing printed."""
    good = str(sample_file("CT_small.dcm"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, out, err = _run(capsys, ["inspect", good, "--out", str(afile)])
    assert code == 2 and out == []
    assert err == [f"radlens: error: --out {afile} is a file, not a folder: pass a folder for "
                   "previews"]
    code, out, err = _run(capsys, ["inspect", good, "--out", str(afile / "sub")])
    assert code == 2 and out == []
    assert err == [f"radlens: error: --out {afile / 'sub'}: cannot write previews there "
                   "(Not a directory)"]
    assert afile.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_out_folder_is_one_line(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, out, err = _run(capsys, ["inspect", str(sample_file("CT_small.dcm")),
                                       "--out", str(locked)])
    finally:
        locked.chmod(0o755)
    assert code == 2 and out == [] and len(err) == 1
    assert "cannot write previews there (Permission denied)" in err[0]
    assert list(locked.iterdir()) == []  # the write probe is gone


def test_a_preview_that_cannot_be_written_fails_that_file_only(capsys, tmp_path):
    """A failed PNG write (here: a folder already has the preview's name) was an internal
    error that ended the whole batch."""
    ct, mr = sample_file("CT_small.dcm"), sample_file("MR_small.dcm")
    (tmp_path / "CT_small.png").mkdir()
    code, out, err = _run(capsys, ["inspect", str(ct), str(mr), "--out", str(tmp_path)])
    assert code == 2
    assert [json.loads(line)["file"] for line in out] == [str(mr)]
    assert (tmp_path / "MR_small.png").is_file()
    assert len(err) == 1 and err[0] == (f"radlens: error: {ct}: cannot write the preview "
                      f"{tmp_path / 'CT_small.png'} (Is a directory)")


def test_a_frame_the_image_does_not_have_is_an_error_for_that_file(capsys, tmp_path):
    """``--frame 99`` was clamped to the last frame without a word."""
    multi, single = sample_file("emri_small.dcm"), sample_file("CT_small.dcm")
    code, out, err = _run(capsys, ["inspect", str(multi), str(single), "--frame", "9",
                                   "--out", str(tmp_path)])
    assert code == 2 and [json.loads(line)["file"] for line in out] == [str(multi)]
    assert err[0] == (f"radlens: error: {single}: frame 9 out of range: the image has 1 "
                      "frame (0)")
    code, out, err = _run(capsys, ["inspect", str(multi), "--frame", "99", "--out",
                                   str(tmp_path)])
    assert code == 2 and out == []
    assert err[0] == (f"radlens: error: {multi}: frame 99 out of range: the image has 10 "
                      "frames (0-9)")
    code, out, err = _run(capsys, ["inspect", str(multi), "--frame", "-1", "--out",
                                   str(tmp_path)])
    assert code == 2 and out == [] and err == ["radlens: error: --frame -1: frames are "
                                               "numbered from 0"]
