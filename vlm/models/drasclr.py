"""DrasCLR: a 3D CNN conditioned on anatomical location, trained against per-location queues.

Every convolution is a :class:`ConditionalConv3d`: E expert kernels mixed per sample by
r = sigmoid(FC(xyz)), with xyz the patch's anatomical centre in [-1, 1]^3. The encoder gives a
128-d representation per patch (the feature used downstream) and an MLP head to the 128-d
contrastive embedding. :class:`DrasCLR` holds the query encoder, its momentum copy and the
per-location key queues; the loss is :class:`vlm.losses.DrasCLRLoss`. Patch grids,
preprocessing and augmentations are in :mod:`vlm.data.drasclr_patches`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlm.losses import GatherFn, gather_features
from vlm.models.momentum import make_momentum_copy, momentum_update

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DrasCLRConfig:
    """Official defaults (batmanlab/DrasCLR, methods.md section 3)."""

    # (out_channels, stride) of each 3x3x3 conv, input 1 channel: the official layout
    # 1-8-8 | 3 blocks of 3 convs (16, 32, 64; last of each stride 2) | 128 | 128 (stride 2),
    # so a 32^3 patch ends at 1^3.
    convs: tuple[tuple[int, int], ...] = (
        (8, 1), (8, 2), (16, 1), (16, 1), (16, 2), (32, 1), (32, 1), (32, 2),
        (64, 1), (64, 1), (64, 2), (128, 1), (128, 2))
    n_experts: int = 8
    conditional: bool = True  # False: plain Conv3d (the unconditioned baseline)
    proj_dim: int = 128  # MLP head output (contrastive space)
    n_locations: int = 581
    queue_size: int = 4096  # per location
    temperature: float = 0.2
    beta: float = 1.0  # weight of the neighbour InfoNCE
    n_neighbours: int = 2
    momentum: float = 0.999
    patch_size: int = 32
    patch_step: int = 26
    hu_min: float = -1024.0
    hu_max: float = 240.0
    lr: float = 0.01  # SGD
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    epochs: int = 20
    affine_degrees: float = 10.0  # MONAI RandAffine: rotate +-pi/18
    affine_scale: float = 0.1  # scale 1 +- 0.1
    affine_translate: float = 12.0  # voxels
    noise_std_hu: float = 50.0
    noise_p: float = 0.25
    contrast_p: float = 0.25  # MONAI RandAdjustContrast: gamma in (0.5, 4.5)

    @property
    def repr_dim(self) -> int:
        """Size of the per-patch representation: the last conv's channels (128)."""
        return self.convs[-1][0]

    @property
    def channels(self) -> tuple[int, ...]:
        """Channel progression, input first: (1, 8, 8, 16, ..., 128, 128)."""
        return (1, *(c for c, _ in self.convs))


