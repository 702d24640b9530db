from __future__ import annotations

import os
from pathlib import Path

import pytest

# Never touch a hub from tests (a hub name otherwise retries for about a minute).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# A fixed test secret so pseudonyms are reproducible; tests never write under the real home.
os.environ["RADLENS_SITE_SECRET"] = "radlens-test-site-secret-0123456789"


@pytest.fixture(autouse=True)
def _radlens_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RADLENS_HOME", str(tmp_path_factory.getbasetemp() / "radlens_home"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A checkpoint folder of the untrained ``lrclr-tiny`` model (read-only: shared by every
    test that needs an encoder to index or search with)."""
    from vlm.models import create_model, get_tokenizer, save_checkpoint

    folder = tmp_path_factory.mktemp("app_model") / "tiny"
    save_checkpoint(create_model("lrclr-tiny"), folder, get_tokenizer("lrclr-tiny"), card="#")
    return folder


#: The shipped supervised lesion model (``radlens train lesion-seg``, see its MODEL_CARD.md).
SHIPPED_LESION_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "lesion-seg"


@pytest.fixture(scope="session")
def lesion_ct(tmp_path_factory) -> Path:
    """The demo's PhantomCT volumes: 24 on the full 128^3 grid, seed 1 (the shipped models
    saw seed 0), for volume search with the shipped lesion model; four have a liver lesion,
    six a lung lesion."""
    from vlm.data.phantom_ct import generate_phantom_ct

    root = tmp_path_factory.mktemp("lesion_ct") / "pct"
    generate_phantom_ct(root, n=24, shape=(128, 128, 128), seed=1, workers=2)
    return root
