"""CLEAR: LeCL slice pre-training (MoCo v3 with lesion-enhanced negatives) + attention MIL.

Two models, used in two stages (methods.md section 2):

* :class:`LeCL`: a 2D slice encoder (any :class:`~vlm.models.vision.VisionTower`: open_clip ViT,
  BiomedCLIP-style, or a timm CNN) + MoCo v3 projector/predictor and a momentum copy. Its
  :meth:`LeCL.embed` gives the slice embeddings that CLEAR aggregates. The loss lives in
  :func:`vlm.losses.lecl_symmetric`.
* :class:`ClearMIL`: ABMIL over the slice embeddings of one volume, with a multi-label head or a
  Cox (time-to-event) head, returning a :class:`MILOutput` with attention and top-k slices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlm.errors import ConfigError
from vlm.models.config import VisionConfig
from vlm.models.momentum import make_momentum_copy, momentum_update
from vlm.models.vision import VisionTower

logger = logging.getLogger(__name__)

_VIT_NAMES = ("vit", "deit", "eva", "beit", "swin")


@dataclass(frozen=True)
class LeCLConfig:
    """LeCL / MoCo v3 slice pre-training; defaults are the official ones."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    embed_dim: int = 512  # slice embedding size (the tower's pooled output)
    projector_layers: int | None = None  # None: 3 for ViT towers, 2 for CNNs (MoCo v3)
    mlp_hidden: int = 4096
    out_dim: int = 256
    momentum: float = 0.99  # key encoder EMA (MoCo v3 raises it to 1 by a cosine schedule)
    temperature: float = 1.0
    lesion_weight: float = 10.0  # w; 0 = plain MoCo v3 (the ablation baseline)
    base_lr: float = 1e-4  # official AdamW lr = base_lr * batch / 256; recorded only: the CPU
    # recipe trains with TrainConfig.lr (vlm.train.lecl.default_train_config, 3e-4)
    weight_decay: float = 1e-6
    crop_scale: tuple[float, float] = (0.08, 1.0)


def is_vit(cfg: VisionConfig) -> bool:
    """Whether a vision config builds a transformer (MoCo v3 picks the MLP depths by this)."""
    if cfg.backend == "open_clip":
        return True
    return any(n in (cfg.timm_model or "").lower() for n in _VIT_NAMES)


def build_mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int,
              last_bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: [Linear(no bias) - BN - ReLU] * (n - 1), Linear(no bias), BN(affine=False)."""
    if num_layers < 1:
        raise ConfigError(f"an MLP needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                   nn.ReLU(inplace=True)]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim, bias=False))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class _EncoderProjector(nn.Module):
    """Vision tower + projector: the part the momentum encoder copies."""

    def __init__(self, cfg: LeCLConfig) -> None:
        super().__init__()
        vit = is_vit(cfg.vision)
        layers = cfg.projector_layers or (3 if vit else 2)
        self.encoder = VisionTower(cfg.vision, cfg.embed_dim)
        self.projector = build_mlp(layers, cfg.embed_dim, cfg.mlp_hidden, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.encoder(x)  # (B, E)
        return self.projector(pooled)  # (B, out)


@dataclass
class LeCLOutput:
    """Queries (online encoder + predictor) and keys (momentum encoder) of two views, unit norm."""

    q1: torch.Tensor  # (B, out)
    q2: torch.Tensor  # (B, out)
    k1: torch.Tensor  # (B, out), no gradient
    k2: torch.Tensor  # (B, out), no gradient


class LeCL(nn.Module):
    """MoCo v3 slice model; LeCL differs from MoCo v3 only in views and loss."""

    def __init__(self, cfg: LeCLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.base = _EncoderProjector(cfg)
        self.predictor = build_mlp(2, cfg.out_dim, cfg.mlp_hidden, cfg.out_dim,
                                   last_bn=is_vit(cfg.vision))
        self.momentum_base = make_momentum_copy(self.base)

    @property
    def encoder(self) -> VisionTower:
        return self.base.encoder

    def update_momentum(self, momentum: float) -> None:
        """EMA of the online encoder + projector into the momentum copy."""
        momentum_update(self.base, self.momentum_base, momentum)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                momentum: float | None = None) -> LeCLOutput:
        """x1, x2 (B, 3, S, S) two views; ``momentum`` given: EMA-update the keys first."""
        q1 = self.predictor(self.base(x1))  # (B, out)
        q2 = self.predictor(self.base(x2))
        with torch.no_grad():
            if momentum is not None:
                self.update_momentum(momentum)
            k1 = self.momentum_base(x1)  # (B, out)
            k2 = self.momentum_base(x2)
        return LeCLOutput(F.normalize(q1, dim=-1), F.normalize(q2, dim=-1),
                          F.normalize(k1, dim=-1), F.normalize(k2, dim=-1))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Slice embeddings (B, E) from the online encoder (not normalised), for CLEAR."""
        if self.training:
            raise RuntimeError("LeCL.embed needs eval mode: call model.eval() first")
        pooled, _ = self.encoder(x)
        return pooled


# --------------------------------------------------------------------------- CLEAR (ABMIL)

