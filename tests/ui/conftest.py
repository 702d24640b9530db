"""App test fixtures: a tiny random-weight checkpoint and small indexes built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def build_index(model: Path | str, source: Path, out: Path) -> Path:
    from index.ingest import ingest
    from vlm.inference import Encoder

    ingest(Encoder(str(model)), source, out, progress=False, workers=1, batch_size=16,
           model_path=str(model))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vlm.models import create_model, get_tokenizer, save_checkpoint

    folder = tmp_path_factory.mktemp("app_model") / "tiny"
    save_checkpoint(create_model("lrclr-tiny"), folder, get_tokenizer("lrclr-tiny"), card="#")
    return folder


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    from tests.tiny_cxr import make_tiny_cxr

    return make_tiny_cxr(tmp_path_factory.mktemp("app_archive"), n=12, size=64)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, tiny_archive, tmp_path_factory):
    from index.engine import Engine

    out = build_index(tiny_model, tiny_archive, tmp_path_factory.mktemp("app_index") / "idx")
    return Engine.open(out)


def pytest_collection_modifyitems(config, items):
    """Mark the headless-browser tests ``browser`` once that marker is registered."""
    if not any(m.split(":")[0].strip() == "browser" for m in config.getini("markers")):
        return
    for item in items:
        if item.path.name == "test_browser.py":
            item.add_marker(pytest.mark.browser)
