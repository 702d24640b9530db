"""The installed environment is CPU-only: no CUDA, cuDNN, NCCL or Triton packages."""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil

import pytest

pytestmark = pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                                reason="a GPU machine installs the CUDA stack on purpose")


def test_no_cuda_packages_installed():
    names = sorted({(d.metadata["Name"] or "").lower() for d in md.distributions()})
    bad = [n for n in names if re.match(r"^(nvidia-|cuda|triton|cupy|jax-cuda)", n)]
    assert not bad, f"CUDA packages installed on a CPU machine: {bad}"


def test_torch_is_the_cpu_build():
    import torch

    assert torch.__version__.startswith("2.13.0")
    assert torch.version.cuda is None
