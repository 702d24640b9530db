"""LRCLR: image tower with local-region selection + clinical text tower + region–sentence
cross-attention. With ``region.enabled`` and ``cross_attention.enabled`` off it is plain CLIP,
which is the baseline trained with the same code and budget.

Reconstruction note: LRCLR (Rizvi et al., arXiv 2303.14153) is implemented from its abstract;
the parts and defaults are documented in ``../shared/methods.md`` and the model card.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlm.errors import ConfigError
from vlm.models.config import ModelConfig
from vlm.models.outputs import ImageEmbedding, TextEmbedding
from vlm.models.regions import RegionSelector, RegionSentenceAttention
from vlm.models.text import TextTower
from vlm.models.tokenizer import TokenBatch
from vlm.models.vision import VisionTower


class LRCLR(nn.Module):
    def __init__(self, config: ModelConfig, text_source: Path, load_text_weights: bool = True
                 ) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.visual = VisionTower(config.vision, dim)
        self.text = TextTower(config.text, dim, text_source, load_pretrained=load_text_weights)
        self.regions = RegionSelector(dim, config.region) if config.region.enabled else None
        self.cross = (RegionSentenceAttention(dim, config.cross_attention)
                      if config.cross_attention.enabled else None)
        if config.vision.embed_norm not in ("none", "batch"):
            raise ConfigError(f"vision.embed_norm must be 'none' or 'batch', not "
                              f"{config.vision.embed_norm!r}")
        batch = config.vision.embed_norm == "batch"
        self.image_norm = nn.BatchNorm1d(dim, affine=False) if batch else None
        self.patch_norm = nn.BatchNorm1d(dim, affine=False) if batch else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.loss.init_temperature)))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_image(self, images: torch.Tensor) -> ImageEmbedding:
        """images (B, 3, S, S) normalised -> ImageEmbedding (all vectors unit length)."""
        pooled, patches = self.visual(images)  # (B, E), (B, H, W, E)
        if self.image_norm is not None and self.patch_norm is not None:
            pooled = self.image_norm(pooled)
            patches = self.patch_norm(patches.flatten(0, 2)).view_as(patches)
        out = ImageEmbedding(global_embedding=F.normalize(pooled, dim=-1),
                             patch_embeddings=F.normalize(patches, dim=-1),
                             patch_size=float(self.visual.patch_size))
        if self.regions is not None:
            feats, boxes, scores, logits = self.regions(patches)
            out.region_embeddings = F.normalize(feats, dim=-1)
            out.region_boxes = boxes * self.visual.patch_size
            out.region_scores = scores
            out.candidate_logits = logits
        return out

    def encode_text(self, tokens: TokenBatch) -> TextEmbedding:
        """Reports or prompts -> TextEmbedding (report and sentence vectors unit length)."""
        return self.text_from_pooled(*self.text.pool(tokens))

    def text_from_pooled(self, report: torch.Tensor, sentences: torch.Tensor,
                         mask: torch.Tensor) -> TextEmbedding:
        """Finish text encoding from (cached) pooled encoder states."""
        report, sentences = self.text.project(report), self.text.project(sentences)
        return TextEmbedding(global_embedding=F.normalize(report, dim=-1),
                             sentence_embeddings=F.normalize(sentences, dim=-1),
                             sentence_mask=mask)

    def local_features(self, image: ImageEmbedding) -> torch.Tensor | None:
        """What sentences attend over: selected regions, or all patches without selection."""
        if self.cross is None:
            return None
        if image.region_embeddings is not None:
            return image.region_embeddings
        return image.patch_embeddings.flatten(1, 2)

    def forward(self, images: torch.Tensor, tokens: TokenBatch
                ) -> tuple[ImageEmbedding, TextEmbedding]:
        return self.encode_image(images), self.encode_text(tokens)

    def similarity(self, image: ImageEmbedding, text: TextEmbedding) -> torch.Tensor:
        """Image–text logits (I, T) for retrieval and zero-shot: the global logits, plus the local
        matching logits when cross-attention is on (the two terms the training loss adds)."""
        cfg = self.config.loss
        scores = self.logit_scale.exp() * (image.global_embedding @ text.global_embedding.T)
        local = self.local_features(image)
        if self.cross is not None and local is not None:
            match = self.cross.match(text.sentence_embeddings, text.sentence_mask, local).T
            scores = cfg.global_weight * scores + cfg.local_weight * match / cfg.local_temperature
        return scores
