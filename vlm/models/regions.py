"""LRCLR's two local modules: region selection over the patch grid, and sentence-to-region
cross-attention. Each is switched on/off by the config, so plain CLIP is the same code.

Reconstruction note: the LRCLR paper (arXiv 2303.14153) is known here only from its abstract;
this is RadLens's reconstruction (see ``../shared/methods.md`` and the model card).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.models.config import CrossAttentionConfig, RegionConfig


def candidate_windows(height: int, width: int, scales: tuple[int, ...]
                      ) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Square windows of the patch grid at each scale (stride = half the side, at least 1).

    Returns:
        (per scale (rows, cols) of the pooled map) and boxes (C, 4) = (x0, y0, x1, y1) in
        patch units, in the order the pooled maps are flattened.
    """
    shapes, boxes = [], []
    for s in scales:
        if s > min(height, width):
            continue
        stride = max(1, s // 2)
        rows = (height - s) // stride + 1
        cols = (width - s) // stride + 1
        shapes.append((rows, cols))
        for r in range(rows):
            for c in range(cols):
                boxes.append((c * stride, r * stride, c * stride + s, r * stride + s))
    return shapes, torch.tensor(boxes, dtype=torch.float32)


class RegionSelector(nn.Module):
    """Score candidate windows and keep the top-k (hard in the forward pass; the scores get
    gradients through a straight-through weight ``1 + s - stop_grad(s)``)."""

    def __init__(self, dim: int, cfg: RegionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scales = tuple(int(s) for s in cfg.scales)
        self.scale_embed = nn.Parameter(torch.zeros(len(self.scales), dim))
        self.scorer = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, cfg.hidden), nn.GELU(),
                                    nn.Linear(cfg.hidden, 1))

    def candidates(self, patches: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """patches (B, H, W, E) -> candidate features (B, C, E), scale ids (C,) and boxes
        (C, 4) in patch units."""
        _, h, w, _ = patches.shape
        x = patches.permute(0, 3, 1, 2)  # (B, E, H, W)
        feats, scale_ids = [], []
        for idx, s in enumerate(self.scales):
            if s > min(h, w):
                continue
            pooled = F.avg_pool2d(x, kernel_size=s, stride=max(1, s // 2))  # (B, E, h', w')
            feats.append(pooled.flatten(2).transpose(1, 2))
            scale_ids += [idx] * feats[-1].shape[1]
        _, boxes = candidate_windows(h, w, self.scales)
        ids = torch.tensor(scale_ids, device=patches.device)
        return torch.cat(feats, dim=1), ids, boxes.to(patches.device)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
        """-> region features (B, K, E), boxes (B, K, 4) patch units, scores (B, K),
        candidate logits (B, C)."""
        feats, scale_ids, boxes = self.candidates(patches)  # (B, C, E), (C,), (C, 4)
        logits = self.scorer(feats + self.scale_embed[scale_ids]).squeeze(-1)  # (B, C)
        k = min(self.cfg.top_k, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, K)
        soft = torch.sigmoid(logits).gather(1, top)  # (B, K)
        weight = 1.0 + soft - soft.detach()  # == 1 forward; d/dlogit in backward
        chosen = feats.gather(1, top.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        return chosen * weight.unsqueeze(-1), boxes[top], soft.detach(), logits


class RegionSentenceAttention(nn.Module):
    """Each sentence attends over an image's regions; the image–report matching score
    aggregates sentence–context cosines with (1/g) log sum exp(g cos) (GLoRIA)."""

    def __init__(self, dim: int, cfg: CrossAttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query: nn.Module = nn.Identity()
        self.key: nn.Module = nn.Identity()
        if cfg.learnable:
            self.query = nn.Linear(dim, dim, bias=False)
            self.key = nn.Linear(dim, dim, bias=False)
            with torch.no_grad():  # start as GLoRIA's parameter-free attention
                self.query.weight.copy_(torch.eye(dim))
                self.key.weight.copy_(torch.eye(dim))

    def attend(self, sentences: torch.Tensor, regions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """All pairs: sentences (T, S, E), regions (I, K, E) -> context (T, I, S, E), attention
        (T, I, S, K)."""
        q = F.normalize(self.query(sentences), dim=-1)
        k = F.normalize(self.key(regions), dim=-1)
        sim = torch.einsum("tse,ike->tisk", q, k)
        attn = torch.softmax(self.cfg.attention_temperature * sim, dim=-1)
        context = torch.einsum("tisk,ike->tise", attn, regions)
        return context, attn

    def match(self, sentences: torch.Tensor, sentence_mask: torch.Tensor, regions: torch.Tensor
              ) -> torch.Tensor:
        """Matching scores (T, I) between every report and every image."""
        context, _ = self.attend(sentences, regions)
        cos = F.cosine_similarity(sentences.unsqueeze(1), context, dim=-1)  # (T, I, S)
        g = self.cfg.aggregation
        cos = cos.masked_fill(~sentence_mask.unsqueeze(1), float("-inf"))
        return torch.logsumexp(g * cos, dim=-1) / g
