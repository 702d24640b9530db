"""App test fixtures: a tiny random-weight checkpoint and small indexes built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def build_index(model: Path | str, source: Path, out: Path) -> Path:
    from index.ingest import ingest
    from vlm.inference import Encoder

    ingest(Encoder(str(model)), source, out, progress=False, workers=0, batch_size=16,
           model_path=str(model))
    return out


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    from tests.tiny_cxr import make_tiny_cxr

    return make_tiny_cxr(tmp_path_factory.mktemp("app_archive"), n=12, size=64)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, tiny_archive, tmp_path_factory):
    from index.engine import Engine

    out = build_index(tiny_model, tiny_archive, tmp_path_factory.mktemp("app_index") / "idx")
    return Engine.open(out)


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory) -> Path:
    """Eight PhantomCT volumes of 32^3 (three with a liver lesion for seed 22)."""
    from vlm.data.phantom_ct import generate_phantom_ct

    root = tmp_path_factory.mktemp("app_ct") / "pct"
    generate_phantom_ct(root, n=8, shape=(32, 32, 32), seed=22, workers=1)
    return root


@pytest.fixture(scope="session")
def volume_index(tiny_model, tiny_archive, tiny_ct, tmp_path_factory) -> Path:
    """An index with the tiny archive's images and the tiny PhantomCT's volumes."""
    from index.volumes import ingest_volumes
    from vlm.volume_encoder import VolumeEncoder

    out = build_index(tiny_model, tiny_archive, tmp_path_factory.mktemp("app_vindex") / "idx")
    ingest_volumes(VolumeEncoder.load("random:lecl-tiny"), tiny_ct, out, progress=False)
    return out


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for one browser test module (see tests/ui/chromium.py)."""
    from tests.ui.chromium import chromium

    with chromium() as b:
        yield b
