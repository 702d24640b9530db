"""The torchvision CPU shim: defines the two op schemas only when needed, never on CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torchvision")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_import_vlm_then_torchvision_works():
    status = _run(
        "import vlm, torch\n"
        "from vlm import _torchvision_compat as c\n"
        "import torchvision\n"
        "from torchvision import transforms\n"
        "t = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16)])\n"
        "x = t(torch.rand(1, 32, 48))\n"
        "assert tuple(x.shape) == (1, 16, 16)\n"
        "print(c.install())"
    )
    assert status in {"defined", "compiled-ok", "cuda", "present"}


def test_noop_when_torch_reports_cuda():
    status = _run(
        "import torch\n"
        "torch.version.cuda = '12.8'\n"
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('shim', 'vlm/_torchvision_compat.py')\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.install(), m._LIBRARY is None)"
    )
    assert status == "cuda True"


def test_install_is_idempotent():
    status = _run(
        "from vlm import _torchvision_compat as c\n"
        "a = c.install(); c._STATUS = None; b = c.install(); print(a, b)"
    )
    first, second = status.split()
    assert first in {"defined", "compiled-ok", "cuda"}
    assert second in {"present", "compiled-ok", "cuda"}  # never defines twice
