"""Pixels and words -> vectors: readers, data, models, losses, training, zero-shot, grounding."""

from __future__ import annotations

from vlm import _torchvision_compat

# The one import-time side effect allowed in RadLens (see vlm/_torchvision_compat.py).
_torchvision_compat.install()

__version__ = "0.1.0"
