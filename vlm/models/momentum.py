"""Momentum (EMA) key encoders, shared by LeCL/MoCo v3 and DrasCLR."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def make_momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online`` to serve as the momentum (key) encoder."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q for every parameter.

    Buffers (BatchNorm running statistics) are left alone, as in MoCo v2/v3: the key encoder
    keeps its own statistics from its own forward passes.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for p_q, p_k in zip(online.parameters(), target.parameters(), strict=True):
        p_k.mul_(momentum).add_(p_q.detach(), alpha=1.0 - momentum)


def cosine_momentum(base: float, progress: float) -> float:
    """MoCo v3 schedule: m rises from ``base`` to 1 along a half cosine (progress in [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)
