from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files


def all_test_files() -> list[Path]:
    """Every file in pydicom's own test data and in pydicom-data (which pydicom finds itself)."""
    return sorted({Path(p) for p in get_testdata_files() if Path(p).is_file()})


def sample_file(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not in the installed test data")
    return Path(str(path))


@pytest.fixture
def ct_slice() -> pydicom.Dataset:
    return pydicom.dcmread(sample_file("CT_small.dcm"))
