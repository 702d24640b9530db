"""Text tower: a transformers encoder (BERT family) with report and sentence pooling.

State-dict names match open_clip's ``HFTextEncoder`` (``transformer.*``, ``proj.*``), so the
text half of an open_clip/BiomedCLIP checkpoint loads directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlm.errors import ConfigError
from vlm.models.config import TextConfig
from vlm.models.tokenizer import TokenBatch


def build_projection(hidden: int, embed_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden, embed_dim, bias=False)
    if kind == "mlp":  # open_clip's HF "mlp" projection
        mid = (hidden + embed_dim) // 2
        return nn.Sequential(nn.Linear(hidden, mid, bias=False), nn.GELU(),
                             nn.Linear(mid, embed_dim, bias=False))
    raise ConfigError(f"unknown text projection '{kind}': use linear or mlp")


class TextTower(nn.Module):
    pool_mean: torch.Tensor
    pool_std: torch.Tensor

    def __init__(self, cfg: TextConfig, embed_dim: int, source_dir: Path,
                 load_pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        try:
            hf_cfg = AutoConfig.from_pretrained(str(source_dir))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"no transformers config in {source_dir} ({type(exc).__name__})"
                              ) from None
        for key, value in cfg.overrides.items():
            setattr(hf_cfg, key, value)
        use_weights = load_pretrained and cfg.pretrained and not cfg.overrides
        if use_weights:
            from transformers.utils import logging as hf_logging

            # transformers draws a "Loading weights" bar on stderr for these 22M parameters
            # (a few ms), on every command that loads a model, even under --json
            shown = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self.transformer = AutoModel.from_pretrained(str(source_dir), config=hf_cfg)
            finally:
                if shown:
                    hf_logging.enable_progress_bar()
        else:
            self.transformer = AutoModel.from_config(hf_cfg)
        self.loaded_pretrained = use_weights
        hidden = int(hf_cfg.hidden_size)
        self.proj = build_projection(hidden, embed_dim, cfg.proj_type)
        # Fixed per-dimension standardisation of the pooled states before the projection.
        # Sentence-encoder states share a large common direction (mean pairwise cosine ~0.6 for
        # MiniLM on reports), which a freshly initialised projection turns into near-identical
        # embeddings and a contrastive loss with almost no signal. Identity until fitted.
        self.register_buffer("pool_mean", torch.zeros(hidden))
        self.register_buffer("pool_std", torch.ones(hidden))
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        cfg = self.cfg
        if cfg.freeze:
            for p in self.transformer.parameters():
                p.requires_grad_(False)
            return
        if cfg.freeze_layers >= 0:
            for name, p in self.transformer.named_parameters():
                layer = _layer_index(name)
                if "embeddings" in name or (layer is not None and layer < cfg.freeze_layers):
                    p.requires_grad_(False)

    def forward(self, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> report (B, E), sentences (B, S, E), sentence_mask (B, S); not normalised."""
        report, sentences, mask = self.pool(tokens)
        return self.project(report), self.project(sentences), mask

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """Pooled encoder states (..., H) -> joint space (..., E), not normalised."""
        return self.proj((states - self.pool_mean) / self.pool_std)

    @torch.no_grad()
    def fit_standardizer(self, reports: torch.Tensor, sentences: torch.Tensor,
                         mask: torch.Tensor) -> None:
        """Set the standardisation from a training corpus's pooled states (reports plus every
        real sentence). Call once before training a fresh projection, never on a pretrained
        one (it would change what that projection sees)."""
        states = torch.cat([reports, sentences[mask]]).double()
        self.pool_mean.copy_(states.mean(0).to(self.pool_mean.dtype))
        self.pool_std.copy_(states.std(0).clamp_min(1e-4).to(self.pool_std.dtype))

    def pool(self, tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder states pooled per report (B, H) and per sentence (B, S, H), before the
        projection. With a frozen encoder these are constant, so training can cache them."""
        tokens = tokens.to(self.pool_mean.device)  # tokenizers make CPU tensors
        out = self.transformer(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        h = out.last_hidden_state  # (B, L, H)
        mask = tokens.attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        if self.cfg.pooler == "cls":
            report = h[:, 0]
        else:
            report = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        n_sent = max(int(tokens.n_sentences.max().item()), 1)
        sid = tokens.sentence_ids  # (B, L)
        onehot = torch.nn.functional.one_hot((sid + 1).clamp_min(0), n_sent + 1)[..., 1:]
        onehot = onehot.to(h.dtype)  # (B, L, S)
        counts = onehot.sum(1)  # (B, S)
        sentences = torch.einsum("bls,blh->bsh", onehot, h) / counts.clamp_min(1.0)[..., None]
        return report, sentences, counts > 0


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "block") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
