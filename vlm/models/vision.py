"""Image towers: an open_clip VisionTransformer or any timm backbone, as a patch grid + vector.

Both give ``(pooled (B, E), patches (B, H, W, E))`` in the joint embedding space: open_clip
patch tokens go through the same projection as the pooled token (so a pretrained CLIP/BiomedCLIP
tower gives meaningful patch similarities), timm features through one shared linear layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlm.errors import ConfigError
from vlm.models.config import VisionConfig


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.proj: nn.Linear | None = None
        #: a CNN trunk (4-D feature maps), which :meth:`use_channels_last` can speed up
        self.convolutional = False
        self._channels_last = False
        if cfg.backend == "open_clip":
            from open_clip.model import CLIPVisionCfg, _build_vision_tower

            vcfg = CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=cfg.head_width,
                                 mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size,
                                 image_size=cfg.image_size, pool_type=cfg.pool_type,
                                 output_tokens=True)
            self.trunk = _build_vision_tower(embed_dim, vcfg)
            self.patch_size = float(cfg.patch_size)
        elif cfg.backend == "timm":
            import timm

            if not cfg.timm_model:
                raise ConfigError("vision backend 'timm' needs 'timm_model'")
            kwargs = dict(cfg.timm_kwargs)
            if "vit" in cfg.timm_model or "deit" in cfg.timm_model:
                kwargs.setdefault("img_size", cfg.image_size)
            self.trunk = timm.create_model(cfg.timm_model, pretrained=False, num_classes=0,
                                           **kwargs)
            self.proj = nn.Linear(int(self.trunk.num_features), embed_dim, bias=False)
            with torch.no_grad():
                grid = self._timm_grid(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
            self.patch_size = cfg.image_size / grid
        else:
            raise ConfigError(f"unknown vision backend '{cfg.backend}': use open_clip or timm")
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        cfg = self.cfg
        if cfg.freeze:
            for name, p in self.trunk.named_parameters():
                if not (self.proj is None and name == "proj"):
                    p.requires_grad_(False)
        elif cfg.freeze_layers >= 0:
            if self.proj is not None:
                raise ConfigError("freeze_layers is for open_clip towers; use freeze for timm")
            for name, p in self.trunk.named_parameters():
                parts = name.split(".")
                block = (int(parts[2]) if parts[:2] == ["transformer", "resblocks"] else None)
                stem = parts[0] in ("conv1", "class_embedding", "positional_embedding",
                                    "ln_pre")
                if stem or (block is not None and block < cfg.freeze_layers):
                    p.requires_grad_(False)

    def use_channels_last(self, enabled: bool = True) -> bool:
        """Run a CNN trunk in channels-last memory order: the same values up to float rounding
        (4.5e-8 here), faster with oneDNN on the CPU (ResNet-18 at 160 px, batch 32, two
        threads: 103 -> 124 images/s encoding, 58 -> 75 samples/s for a bf16 training step;
        ``benchmarks/channels_last.py``). False (nothing changed) for a ViT. Saved weights do
        not depend on it (checkpoints and fingerprints store contiguous bytes).
        ``enabled=False`` goes back to the default order."""
        if not self.convolutional:
            return False
        self.trunk.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self._channels_last = enabled
        return True

    def _timm_grid(self, x: torch.Tensor) -> int:
        feats = self.trunk.forward_features(x)
        if feats.ndim == 4:
            self.convolutional = True
            return int(feats.shape[-1])
        prefix = int(getattr(self.trunk, "num_prefix_tokens", 1))
        return math.isqrt(feats.shape[1] - prefix)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, S, S) -> pooled (B, E), patches (B, H, W, E); neither normalised."""
        if self.proj is None:
            pooled, tokens = self.trunk(x)  # (B, E), (B, N, W)
            patches = tokens @ self.trunk.proj  # (B, N, E)
        else:
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats = self.trunk.forward_features(x)
            pooled = self.proj(self.trunk.forward_head(feats, pre_logits=True))
            if feats.ndim == 4:  # CNN: (B, C, H, W)
                tokens = feats.flatten(2).transpose(1, 2)
            else:  # ViT: (B, prefix + N, C)
                tokens = feats[:, int(getattr(self.trunk, "num_prefix_tokens", 1)):]
            patches = self.proj(tokens)
        b, n, e = patches.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ConfigError(f"vision tower gave {n} patch tokens, not a square grid")
        return pooled, patches.reshape(b, side, side, e)
