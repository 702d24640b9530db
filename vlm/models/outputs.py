"""Typed encoder outputs: grounding, region search and the index read fields, never positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageEmbedding:
    """What the image tower gives for a batch (all vectors L2-normalised).

    Boxes are (x0, y0, x1, y1) in pixels of the model input (image_size x image_size); map them
    to the original image with the preprocessing's letterbox record.
    """

    global_embedding: torch.Tensor  # (B, E)
    patch_embeddings: torch.Tensor  # (B, H, W, E) projected patch tokens
    region_embeddings: torch.Tensor | None = None  # (B, K, E) selected regions
    region_boxes: torch.Tensor | None = None  # (B, K, 4) input pixels
    region_scores: torch.Tensor | None = None  # (B, K) significance in (0, 1)
    candidate_logits: torch.Tensor | None = None  # (B, C) all candidate windows (training)
    patch_size: float = 16.0  # input pixels per patch

    @property
    def grid_size(self) -> tuple[int, int]:
        return int(self.patch_embeddings.shape[1]), int(self.patch_embeddings.shape[2])


@dataclass
class TextEmbedding:
    """Report (or prompt) vectors and one vector per sentence (all L2-normalised)."""

    global_embedding: torch.Tensor  # (B, E)
    sentence_embeddings: torch.Tensor  # (B, S, E)
    sentence_mask: torch.Tensor  # (B, S) bool: which sentence slots are real