class ConditionalConv3d(nn.Module):
    """3D convolution whose kernel is sum_e r_e W_e with r = sigmoid(FC(xyz)) per sample.

    The bias is one vector shared by all experts (as the official CondConv3D).
    Implemented as one grouped convolution over the batch (groups = B), so a batch with B
    different kernels costs one conv call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | None = None, n_experts: int = 8,
                 coord_dim: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.n_experts = n_experts
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(n_experts, out_channels, in_channels, k, k, k))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.routing = nn.Linear(coord_dim, n_experts)
        for e in range(n_experts):
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))

    def routing_weights(self, xyz: torch.Tensor) -> torch.Tensor:
        """(B, 3) -> (B, E) expert weights in (0, 1)."""
        return torch.sigmoid(self.routing(xyz))

    def forward(self, x: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """x (B, C, D, H, W), xyz (B, 3) -> (B, O, D', H', W')."""
        b = x.shape[0]
        r = self.routing_weights(xyz.to(x.dtype))  # (B, E)
        kernel = torch.einsum("be,eoidhw->boidhw", r, self.weight)  # (B, O, C, k, k, k)
        kernel = kernel.reshape(b * self.out_channels, *self.weight.shape[2:])
        bias = self.bias.repeat(b) if self.bias is not None else None  # (B * O,)
        out = F.conv3d(x.reshape(1, b * self.in_channels, *x.shape[2:]), kernel, bias,
                       stride=self.stride, padding=self.padding, groups=b)
        return out.reshape(b, self.out_channels, *out.shape[2:])


class _Block(nn.Module):
    """(Conditional) conv -> BatchNorm -> ELU."""

    def __init__(self, c_in: int, c_out: int, stride: int, n_experts: int,
                 conditional: bool) -> None:
        super().__init__()
        self.conv: nn.Module = (ConditionalConv3d(c_in, c_out, 3, stride, n_experts=n_experts)
                                if conditional else nn.Conv3d(c_in, c_out, 3, stride, 1))
        self.conditional = conditional
        self.norm = nn.BatchNorm3d(c_out)
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        x = self.conv(x, xyz) if self.conditional else self.conv(x)
        return self.act(self.norm(x))


@dataclass
class DrasEncoding:
    representation: torch.Tensor  # (B, C_last) pooled CNN features: the downstream feature
    embedding: torch.Tensor  # (B, proj_dim) MLP head output, L2-normalised (contrastive space)


class DrasEncoder(nn.Module):
    """3D CNN (every conv + BN + ELU), global average pool, MLP head (Linear-ReLU-Linear)."""

    def __init__(self, cfg: DrasCLRConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.blocks = nn.ModuleList(
            _Block(ch[i], ch[i + 1], stride, cfg.n_experts, cfg.conditional)
            for i, (_, stride) in enumerate(cfg.convs))
        self.head = nn.Sequential(nn.Linear(ch[-1], ch[-1]), nn.ReLU(inplace=True),
                                  nn.Linear(ch[-1], cfg.proj_dim))

    def forward(self, x: torch.Tensor, xyz: torch.Tensor) -> DrasEncoding:
        """x (B, 1, P, P, P) preprocessed patches; xyz (B, 3) centres in [-1, 1]^3."""
        for block in self.blocks:
            x = block(x, xyz)
        rep = x.mean(dim=(2, 3, 4))  # (B, C); = flatten when the map is 1^3 (P = 32)
        return DrasEncoding(rep, F.normalize(self.head(rep), dim=1))


class LocationQueues(nn.Module):
    """One FIFO queue of past keys per anatomical location: buffer (L, K, D), pointers (L,)."""

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, n_locations: int, size: int, dim: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        init = F.normalize(torch.randn(n_locations, size, dim, generator=generator), dim=-1)
        self.register_buffer("queue", init)
        self.register_buffer("ptr", torch.zeros(n_locations, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, location: torch.Tensor, rank: int = 0,
                world_size: int = 1, gather_fn: GatherFn | None = None) -> None:
        """Write keys (N, D) into the queues of their locations (N,), oldest entries first out.

        With ``world_size > 1`` the keys and locations of every rank are gathered first, so all
        ranks keep identical queues.
        """
        if world_size > 1:
            keys = gather_features(keys, rank, world_size, gather_fn)
            location = gather_features(location, rank, world_size, gather_fn)
        keys = keys.detach().to(self.queue.dtype)
        size = self.queue.shape[1]
        for loc in torch.unique(location).tolist():
            new = keys[location == loc][-size:]  # (n, D), n <= K
            n = new.shape[0]
            idx = (int(self.ptr[loc]) + torch.arange(n, device=self.queue.device)) % size
            self.queue[loc, idx] = new
            self.ptr[loc] = (int(self.ptr[loc]) + n) % size


@dataclass
class DrasCLROutput:
    q: torch.Tensor  # (N, D) query embeddings (unit)
    k: torch.Tensor  # (N, D) momentum keys (unit, no gradient)
    q_neighbours: torch.Tensor  # (N, n, D) query embeddings of the atlas neighbours
    representation: torch.Tensor  # (N, repr_dim) query representation


class DrasCLR(nn.Module):
    """Query encoder, momentum key encoder and per-location queues."""

    def __init__(self, cfg: DrasCLRConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = DrasEncoder(cfg)
        self.momentum_encoder = make_momentum_copy(self.encoder)
        self.queues = LocationQueues(cfg.n_locations, cfg.queue_size, cfg.proj_dim, generator)

    def update_momentum(self, momentum: float) -> None:
        momentum_update(self.encoder, self.momentum_encoder, momentum)

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, xyz: torch.Tensor,
                x_neighbours: torch.Tensor, xyz_neighbours: torch.Tensor,
                momentum: float | None = None) -> DrasCLROutput:
        """Two augmentations of N patches and their n atlas neighbours.

        Args:
            x_q, x_k: (N, 1, P, P, P); xyz: (N, 3).
            x_neighbours: (N, n, 1, P, P, P) neighbour patches (same subject), augmented.
            xyz_neighbours: (N, n, 3).
            momentum: EMA-update the key encoder with it first (None: no update).
        """
        n, m = x_neighbours.shape[:2]
        both = self.encoder(torch.cat([x_q, x_neighbours.flatten(0, 1)]),
                            torch.cat([xyz, xyz_neighbours.flatten(0, 1)]))
        q, q_nb = both.embedding[:n], both.embedding[n:].reshape(n, m, -1)
        with torch.no_grad():
            if momentum is not None:
                self.update_momentum(momentum)
            k = self.momentum_encoder(x_k, xyz).embedding
        return DrasCLROutput(q=q, k=k, q_neighbours=q_nb, representation=both.representation[:n])

    @torch.no_grad()
    def patch_features(self, patches: torch.Tensor, xyz: torch.Tensor,
                       batch_size: int = 64) -> torch.Tensor:
        """Per-location features (N, repr_dim) of one subject's patches (N, 1, P, P, P)."""
        if self.training:
            raise RuntimeError("DrasCLR.patch_features needs eval mode: call model.eval() first")
        feats = [self.encoder(patches[i: i + batch_size], xyz[i: i + batch_size]).representation
                 for i in range(0, patches.shape[0], batch_size)]
        return torch.cat(feats)

    def volume_embedding(self, patches: torch.Tensor, xyz: torch.Tensor,
                         batch_size: int = 64) -> torch.Tensor:
        """Subject-level embedding (repr_dim,): the mean of its patch features."""
        return self.patch_features(patches, xyz, batch_size).mean(dim=0)


def location_features(features: torch.Tensor, location: torch.Tensor,
                      n_locations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter one subject's patch features (N, D) to a fixed (L, D) table by location id.

    Returns the table (zeros where a location is missing) and a (L,) bool mask of present ones,
    so subjects with different kept patches line up location by location.
    """
    table = features.new_zeros(n_locations, features.shape[1])
    present = torch.zeros(n_locations, dtype=torch.bool, device=features.device)
    table[location] = features
    present[location] = True
    return table, present
