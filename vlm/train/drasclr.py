"""DrasCLR pre-training on PhantomCT and per-volume embeddings.

No registration: patches sit on a fixed lattice of the anatomical body frame
(:func:`vlm.data.drasclr_patches.lattice_grid`), the manifest's ``body_frame`` on PhantomCT and
:func:`~vlm.data.drasclr_patches.bbox_frame` (body bounding box) on real CT, so a location id
means the same anatomy in every subject. One sample = one (subject, location): two
augmentations of the patch (query / momentum key) and its nearest lattice neighbours of the
same subject; loss :class:`vlm.losses.DrasCLRLoss`; keys enter their location's queue after
the step's backward pass. ``conditional=False`` gives the plain-convolution baseline.

Deviation from the paper: the shared loop's AdamW replaces SGD (lr 1e-3 by default here).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm.data.ct_dataset import CTDataset
from vlm.data.drasclr_patches import (
    PatchGrid,
    anatomical_lattice,
    augment,
    bbox_frame,
    extract_patches,
    lattice_grid,
    preprocess_hu,
)
from vlm.errors import ConfigError
from vlm.losses import DrasCLRLoss
from vlm.models.drasclr import DrasCLR, DrasCLRConfig
from vlm.train.lecl import (
    read_checkpoint,
    recipe_train_config,
    sample_generator,
    write_checkpoint,
)
from vlm.train.loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)

CHECKPOINT = "drasclr.pt"

#: CPU-sized encoders for 32-128^3 volumes (patch 16 -> 1^3 after four stride-2 convs).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"convs": ((4, 1), (8, 2), (16, 2)), "n_experts": 2, "proj_dim": 16,
             "queue_size": 32, "patch_size": 8, "momentum": 0.99},
    "small": {"convs": ((8, 1), (16, 2), (32, 2), (64, 2), (64, 2)), "n_experts": 4,
              "proj_dim": 64, "queue_size": 256, "patch_size": 16, "momentum": 0.99},
}
DEFAULT_LATTICE = (4, 4, 4)


def drasclr_config(preset: str = "small", conditional: bool = True,
                   lattice: tuple[int, int, int] = DEFAULT_LATTICE, **changes: Any
                   ) -> DrasCLRConfig:
    """A :class:`DrasCLRConfig` from a preset (``tiny`` | ``small``) for a lattice of locations."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown DrasCLR preset '{preset}': use one of {sorted(PRESETS)}")
    spec = {**PRESETS[preset], "n_locations": int(np.prod(lattice)), **changes}
    return DrasCLRConfig(conditional=conditional, **spec)


def _config_from_dict(data: Mapping[str, Any]) -> DrasCLRConfig:
    data = dict(data)
    data["convs"] = tuple(tuple(c) for c in data["convs"])
    return DrasCLRConfig(**data)


def volume_grid(shape: tuple[int, ...], frame: Mapping[str, Any],
                lattice: tuple[int, int, int], n_neighbours: int) -> PatchGrid:
    """The lattice patches of one subject (frame: ``body_frame`` or ``bbox_frame``)."""
    z, y, x = (int(s) for s in shape)
    return lattice_grid((z, y, x), frame, anatomical_lattice(lattice), n_neighbours=n_neighbours)


def real_ct_frame(hu: np.ndarray, threshold: float = -500.0) -> dict[str, Any]:
    """Body frame of a real CT: :func:`bbox_frame` of the largest connected body component.

    Voxels above ``threshold`` HU, opened once (3x3x3) and reduced to the largest 3D component,
    so the table, head rest or cables do not stretch the box; [-1, 1] on every axis spans that
    box (k inferior->superior, j anterior->posterior, i right->left on the canonical grid).
    """
    from scipy import ndimage

    body = ndimage.binary_opening(np.asarray(hu) > threshold, structure=np.ones((3, 3, 3)))
    labels, n = ndimage.label(body)
    if n == 0:
        return bbox_frame(np.asarray(hu), threshold)
    largest = 1 + int(np.argmax(ndimage.sum_labels(body, labels, range(1, n + 1))))
    frame = bbox_frame(np.where(labels == largest, 0.0, -1024.0), threshold)
    frame["definition"] = (f"bounding box of the largest connected component of HU > "
                           f"{threshold:g} (opened 3x3x3) on every axis")
    return frame


