from __future__ import annotations

import json
import os
import stat

import pydicom
import pytest

from tests.vlm.io.conftest import sample_file
from vlm.errors import ConfigError
from vlm.io import read_image
from vlm.io.deid import Pseudonymizer, default_pseudonymizer


def test_pseudonyms_are_keyed_stable_and_kind_separated():
    a = Pseudonymizer("a" * 32)
    b = Pseudonymizer("b" * 32)
    assert a("pt", "12345") == a("pt", "12345")
    assert a("pt", "12345") != b("pt", "12345")
    assert a("pt", "12345") != a("st", "12345")
    assert a("pt", "12345").startswith("pt-") and "12345" not in a("pt", "12345")
    assert a("pt", "") is None and a("pt", None) is None
    assert "a" * 32 not in repr(a)
    with pytest.raises(ConfigError):
        Pseudonymizer("short")


def test_secret_file_is_created_private_and_reused(monkeypatch, tmp_path):
    monkeypatch.delenv("RADLENS_SITE_SECRET", raising=False)
    monkeypatch.setenv("RADLENS_HOME", str(tmp_path / "home"))
    p1 = Pseudonymizer.from_environment()
    secret = tmp_path / "home" / "site_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert Pseudonymizer.from_environment()("pt", "x") == p1("pt", "x")
    monkeypatch.setenv("RADLENS_SITE_SECRET", "another-secret-of-enough-length")
    assert default_pseudonymizer()("pt", "x") != p1("pt", "x")


def test_metadata_holds_pseudonyms_not_identifiers():
    path = sample_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    text = json.dumps(image.meta.to_dict())
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
               "SOPInstanceUID", "AccessionNumber", "PatientBirthDate"):
        value = str(ds.get(kw) or "")
        if len(value) >= 4:
            assert value not in text, kw
    assert image.meta.patient_pseudonym and image.meta.patient_pseudonym.startswith("pt-")
    assert image.meta.study_year == int(str(ds.StudyDate)[:4])
    assert image.meta.identifiers is None and "identifiers" not in image.meta.to_dict()
    kept = read_image(path, keep_identifiers=True)
    assert kept.meta.identifiers and kept.meta.identifiers["PatientID"] == str(ds.PatientID)
