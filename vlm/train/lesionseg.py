"""Supervised training of :class:`vlm.models.lesionseg.LesionSeg3D` on PhantomCT lesion masks.

One sample = one ``crop``^3 block of a training volume, drawn from (seed, epoch, index) so runs
resume exactly: with probability ``p_lesion`` it contains a lesion (a location class drawn in
proportion to ``location_weights``, uniform by default, then one of that class's lesions, the
block centre jittered by up to a third of the crop), otherwise it is anywhere in the volume.
Targets: per location, whether any voxel of the 2x2x2 cell under each half-resolution output
belongs to a lesion of that location. Loss: binary focal loss normalised by the number of
positive cells (:func:`focal_loss`, with the output bias initialised to a 1% prior as in
RetinaNet) plus soft Dice over the locations present in the batch (:func:`soft_dice_loss`).
Augmentation: a global HU shift of up to +-``hu_jitter``. No mirror flips: left and right organs
differ (liver vs spleen).

Validation: the whole val-split volumes go through :func:`~vlm.models.lesionseg.predict`; the
monitored number is the macro volume-level AUC of the per-location scores over the locations
with positives and negatives in the split (``val_macro_auc``); ``best/`` keeps its maximum.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm.data.ct_dataset import CTDataset
from vlm.errors import ConfigError
from vlm.models.lesionseg import (
    LesionSeg3D,
    LesionSegConfig,
    body_box_frame,
    model_input,
    predict,
    volume_scores,
)
from vlm.train.lecl import read_checkpoint, recipe_train_config, sample_generator, write_checkpoint
from vlm.train.loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)

CHECKPOINT = "lesionseg.pt"
TRAIN_SPLITS = ("train",)


def default_train_config(**changes: Any) -> TrainConfig:
    """AdamW 2e-3, weight decay 1e-4, batch 4 crops, 100 steps an epoch (400 crops), 30
    epochs = 3,000 steps (about 30 minutes on 2 CPU cores at crop 48), validation every 500."""
    base = {"epochs": 30, "batch_size": 4, "warmup_steps": 50, "val_every": 500,
            "save_every": 200, "clip_grad": 5.0}
    return recipe_train_config(2e-3, 1e-4, **{**base, **changes})


def location_masks(ds: CTDataset, i: int, classes: Sequence[str]) -> np.ndarray:
    """(Z, Y, X) uint8: 0 = no lesion, c + 1 = a lesion of location ``classes[c]``."""
    from vlm.io import read_volume

    row = ds.rows[i]
    rel = (row.get("masks") or {}).get("lesions")
    shape = tuple(int(s) for s in row["shape"])
    out = np.zeros(shape, np.uint8)
    if not row.get("lesions"):
        return out
    if not rel:
        raise ConfigError(f"{row['volume_id']}: the manifest names no lesion mask")
    labels = np.rint(read_volume(ds.root / rel).array).astype(np.int32)
    if labels.shape != shape:
        raise ConfigError(f"{row['volume_id']}: lesion mask shape {labels.shape} != volume "
                          f"shape {shape}")
    for lesion in row["lesions"]:
        if lesion["location"] in classes:
            out[labels == int(lesion["label"])] = classes.index(lesion["location"]) + 1
    return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al., RetinaNet) summed over every cell and class and divided
    by the number of positive cells (at least 1), so a handful of lesion cells among ~10^5
    background cells per crop still carries the loss: a plain or ``pos_weight``-ed mean let
    the first versions of this recipe settle on "no lesion anywhere" (every probability below
    0.01 after 500 steps)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1.0 - p) * (1.0 - target)
    a_t = alpha * target + (1.0 - alpha) * (1.0 - target)
    return (a_t * (1.0 - p_t) ** gamma * ce).sum() / target.sum().clamp(min=1.0)


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per class over the whole batch, averaged over the classes that have a
    positive voxel in the batch (0 when none has). Absent classes are left to the
    cross-entropy: counting them rewards predicting nothing anywhere, which is where a first
    version of this recipe collapsed (every probability 0 after 600 steps)."""
    dims = (0, *range(2, prob.ndim))
    present = target.sum(dims) > 0
    if not bool(present.any()):
        return prob.sum() * 0.0
    inter = (prob * target).sum(dims)
    dice = (2.0 * inter + eps) / (prob.sum(dims) + target.sum(dims) + eps)
    return 1.0 - dice[present].mean()


def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    if y.min() == y.max():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