@dataclass(frozen=True)
class ClearConfig:
    """Attention-MIL aggregation of slice embeddings; training defaults are the official ones."""

    in_dim: int = 512  # slice embedding size
    hidden_dim: int = 256
    attention_dim: int = 256
    head_dim: int = 256
    dropout: float = 0.5  # nn.Dropout() default, as the official head
    n_outputs: int = 8  # DeepLesion's 8 lesion locations
    task: str = "multilabel"  # "multilabel" (BCE with pos_weight) | "cox" (one risk score)
    max_slices: int = 512  # sampled or padded per volume; lesion key slices always kept
    top_k: int = 5  # attention slices kept as the explanation
    lr: float = 1e-4  # Adam
    batch_size: int = 64
    epochs: int = 32
    patience: int = 8  # early stopping
    folds: int = 5


@dataclass
class MILOutput:
    """What :class:`ClearMIL` gives for a batch of volumes."""

    logits: torch.Tensor  # (B, n_outputs); for "cox" (B, 1) log-risk
    attention: torch.Tensor  # (B, S), sums to 1 over real slices, 0 on padding
    top_slices: torch.Tensor  # (B, k) slice indices by attention; -1 where a volume has < k
    embedding: torch.Tensor  # (B, hidden) attention-pooled volume embedding

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def risk(self) -> torch.Tensor:
        return self.logits[:, 0]


class ClearMIL(nn.Module):
    """ABMIL: Linear+ReLU, Linear-Tanh-Linear attention, softmax over slices, weighted sum."""

    def __init__(self, cfg: ClearConfig) -> None:
        super().__init__()
        if cfg.task not in ("multilabel", "cox"):
            raise ConfigError(f"unknown CLEAR task '{cfg.task}': use multilabel or cox")
        self.cfg = cfg
        n_out = 1 if cfg.task == "cox" else cfg.n_outputs
        self.embed = nn.Sequential(nn.Linear(cfg.in_dim, cfg.hidden_dim), nn.ReLU())
        self.attention = nn.Sequential(nn.Linear(cfg.hidden_dim, cfg.attention_dim), nn.Tanh(),
                                       nn.Linear(cfg.attention_dim, 1))
        self.head = nn.Sequential(nn.LayerNorm(cfg.hidden_dim),
                                  nn.Linear(cfg.hidden_dim, cfg.head_dim),
                                  nn.Dropout(cfg.dropout), nn.SiLU(),
                                  nn.Linear(cfg.head_dim, n_out))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """x (B, S, D) slice embeddings; mask (B, S) True for real slices (None: all real)."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every volume needs at least one unmasked slice")
        h = self.embed(x)  # (B, S, H)
        scores = self.attention(h).squeeze(-1)  # (B, S)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)  # (B, S), exactly 0 on padding
        pooled = torch.einsum("bs,bsh->bh", attn, h)  # (B, H)
        logits = self.head(pooled)
        k = min(self.cfg.top_k, x.shape[1])
        top = attn.detach().topk(k, dim=1)
        top_idx = top.indices.masked_fill(~mask.gather(1, top.indices), -1)  # (B, k)
        return MILOutput(logits=logits, attention=attn, top_slices=top_idx, embedding=pooled)


def pad_bags(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-volume slice embeddings [(S_i, D)] into (B, S_max, D) + mask (B, S_max)."""
    if not bags:
        raise ValueError("pad_bags needs at least one volume")
    s_max = max(int(b.shape[0]) for b in bags)
    x = bags[0].new_zeros(len(bags), s_max, bags[0].shape[1])
    mask = torch.zeros(len(bags), s_max, dtype=torch.bool, device=bags[0].device)
    for i, b in enumerate(bags):
        x[i, : b.shape[0]] = b
        mask[i, : b.shape[0]] = True
    return x, mask


def select_slices(n_slices: int, max_slices: int, keep: Sequence[int] = (),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted indices of at most ``max_slices`` slices; ``keep`` (lesion key slices) first.

    If the volume fits, all slices are returned (pad with :func:`pad_bags`); otherwise every kept
    slice (a random subset if even they do not fit) plus random others.
    """
    if n_slices <= max_slices:
        return torch.arange(n_slices)
    keep_t = torch.tensor(sorted({int(k) for k in keep if 0 <= int(k) < n_slices}),
                          dtype=torch.long)
    if keep_t.numel() >= max_slices:
        chosen = keep_t[torch.randperm(keep_t.numel(), generator=generator)[:max_slices]]
        return chosen.sort().values
    is_kept = torch.zeros(n_slices, dtype=torch.bool)
    is_kept[keep_t] = True
    others = torch.nonzero(~is_kept).squeeze(1)
    extra = others[torch.randperm(others.numel(), generator=generator)[: max_slices
                                                                         - keep_t.numel()]]
    return torch.cat([keep_t, extra]).sort().values


def positive_class_weights(labels: torch.Tensor) -> torch.Tensor:
    """BCE ``pos_weight`` (C,) = negatives / positives per class from (N, C) 0/1 labels."""
    pos = labels.float().sum(0)
    neg = labels.shape[0] - pos
    return neg / pos.clamp_min(1.0)
