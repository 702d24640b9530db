"""LesionSeg3D: a small supervised 3-D lesion segmenter with one output channel per lesion
location, and the per-location lesion profile it gives each CT volume.

Why it exists: the self-supervised volume vectors (CLEAR/LeCL slice means, DrasCLR lattice
means) encode the subject -- body size, organ shapes, emphysema grade -- and leave focal
lesions at the base rate in similar-case search (README, "CT volumes"). A lesion that fills
2-8 of 128 slices needs a detector trained on lesion masks. This one is **supervised**: it is
trained on the PhantomCT lesion masks of the train split (``radlens train lesion-seg``), so its
profile is a finding-level description of the volume, not a task-agnostic representation.

Input (:func:`model_input`): the HU volume on the model's grid (``LesionSegConfig.spacing_mm``;
:class:`vlm.volume_encoder.VolumeEncoder` resamples) as one channel per HU window plus three
channels of normalised coordinates in the body's bounding box (-1..1 per axis, superior /
posterior / left positive, as :func:`vlm.data.drasclr_patches.bbox_frame`), so the network can
tell the liver's side of the abdomen from the spleen's -- the anatomical conditioning of DrasCLR
given as input channels.

Network: a two-level 3-D U-Net (full-resolution stem, a half-resolution encoder, a quarter
resolution block with dilations 1-2-4 for context, one skip) with batch norm; output logits at
half resolution, one sigmoid channel per location class (multi-label: a voxel may belong to
none). Input sides must be multiples of 4 (:func:`predict` pads).

Volume profile (:func:`volume_scores`): per location, the mean of the ``top_k`` highest
half-resolution probabilities. Training validates with the default 20; the shipped model
reads out ``top_k = 1`` (the location's largest probability), set at export
(``radlens export-volume-model --top-k``) because on the validation split every smaller k
searched better: a 10-15 mm lesion covers only a few half-resolution cells, which a mean over
20 dilutes (README, "CT volumes").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlm.data.phantom_ct.tissues import LOCATION_CLASSES
from vlm.errors import ConfigError

AIR_HU = -1024.0
MULTIPLE = 4  # input sides must be divisible by this (two 2x poolings)


@dataclass(frozen=True)
class LesionSegConfig:
    """Architecture and input definition (all of it is part of the checkpoint's fingerprint)."""

    width: int = 16
    classes: tuple[str, ...] = LOCATION_CLASSES
    #: (low, high) HU of each window channel, each scaled to [0, 1]
    windows: tuple[tuple[float, float], ...] = ((-160.0, 240.0), (-1000.0, 400.0))
    coords: bool = True  # three body-bounding-box coordinate channels
    spacing_mm: tuple[float, float, float] = (3.75, 2.7344, 2.7344)  # (z, y, x) model grid
    top_k: int = 20  # half-resolution voxels averaged per location for the volume score
    frame_threshold_hu: float = -500.0  # body = voxels above this (coordinate frame)

    def __post_init__(self) -> None:
        if int(self.width) < 1:  # a zero-channel convolution was an internal RuntimeError
            raise ConfigError(f"the lesion-seg width (channels of the first block) must be at "
                              f"least 1, got {self.width}")
        if not self.windows:
            raise ConfigError("a lesion-seg model needs at least one HU window")
        if int(self.top_k) < 1:
            raise ConfigError(f"top_k must be at least 1 (the voxels averaged per location), "
                              f"got {self.top_k}")
        for lo, hi in self.windows:
            if not float(lo) < float(hi):
                raise ConfigError(f"HU window ({lo:g}, {hi:g}): the low end must be below the "
                                  "high end")

    @property
    def in_channels(self) -> int:
        return len(self.windows) + (3 if self.coords else 0)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LesionSegConfig:
        d = dict(data)
        d["classes"] = tuple(d["classes"])
        d["windows"] = tuple((float(a), float(b)) for a, b in d["windows"])
        d["spacing_mm"] = tuple(float(s) for s in d["spacing_mm"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"lesion-seg config has unknown fields {unknown}")
        return cls(**d)


def _block(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=dilation, dilation=dilation),
                         nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))