class DrasCLRTask:
    """Samples are (volume, lattice location); volumes are held preprocessed in memory."""

    def __init__(self, model: DrasCLR, data: CTDataset, cfg: TrainConfig,
                 train_volumes: Sequence[int], val_volumes: Sequence[int],
                 lattice: tuple[int, int, int], val_samples: int = 64) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.lattice_steps = lattice
        self.volumes = (list(train_volumes), list(val_volumes), int(val_samples))
        mc = model.cfg
        self.loss_fn = DrasCLRLoss(mc.temperature, mc.beta)
        self.vols: dict[int, torch.Tensor] = {}
        self.grids: dict[int, PatchGrid] = {}
        for v in list(train_volumes) + list(val_volumes):
            self.vols[v] = preprocess_hu(data.volume_tensor(v), mc.hu_min, mc.hu_max)
            self.grids[v] = volume_grid(tuple(self.vols[v].shape), data.body_frame(v),
                                        lattice, mc.n_neighbours)
        self.items = [(v, r) for v in train_volumes for r in range(len(self.grids[v]))]
        val = [(v, r) for v in val_volumes for r in range(len(self.grids[v]))] or self.items
        self.val_items = val[:: max(1, len(val) // val_samples)][:val_samples]
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def train_size(self) -> int:
        return len(self.items)

    def data_fingerprint(self) -> str:
        train, val, val_samples = self.volumes
        return self.data.fingerprint(train + val, split=len(train), val_samples=val_samples,
                                     lattice=list(self.lattice_steps))

    def _sample(self, items: Sequence[tuple[int, int]], g: torch.Generator
                ) -> dict[str, torch.Tensor]:
        mc = self.model.cfg
        p, m = mc.patch_size, mc.n_neighbours
        own, nbs, xyz, xyz_nb, loc = [], [], [], [], []
        for v, r in items:
            grid = self.grids[v]
            rows = [r, *grid.neighbours[r].tolist()]
            cubes = extract_patches(self.vols[v], grid.centres[rows], p)  # (1 + m, 1, P, P, P)
            own.append(cubes[0])
            nbs.append(cubes[1:])
            xyz.append(torch.from_numpy(grid.coords[r]))
            xyz_nb.append(torch.from_numpy(grid.coords[rows[1:]]))
            loc.append(int(grid.location[r]))
        x = torch.stack(own)  # (N, 1, P, P, P)
        aug = {"noise_std_hu": mc.noise_std_hu, "noise_p": mc.noise_p,
               "contrast_p": mc.contrast_p, "degrees": mc.affine_degrees,
               "scale": mc.affine_scale,
               "translate": mc.affine_translate * p / 32.0}  # shift scaled with the patch
        x_nb = torch.stack(nbs)  # (N, m, 1, P, P, P)
        return {"x_q": augment(x, g, **aug), "x_k": augment(x, g, **aug),
                "x_nb": augment(x_nb.flatten(0, 1), g, **aug).reshape(x_nb.shape),
                "xyz": torch.stack(xyz), "xyz_nb": torch.stack(xyz_nb).reshape(-1, m, 3),
                "location": torch.tensor(loc, dtype=torch.long)}

    def batch(self, indices: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        g = sample_generator(self.cfg.seed, epoch, int(indices[0]) if len(indices) else 0)
        return self._sample([self.items[i] for i in indices], g)

    def _flush(self) -> None:
        """Enqueue the previous step's keys (after its backward pass used the queue)."""
        if self._pending is not None:
            self.model.queues.enqueue(*self._pending)
            self._pending = None

    def loss(self, batch: dict[str, torch.Tensor], enqueue: bool = True
             ) -> dict[str, torch.Tensor]:
        self._flush()
        dev = self.cfg.device
        b = {k: t.to(dev) for k, t in batch.items()}
        out = self.model(b["x_q"], b["x_k"], b["xyz"], b["x_nb"], b["xyz_nb"],
                         momentum=self.model.cfg.momentum if self.model.training else None)
        parts = self.loss_fn(out.q, out.k, out.q_neighbours, b["location"],
                             self.model.queues.queue)
        if enqueue:
            self._pending = (out.k.detach(), b["location"])
        return parts

    def validate(self) -> dict[str, float]:
        self._flush()
        if len(self.val_items) < 2:
            return {}
        batch = self._sample(self.val_items, sample_generator(self.cfg.seed + 7, 0, 0))
        return {"val_loss": float(self.loss(batch, enqueue=False)["loss"])}

    def save(self, folder: Path, summary: dict[str, Any]) -> None:
        self._flush()
        save_drasclr(self.model, folder, self.lattice_steps, summary)


def save_drasclr(model: DrasCLR, folder: str | os.PathLike[str],
                 lattice: tuple[int, int, int], summary: dict[str, Any] | None = None) -> Path:
    meta = {"kind": "drasclr", "config": asdict(model.cfg), "lattice": list(lattice),
            "frame": "PhantomCT: manifest body_frame; real CT: real_ct_frame (body bounding box)"}
    return write_checkpoint(folder, CHECKPOINT, meta, model.state_dict(), summary)


def load_drasclr(model_dir: str | os.PathLike[str]) -> tuple[DrasCLR, tuple[int, int, int]]:
    """(model in eval mode, lattice steps) of a checkpoint folder (``best`` preferred)."""
    state = read_checkpoint(model_dir, CHECKPOINT, "train_drasclr")
    model = DrasCLR(_config_from_dict(state["config"]))
    model.load_state_dict(state["state_dict"])
    lat = tuple(int(s) for s in state["lattice"])
    return model.eval(), (lat[0], lat[1], lat[2])


def default_train_config(**changes: Any) -> TrainConfig:
    """DrasCLR: AdamW 1e-3 (replaces the official SGD 0.01), weight decay 1e-4 (official)."""
    return recipe_train_config(1e-3, 1e-4, **changes)


def train_drasclr(data: str | os.PathLike[str] | CTDataset, out: str | os.PathLike[str],
                  cfg: DrasCLRConfig | None = None, conditional: bool = True,
                  train: TrainConfig | None = None, volumes: Sequence[int] | None = None,
                  val_volumes: Sequence[int] | None = None,
                  lattice: tuple[int, int, int] = DEFAULT_LATTICE) -> dict[str, Any]:
    """Pre-train DrasCLR (``conditional=False``: plain convolutions) into ``out/best|last``.

    Args:
        cfg: model (default ``drasclr_config("small", lattice=lattice)``); ``conditional`` and
            ``n_locations`` (= lattice cells) are set from the arguments.
        volumes / val_volumes: dataset indices (default: splits train+test / val).
    """
    ds = data if isinstance(data, CTDataset) else CTDataset(data)
    cfg = dataclasses.replace(cfg or drasclr_config("small", lattice=lattice),
                              conditional=conditional, n_locations=int(np.prod(lattice)))
    train = train or default_train_config()
    volumes, val_volumes = ds.pretraining_split(volumes, val_volumes)
    torch.manual_seed(train.seed)
    model = DrasCLR(cfg, torch.Generator().manual_seed(train.seed)).to(train.device)
    task = DrasCLRTask(model, ds, train, volumes, val_volumes, lattice)
    if task.train_size() < 2:
        raise ConfigError("DrasCLR needs at least 2 training patches")
    logger.info("DrasCLR (%s): %d training patches", "conditional" if conditional else "plain",
                task.train_size())
    return Trainer(model, task, train, Path(out), monitor="val_loss", monitor_mode="min").fit()


@torch.no_grad()
def volume_patch_features(model: DrasCLR, hu: torch.Tensor, frame: Mapping[str, Any],
                          lattice: tuple[int, int, int], batch_size: int = 64
                          ) -> tuple[torch.Tensor, np.ndarray]:
    """(N, repr_dim) patch features and their location ids for one (Z, Y, X) HU volume."""
    mc = model.cfg
    x = preprocess_hu(hu, mc.hu_min, mc.hu_max)
    grid = volume_grid(tuple(x.shape), frame, lattice, mc.n_neighbours)
    patches = extract_patches(x, grid.centres, mc.patch_size)
    feats = model.patch_features(patches, torch.from_numpy(grid.coords), batch_size)
    return feats, grid.location


def drasclr_volume_embeddings(model_dir: str | os.PathLike[str] | DrasCLR,
                              data: str | os.PathLike[str] | CTDataset,
                              lattice: tuple[int, int, int] | None = None,
                              batch_size: int = 64) -> np.ndarray:
    """(N, repr_dim) subject embeddings (mean of the lattice patch features), dataset order."""
    ds = data if isinstance(data, CTDataset) else CTDataset(data)
    if isinstance(model_dir, DrasCLR):
        model, lat = model_dir, lattice or DEFAULT_LATTICE
    else:
        model, stored = load_drasclr(model_dir)
        lat = lattice or stored
    model.eval()
    out = [volume_patch_features(model, ds.volume_tensor(i), ds.body_frame(i), lat,
                                 batch_size)[0].mean(0)
           for i in range(len(ds))]
    return torch.stack(out).numpy()
