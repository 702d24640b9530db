"""Contrastive losses. Distributed-ready: ``rank`` and ``world_size`` are arguments, features
are gathered across processes with gradients kept for the local shard, no global state.

- :class:`ClipLoss`: symmetric InfoNCE on global vectors (learnable temperature).
- :class:`LRCLRLoss`: ClipLoss + a local term: symmetric InfoNCE over the region–sentence
  matching scores (GLoRIA-style aggregation), weights 1:1 by default, optional entropy term on
  the region scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlm.models.config import LossConfig
from vlm.models.lrclr import LRCLR
from vlm.models.outputs import ImageEmbedding, TextEmbedding

GatherFn = Callable[[torch.Tensor], list[torch.Tensor]]


def _dist_gather(x: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist
    import torch.distributed.nn as dist_nn

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 but torch.distributed is not initialised")
    return list(dist_nn.all_gather(x))


def gather_features(x: torch.Tensor, rank: int = 0, world_size: int = 1,
                    gather_fn: GatherFn | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; the local shard keeps its gradient."""
    if world_size <= 1:
        return x
    parts = list((gather_fn or _dist_gather)(x))
    if len(parts) != world_size:
        raise RuntimeError(f"gather returned {len(parts)} shards for world_size {world_size}")
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _pad_sentences(x: torch.Tensor, mask: torch.Tensor, length: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the sentence axis so shards from different ranks can be gathered."""
    extra = length - x.shape[1]
    if extra <= 0:
        return x, mask
    return F.pad(x, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


class ClipLoss(nn.Module):
    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                rank: int = 0, world_size: int = 1, gather_fn: GatherFn | None = None
                ) -> torch.Tensor:
        """image, text (B, E) unit vectors of matching pairs on this rank."""
        all_image = gather_features(image, rank, world_size, gather_fn)
        all_text = gather_features(text, rank, world_size, gather_fn)
        scale = logit_scale.exp().clamp(max=100.0)
        labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        logits_i = scale * image @ all_text.T  # (B, B * world)
        logits_t = scale * text @ all_image.T
        return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


class LRCLRLoss(nn.Module):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = ClipLoss()

    def forward(self, model: LRCLR, image: ImageEmbedding, text: TextEmbedding, rank: int = 0,
                world_size: int = 1, gather_fn: GatherFn | None = None,
                max_sentences: int | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        out["global"] = self.clip(image.global_embedding, text.global_embedding,
                                  model.logit_scale, rank, world_size, gather_fn)
        total = cfg.global_weight * out["global"]
        local = model.local_features(image)
        if model.cross is not None and local is not None and cfg.local_weight > 0:
            sents, mask = text.sentence_embeddings, text.sentence_mask
            if world_size > 1:  # every rank pads to the same sentence count
                sents, mask = _pad_sentences(sents, mask, max_sentences or sents.shape[1])
            all_local = gather_features(local, rank, world_size, gather_fn)
            all_sents = gather_features(sents, rank, world_size, gather_fn)
            all_mask = gather_features(mask.to(sents.dtype), rank, world_size, gather_fn) > 0.5
            b = local.shape[0]
            labels = torch.arange(b, device=local.device) + rank * b
            scale = 1.0 / cfg.local_temperature
            t2i = scale * model.cross.match(sents, mask, all_local)  # (B, B * world)
            i2t = scale * model.cross.match(all_sents, all_mask, local).T  # (B, B * world)
            out["local"] = (F.cross_entropy(t2i, labels) + F.cross_entropy(i2t, labels)) / 2
            total = total + cfg.local_weight * out["local"]
        if cfg.region_entropy_weight > 0 and image.candidate_logits is not None:
            p = torch.softmax(image.candidate_logits, dim=-1)
            out["entropy"] = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
            total = total + cfg.region_entropy_weight * out["entropy"]
        out["loss"] = total
        return out
