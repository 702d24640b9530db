from __future__ import annotations

import pytest
import torch

import vlm  # noqa: F401  (torchvision shim before open_clip/timm)
from vlm.models import create_model, get_tokenizer

REPORTS = [
    "Heart size is normal. Small left pleural effusion. No pneumothorax.",
    "Clear lungs. No acute cardiopulmonary abnormality.",
    "Cardiomegaly. Pulmonary vascular congestion. Bilateral effusions.",
    "Calcified granuloma in the right upper lobe. Otherwise normal.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return get_tokenizer("lrclr-tiny")


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return create_model("lrclr-tiny")


@pytest.fixture
def batch(tiny_tokenizer):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(len(REPORTS), 3, 64, 64, generator=g)
    return images, tiny_tokenizer(REPORTS)