class LesionSegTask:
    """The :class:`~vlm.train.loop.Task` of ``radlens train lesion-seg``."""

    def __init__(self, model: LesionSeg3D, data: CTDataset, cfg: TrainConfig,
                 train_volumes: Sequence[int], val_volumes: Sequence[int], *, crop: int = 48,
                 samples_per_epoch: int = 400, p_lesion: float = 0.6, hu_jitter: float = 15.0,
                 location_weights: Mapping[str, float] | None = None) -> None:
        mc = model.cfg
        self.model, self.data, self.cfg = model, data, cfg
        self.train_volumes, self.val_volumes = list(train_volumes), list(val_volumes)
        shapes = [tuple(int(s) for s in data.rows[v]["shape"]) for v in self.train_volumes]
        smallest = min(min(s) for s in shapes)
        self.crop = min(int(crop), smallest - smallest % 4)
        if self.crop < 8:
            raise ConfigError(f"volumes of side {smallest} are too small for lesion crops")
        self.samples_per_epoch = int(samples_per_epoch)
        self.p_lesion, self.hu_jitter = float(p_lesion), float(hu_jitter)
        self.classes = list(mc.classes)
        self.vols = {v: data.volume(v) for v in self.train_volumes}
        self.masks = {v: location_masks(data, v, self.classes) for v in self.train_volumes}
        self.frames = {v: body_box_frame(np.asarray(self.vols[v]), mc.frame_threshold_hu)
                       for v in self.train_volumes}
        # (volume, centre voxel k, j, i) of each training lesion, grouped by location class
        self.lesions: dict[int, list[tuple[int, np.ndarray]]] = {}
        for v in self.train_volumes:
            for les in data.rows[v].get("lesions", []):
                if les["location"] in self.classes:
                    c = self.classes.index(les["location"])
                    self.lesions.setdefault(c, []).append((v, np.asarray(les["centre_voxel"])))
        weights = dict(location_weights or {})
        unknown = sorted(set(weights) - set(self.classes))
        if unknown:
            raise ConfigError(f"location weights name unknown locations {unknown}; the model's "
                              f"locations are {self.classes}")
        if any(not (w >= 0.0) for w in weights.values()):
            raise ConfigError(f"location weights must be >= 0, got {weights}")
        self.location_weights = weights
        # sampling probability of each location class that has training lesions
        self.lesion_keys = sorted(c for c in self.lesions
                                  if weights.get(self.classes[c], 1.0) > 0.0)
        w = torch.tensor([weights.get(self.classes[c], 1.0) for c in self.lesion_keys],
                         dtype=torch.float64)
        self.lesion_cdf = (torch.cumsum(w, 0) / w.sum()) if len(w) else w
        logger.info("lesion-seg: %d training volumes, lesions per class %s, crop %d",
                    len(self.train_volumes),
                    {self.classes[c]: len(v) for c, v in sorted(self.lesions.items())}, self.crop)

    def train_size(self) -> int:
        return self.samples_per_epoch

    def _crop(self, g: torch.Generator) -> tuple[int, tuple[slice, slice, slice]]:
        s = self.crop
        u = float(torch.rand(1, generator=g))
        if u < self.p_lesion and self.lesion_keys:
            keys = self.lesion_keys
            if self.location_weights:
                r = torch.rand(1, generator=g, dtype=torch.float64)
                pick = min(int(torch.searchsorted(self.lesion_cdf, r)), len(keys) - 1)
            else:  # uniform: the draw of the runs trained before weights existed
                pick = int(torch.randint(len(keys), (1,), generator=g))
            cls = keys[pick]
            pool = self.lesions[cls]
            v, centre = pool[int(torch.randint(len(pool), (1,), generator=g))]
            jitter = torch.randint(-(s // 3), s // 3 + 1, (3,), generator=g).numpy()
            centre = centre + jitter
        else:
            v = self.train_volumes[int(torch.randint(len(self.train_volumes), (1,),
                                                     generator=g))]
            shape = self.vols[v].shape
            centre = np.array([int(torch.randint(shape[a], (1,), generator=g))
                               for a in range(3)])
        shape = self.vols[v].shape
        lo = [int(np.clip(int(c) - s // 2, 0, shape[a] - s)) for a, c in enumerate(centre)]
        return v, (slice(lo[0], lo[0] + s), slice(lo[1], lo[1] + s), slice(lo[2], lo[2] + s))

    def _sample(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        v, sl = self._crop(g)
        shift = (float(torch.rand(1, generator=g)) * 2.0 - 1.0) * self.hu_jitter
        hu = torch.from_numpy(np.asarray(self.vols[v][sl], dtype=np.float32)) + shift
        x = model_input(hu, self.model.cfg, self.frames[v], [s.start for s in sl])
        m = torch.from_numpy(np.asarray(self.masks[v][sl], dtype=np.int64))
        target = F.one_hot(m, len(self.classes) + 1)[..., 1:].permute(3, 0, 1, 2).float()
        return x, F.max_pool3d(target[None], 2)[0]

    def batch(self, indices: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        xs, ts = [], []
        for i in indices:
            x, t = self._sample(sample_generator(self.cfg.seed, epoch, int(i)))
            xs.append(x)
            ts.append(t)
        return {"x": torch.stack(xs), "target": torch.stack(ts)}

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev = self.cfg.device
        x, target = batch["x"].to(dev), batch["target"].to(dev)
        logits = self.model(x).float()
        focal = focal_loss(logits, target)
        dice = soft_dice_loss(torch.sigmoid(logits), target)
        return {"loss": focal + dice, "focal": focal.detach(), "dice": dice.detach()}

    def validate(self) -> dict[str, float]:
        if not self.val_volumes:
            return {}
        scores = np.stack([volume_scores(predict(self.model, np.asarray(self.data.volume(v)),
                                                 device=self.cfg.device),
                                         self.model.cfg.top_k)
                           for v in self.val_volumes])
        labels = np.array([[int(self.data.rows[v]["location_labels"].get(c, 0))
                            for c in self.classes] for v in self.val_volumes])
        out: dict[str, float] = {}
        for c, name in enumerate(self.classes):
            auc = _auc(labels[:, c], scores[:, c])
            if auc is not None:
                out[f"val_auc_{name}"] = auc
        if out:
            out["val_macro_auc"] = float(np.mean(list(out.values())))
        return out

    def save(self, folder: Path, summary: dict[str, Any]) -> None:
        save_lesionseg(self.model, folder, summary)


def save_lesionseg(model: LesionSeg3D, folder: str | os.PathLike[str],
                   summary: dict[str, Any] | None = None) -> Path:
    meta = {"kind": "lesionseg", "config": model.cfg.to_dict(),
            "supervised": "PhantomCT lesion masks (train split)"}
    return write_checkpoint(folder, CHECKPOINT, meta, model.state_dict(), summary)


def load_lesionseg(model_dir: str | os.PathLike[str]) -> LesionSeg3D:
    """The model of a checkpoint or run folder (``best`` preferred), float32, eval mode."""
    state = read_checkpoint(model_dir, CHECKPOINT, "radlens train lesion-seg")
    if state.get("kind") != "lesionseg":
        raise ConfigError(f"{model_dir}: {CHECKPOINT} is not a lesion-seg checkpoint")
    model = LesionSeg3D(LesionSegConfig.from_dict(state["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in state["state_dict"].items()})
    return model.eval()


def export_lesionseg(model_dir: str | os.PathLike[str], out: str | os.PathLike[str], *,
                     evaluation: dict[str, Any] | None = None,
                     commands: list[str] | None = None, notes: list[str] | None = None
                     ) -> Path:
    """Package a run for shipping: ``lesionseg.pt`` with float16 weights (half the float32
    size; training cannot resume from it) and ``MODEL_CARD.md``."""
    from vlm.models.card import lesionseg_model_card
    from vlm.volume_encoder import VolumeEncoder

    state = read_checkpoint(model_dir, CHECKPOINT, "radlens train lesion-seg")
    weights = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in state["state_dict"].items()}
    meta = {k: v for k, v in state.items() if k not in ("state_dict", "summary")}
    path = write_checkpoint(out, CHECKPOINT, {**meta, "dtype": "float16"}, weights,
                            state.get("summary"))
    enc = VolumeEncoder.load(out)
    card = lesionseg_model_card(state["config"], state.get("summary"), evaluation, commands,
                                enc.config_hash, notes)
    (Path(out) / "MODEL_CARD.md").write_text(card)
    return path


def train_lesionseg(data: str | os.PathLike[str] | CTDataset, out: str | os.PathLike[str],
                    cfg: LesionSegConfig | None = None, train: TrainConfig | None = None,
                    volumes: Sequence[int] | None = None,
                    val_volumes: Sequence[int] | None = None, **task_options: Any
                    ) -> dict[str, Any]:
    """Train the lesion segmenter into ``out/best|last`` (resumes from ``out`` when it holds a
    saved state). ``volumes`` default to the train split (never test: the volumes the search
    benchmark scores), ``val_volumes`` to the val split."""
    ds = data if isinstance(data, CTDataset) else CTDataset(data)
    train = train or default_train_config()
    if volumes is None:
        volumes = ds.volumes_in(TRAIN_SPLITS)
    volumes, val_volumes = ds.pretraining_split(volumes, val_volumes)
    torch.manual_seed(train.seed)
    model = LesionSeg3D(cfg or LesionSegConfig()).to(train.device)
    task = LesionSegTask(model, ds, train, volumes, val_volumes, **task_options)
    if not task.lesions:
        raise ConfigError("no lesion of a known location in the training volumes")
    return Trainer(model, task, train, Path(out), monitor="val_macro_auc",
                   monitor_mode="max").fit()
