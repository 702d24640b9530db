"""Make ``import torchvision`` work on a CPU-only torch with a CUDA torchvision wheel.

torchvision 0.28.0 on PyPI is a CUDA build. On a CPU torch its compiled library fails to load,
and its Python-side meta registrations then die with
``RuntimeError: operator torchvision::nms does not exist``. The pure-Python parts (transforms,
model definitions) are fine once the two op *schemas* exist, so we define exactly those two,
only when the compiled library cannot be loaded and torch has no CUDA. Everything else is a no-op.
Calling the ops still fails loudly (there is no kernel); RadLens never calls them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Kept alive for the life of the process: dropping the Library object would undefine the ops.
_LIBRARY: Any = None
_STATUS: str | None = None


def _compiled_library() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in Path(folder).glob("_C.*"):
            if candidate.suffix in {".so", ".pyd", ".dylib"}:
                return candidate
    return None


def install() -> str:
    """Define the missing torchvision op schemas if (and only if) they are needed.

    Returns a short status: ``"absent"`` (no torchvision), ``"already-imported"``, ``"cuda"``
    (torch has CUDA: nothing to do), ``"compiled-ok"`` (the compiled ops load), ``"defined"``
    (schemas were defined) or ``"present"`` (the schemas already exist).
    """
    global _LIBRARY, _STATUS
    if _STATUS is not None:
        return _STATUS
    import sys

    if importlib.util.find_spec("torchvision") is None:
        _STATUS = "absent"
        return _STATUS
    if "torchvision" in sys.modules:
        _STATUS = "already-imported"
        return _STATUS

    import torch

    if torch.version.cuda is not None or torch.cuda.is_available():
        _STATUS = "cuda"
        return _STATUS

    lib_path = _compiled_library()
    if lib_path is not None:
        try:
            torch.ops.load_library(str(lib_path))
            _STATUS = "compiled-ok"
            return _STATUS
        except (OSError, RuntimeError) as exc:  # CUDA-linked build on a CPU torch
            logger.debug("torchvision compiled ops unavailable (%s); defining schemas", exc)

    missing = [name for name in _SCHEMAS if not _op_exists(torch, name)]
    if not missing:
        _STATUS = "present"
        return _STATUS
    lib = torch.library.Library("torchvision", "DEF")
    for name in missing:
        lib.define(_SCHEMAS[name])
    _LIBRARY = lib
    _STATUS = "defined"
    return _STATUS


def _op_exists(torch: Any, name: str) -> bool:
    try:
        return bool(torch._C._jit_get_schemas_for_operator(f"torchvision::{name}"))
    except RuntimeError:
        return False