class LesionSeg3D(nn.Module):
    """(B, in_channels, Z, Y, X) -> (B, n_classes, Z/2, Y/2, X/2) logits."""

    def __init__(self, cfg: LesionSegConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or LesionSegConfig()
        c = int(cfg.width)
        self.stem = _block(cfg.in_channels, c)
        self.enc2 = nn.Sequential(_block(c, 2 * c), _block(2 * c, 2 * c))
        self.enc4 = nn.Sequential(_block(2 * c, 4 * c), _block(4 * c, 4 * c, 2),
                                  _block(4 * c, 4 * c, 4))
        self.dec2 = _block(6 * c, 2 * c)
        self.head = nn.Conv3d(2 * c, cfg.n_classes, 1)
        # start every location at a 1% lesion prior (RetinaNet): the rare positives are not
        # swamped by the background's loss in the first steps
        assert self.head.bias is not None
        nn.init.constant_(self.head.bias, -math.log(99.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_channels:
            raise ConfigError(f"LesionSeg3D expects (B, {self.cfg.in_channels}, Z, Y, X), got "
                              f"{tuple(x.shape)}")
        if any(s % MULTIPLE for s in x.shape[2:]):
            raise ConfigError(f"LesionSeg3D input sides must be multiples of {MULTIPLE}, got "
                              f"{tuple(x.shape[2:])} (predict() pads)")
        half = self.enc2(F.max_pool3d(self.stem(x), 2))
        quarter = self.enc4(F.max_pool3d(half, 2))
        up = F.interpolate(quarter, size=half.shape[2:], mode="trilinear", align_corners=False)
        logits: torch.Tensor = self.head(self.dec2(torch.cat([half, up], dim=1)))
        return logits


# --------------------------------------------------------------------------- inputs

def coordinate_channels(shape: Sequence[int], frame: Mapping[str, Any],
                        offset: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """(3, Z, Y, X) normalised (k, j, i) coordinates of a block starting at ``offset`` in a
    volume whose body frame is ``frame`` (``lo`` -> -1, ``hi`` -> +1; not clipped)."""
    lo, hi = frame["lo"], frame["hi"]
    axes = []
    for a in range(3):
        idx = np.arange(int(offset[a]), int(offset[a]) + int(shape[a]), dtype=np.float64)
        span = max(float(hi[a]) - float(lo[a]), 1.0)
        axes.append(torch.from_numpy(((idx - float(lo[a])) / span * 2.0 - 1.0).astype(np.float32)))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def window_channels(hu: torch.Tensor, cfg: LesionSegConfig) -> torch.Tensor:
    """(W, Z, Y, X): each HU window of ``cfg`` scaled to [0, 1]."""
    hu = hu.float()
    return torch.stack([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in cfg.windows])


def model_input(hu: torch.Tensor, cfg: LesionSegConfig, frame: Mapping[str, Any],
                offset: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """(in_channels, Z, Y, X) network input of a (Z, Y, X) HU block at ``offset`` in its volume."""
    x = window_channels(hu, cfg)
    if cfg.coords:
        x = torch.cat([x, coordinate_channels(tuple(hu.shape), frame, offset)])
    return x


def body_box_frame(hu: np.ndarray, threshold: float) -> dict[str, Any]:
    """The coordinate frame of a volume: its body's bounding box (voxels above ``threshold``)."""
    from vlm.data.drasclr_patches import bbox_frame

    try:
        return bbox_frame(hu, threshold)
    except ValueError:
        raise ConfigError(f"no voxel above {threshold:g} HU: the lesion model needs a CT volume "
                          "in HU") from None


# --------------------------------------------------------------------------- inference

@torch.no_grad()
def predict(model: LesionSeg3D, hu: np.ndarray | torch.Tensor, *, chunk: int = 128,
            margin: int = 16, device: str | torch.device = "cpu") -> torch.Tensor:
    """(C, ceil(Z/2), ceil(Y/2), ceil(X/2)) lesion probabilities of a (Z, Y, X) HU volume on the
    model's grid. The volume is padded with air to multiples of 4; volumes taller than
    ``chunk + 2 * margin`` slices are run in z-chunks with ``margin`` slices of context each side
    (the network's receptive field is about 40 voxels), so memory stays bounded."""
    cfg = model.cfg
    was_training = model.training
    model.eval()
    vol = torch.as_tensor(np.asarray(hu, dtype=np.float32))
    if vol.ndim != 3:
        raise ConfigError(f"a volume must be (Z, Y, X), got shape {tuple(vol.shape)}")
    frame = body_box_frame(vol.numpy(), cfg.frame_threshold_hu)
    z, y, x = vol.shape
    pads = [(-s) % MULTIPLE for s in (z, y, x)]
    vol = F.pad(vol, (0, pads[2], 0, pads[1], 0, pads[0]), value=AIR_HU)
    zp = vol.shape[0]
    chunk = max(MULTIPLE, chunk - chunk % MULTIPLE)
    margin = margin - margin % MULTIPLE
    out = torch.zeros((cfg.n_classes, zp // 2, vol.shape[1] // 2, vol.shape[2] // 2))
    try:
        starts = [0] if zp <= chunk + 2 * margin else list(range(0, zp, chunk))
        for s in starts:
            e = zp if len(starts) == 1 else min(s + chunk, zp)
            a, b = max(0, s - margin), min(zp, e + margin)
            block = model_input(vol[a:b], cfg, frame, (a, 0, 0))[None].to(device)
            prob = torch.sigmoid(model(block).float())[0].cpu()
            out[:, s // 2:e // 2] = prob[:, (s - a) // 2:(s - a) // 2 + (e - s) // 2]
    finally:
        model.train(was_training)
    return out[:, : math.ceil(z / 2), : math.ceil(y / 2), : math.ceil(x / 2)]


def volume_scores(prob: torch.Tensor, top_k: int) -> np.ndarray:
    """(C,) per-location score: the mean of the ``top_k`` highest probabilities of each channel."""
    flat = prob.flatten(1)
    k = max(1, min(int(top_k), flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1).numpy().astype(np.float32)


def slice_scores(prob: torch.Tensor, n_slices: int) -> np.ndarray:
    """(n_slices,) the largest lesion probability (any location) on each axial slice of the
    volume ``prob`` was predicted for (half-resolution slices cover two slices each)."""
    per_half = prob.amax(dim=(0, 2, 3)).numpy()
    idx = np.minimum(np.arange(n_slices) // 2, len(per_half) - 1)
    return per_half[idx].astype(np.float32)


def profile_vector(scores: np.ndarray) -> np.ndarray:
    """(C + 1,) unit vector: the per-location scores and a "no lesion" component
    ``1 - max(scores)``, so lesion-free volumes cluster together instead of pointing in the
    direction of their noise."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    v = np.concatenate([s, [1.0 - float(s.max(initial=0.0))]])
    norm = float(np.linalg.norm(v))
    if norm <= 0.0:  # cannot happen with scores in [0, 1], kept for safety
        raise ConfigError("empty lesion profile")
    return (v / norm).astype(np.float32)
