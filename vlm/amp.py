"""Mixed precision in one place: the ``amp`` values RadLens accepts and the autocast context
they mean, for training (``TrainConfig.amp``) and image encoding (``Encoder(amp=...)``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

#: autocast precisions (``None`` everywhere means: as the weights are loaded)
AMP_CHOICES = ("bf16", "fp16")


def autocast(amp: str | None, device: str | torch.device
             ) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device``'s type in bf16 or fp16, or nothing for ``None``."""
    if amp is None:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bfloat16 features (AVX-512 BF16, AMX), from ``/proc/cpuinfo``; empty
    where it has none (bf16 then runs emulated, often slower than fp32) or cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
