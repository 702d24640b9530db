from __future__ import annotations

import os

import pytest

# Never touch a hub from tests (a hub name otherwise retries for about a minute).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A fixed test secret so pseudonyms are reproducible; tests never write under the real home.
os.environ["RADLENS_SITE_SECRET"] = "radlens-test-site-secret-0123456789"


@pytest.fixture(autouse=True)
def _radlens_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RADLENS_HOME", str(tmp_path_factory.getbasetemp() / "radlens_home"))
