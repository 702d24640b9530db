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

Copy-paste (``paste``, per location, off by default): a lesion draw of such a location is, with
that probability, a training lesion of the location moved into another training volume
(:class:`LesionSprite`, :meth:`LesionSegTask._paste`): its voxels, taken relative to the mean of
a 2-voxel shell around it, replace a footprint of the target volume, re-based on the target's
own shell mean there. The destination is another training lesion's position of the same
location, carried over through the body-box frames and jittered by up to ``paste_jitter``
voxels (default 10, 24, 24: about 4 cm in z and 6.5 cm in-plane at 3.75 x 2.73 mm, so the
copies spread over the organ instead of piling up where the few real lesions sit). It is kept
only where the target tissue matches the source lesion's surroundings (shell mean within
``paste_tol`` HU, the footprint about as homogeneous as the source shell) and holds no lesion.
A few dozen lesions of a location otherwise teach the network the places and surroundings they
happened to sit in more than what they look like; the copies put the same appearance in many
places and bodies. Nothing about the phantom generator is used: only masks, HU values and body
frames, as on real CT.

Validation: the whole val-split volumes go through :func:`~vlm.models.lesionseg.predict`; the
monitored number is the macro volume-level AUC of the per-location scores over the locations
with positives and negatives in the split (``val_macro_auc``); ``best/`` keeps its maximum.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


def lesion_labels(ds: CTDataset, i: int) -> np.ndarray | None:
    """(Z, Y, X) int32 lesion label volume of volume ``i`` (0 = none, else the manifest's
    ``label`` of each lesion), or None when the volume has no lesion."""
    from vlm.io import read_volume

    row = ds.rows[i]
    if not row.get("lesions"):
        return None
    rel = (row.get("masks") or {}).get("lesions")
    if not rel:
        raise ConfigError(f"{row['volume_id']}: the manifest names no lesion mask")
    labels = np.rint(read_volume(ds.root / rel).array).astype(np.int32)
    shape = tuple(int(s) for s in row["shape"])
    if labels.shape != shape:
        raise ConfigError(f"{row['volume_id']}: lesion mask shape {labels.shape} != volume "
                          f"shape {shape}")
    return labels


def location_masks(ds: CTDataset, i: int, classes: Sequence[str]) -> np.ndarray:
    """(Z, Y, X) uint8: 0 = no lesion, c + 1 = a lesion of location ``classes[c]``."""
    row = ds.rows[i]
    out = np.zeros(tuple(int(s) for s in row["shape"]), np.uint8)
    labels = lesion_labels(ds, i)
    if labels is None:
        return out
    for lesion in row["lesions"]:
        if lesion["location"] in classes:
            out[labels == int(lesion["label"])] = classes.index(lesion["location"]) + 1
    return out


SHELL = 2  # voxels of surrounding tissue that a lesion's contrast is measured against


@dataclass(frozen=True)
class LesionSprite:
    """One training lesion, cut out for copy-paste: ``values`` (HU minus the mean of its
    ``SHELL``-voxel shell) on the ``mask`` voxels of a box padded by ``SHELL``; ``anchor`` is
    the box voxel nearest the lesion's centroid."""

    cls: int
    mask: np.ndarray  # (dz, dy, dx) bool
    values: np.ndarray  # (dz, dy, dx) float32, 0 off the mask
    shell: np.ndarray  # (dz, dy, dx) bool: the shell voxels
    anchor: np.ndarray  # (3,) int
    shell_mean: float
    shell_sd: float


def cut_sprite(hu: np.ndarray, labels: np.ndarray, label: int, cls: int) -> LesionSprite | None:
    """The :class:`LesionSprite` of lesion ``label`` (None when it touches the volume edge,
    where its shell is incomplete)."""
    from scipy.ndimage import binary_dilation

    idx = np.argwhere(labels == label)
    if not len(idx):
        return None
    lo, hi = idx.min(0) - SHELL, idx.max(0) + SHELL + 1
    if (lo < 0).any() or (hi > np.asarray(labels.shape)).any():
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    mask = labels[box] == label
    shell = binary_dilation(mask, iterations=SHELL) & (labels[box] == 0)
    if shell.sum() < 4:
        return None
    region = np.asarray(hu[box], dtype=np.float32)
    mean, sd = float(region[shell].mean()), float(region[shell].std())
    values = np.where(mask, region - mean, 0.0).astype(np.float32)
    anchor = np.rint(np.argwhere(mask).mean(0)).astype(int)
    return LesionSprite(cls, mask, values, shell, anchor, mean, sd)


def frame_voxel(point: np.ndarray, source: Mapping[str, Any],
                target: Mapping[str, Any]) -> np.ndarray:
    """A voxel of the volume with body frame ``source`` carried to the same normalised
    body-frame position in the volume with frame ``target``."""
    slo, shi = np.asarray(source["lo"], float), np.asarray(source["hi"], float)
    tlo, thi = np.asarray(target["lo"], float), np.asarray(target["hi"], float)
    unit = (np.asarray(point, float) - slo) / np.maximum(shi - slo, 1.0)
    return np.rint(tlo + unit * np.maximum(thi - tlo, 1.0)).astype(int)


@dataclass(frozen=True)
class Paste:
    """A sprite placed with its box origin at voxel ``origin`` of training volume ``volume``,
    on top of the target's shell mean ``base`` there."""

    sprite: LesionSprite
    volume: int
    origin: tuple[int, int, int]
    base: float

    def apply(self, hu: np.ndarray, classes: np.ndarray, start: Sequence[int]) -> None:
        """Write the lesion into a crop (HU block and class block, in place) that starts at
        voxel ``start`` of the volume; the part outside the crop is dropped."""
        size = self.sprite.mask.shape
        lo = [max(o, int(a)) for o, a in zip(self.origin, start, strict=True)]
        hi = [min(o + d, int(a) + b) for o, d, a, b in
              zip(self.origin, size, start, hu.shape, strict=True)]
        if any(a >= b for a, b in zip(lo, hi, strict=True)):
            return
        src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, self.origin, strict=True))
        dst = tuple(slice(a - int(s), b - int(s)) for a, b, s in zip(lo, hi, start, strict=True))
        mask = self.sprite.mask[src]
        hu[dst][mask] = self.sprite.values[src][mask] + self.base
        classes[dst][mask] = self.sprite.cls + 1


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
                 location_weights: Mapping[str, float] | None = None,
                 paste: Mapping[str, float] | None = None, paste_tries: int = 10,
                 paste_jitter: tuple[int, int, int] = (10, 24, 24), paste_tol: float = 20.0
                 ) -> None:
        mc = model.cfg
        self.model, self.data, self.cfg = model, data, cfg
        self.train_volumes, self.val_volumes = list(train_volumes), list(val_volumes)
        #: what decides the samples besides the data (part of the resume fingerprint)
        self.sampling = {"crop": crop, "samples_per_epoch": samples_per_epoch,
                         "p_lesion": p_lesion, "hu_jitter": hu_jitter,
                         "location_weights": dict(location_weights or {}),
                         "paste": dict(paste or {}), "paste_tries": paste_tries,
                         "paste_jitter": list(paste_jitter), "paste_tol": paste_tol}
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
        label_ids: dict[int, list[int]] = {}  # the mask label of each, parallel to lesions
        for v in self.train_volumes:
            for les in data.rows[v].get("lesions", []):
                if les["location"] in self.classes:
                    c = self.classes.index(les["location"])
                    self.lesions.setdefault(c, []).append((v, np.asarray(les["centre_voxel"])))
                    label_ids.setdefault(c, []).append(int(les["label"]))
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
        paste = dict(paste or {})
        unknown = sorted(set(paste) - set(self.classes))
        if unknown:
            raise ConfigError(f"copy-paste names unknown locations {unknown}; the model's "
                              f"locations are {self.classes}")
        if any(not (0.0 <= p <= 1.0) for p in paste.values()):
            raise ConfigError(f"copy-paste probabilities must be in [0, 1], got {paste}")
        self.paste = {self.classes.index(k): float(p) for k, p in paste.items() if p > 0.0}
        self.paste_tries, self.paste_tol = int(paste_tries), float(paste_tol)
        self.paste_jitter = np.asarray(paste_jitter, int)
        # sprites[c][n] belongs to self.lesions[c][n] (None: that lesion cannot be cut out)
        self.sprites: dict[int, list[LesionSprite | None]] = {}
        read: dict[int, np.ndarray | None] = {}  # each label volume read once
        for c in self.paste:
            self.sprites[c] = []
            for (v, _centre), label in zip(self.lesions.get(c, []), label_ids.get(c, []),
                                           strict=True):
                if v not in read:
                    read[v] = lesion_labels(data, v)
                labels = read[v]
                self.sprites[c].append(None if labels is None else
                                       cut_sprite(np.asarray(self.vols[v]), labels, label, c))
        logger.info("lesion-seg: %d training volumes, lesions per class %s, crop %d",
                    len(self.train_volumes),
                    {self.classes[c]: len(v) for c, v in sorted(self.lesions.items())}, self.crop)

    def train_size(self) -> int:
        return self.samples_per_epoch

    def data_fingerprint(self) -> str:
        return self.data.fingerprint(self.train_volumes + self.val_volumes,
                                     split=len(self.train_volumes), **self.sampling)

    def _crop(self, g: torch.Generator
              ) -> tuple[int, tuple[slice, slice, slice], Paste | None]:
        s = self.crop
        paste = None
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
            n = int(torch.randint(len(pool), (1,), generator=g))
            v, centre = pool[n]
            # extra draws only for copy-paste locations: other runs keep their exact crops
            if cls in self.paste and float(torch.rand(1, generator=g)) < self.paste[cls]:
                paste = self._paste(g, cls, n)
                if paste is not None:
                    v = paste.volume
                    centre = np.asarray(paste.origin) + paste.sprite.anchor
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
        return v, (slice(lo[0], lo[0] + s), slice(lo[1], lo[1] + s),
                   slice(lo[2], lo[2] + s)), paste

    def _paste(self, g: torch.Generator, cls: int, n: int) -> Paste | None:
        """Place the ``n``-th training lesion of class ``cls`` in a training volume (see the
        module docstring); None when it cannot be cut out or no try found matching tissue."""
        sprite = self.sprites[cls][n]
        if sprite is None:
            return None
        pool = self.lesions[cls]
        size = np.asarray(sprite.mask.shape)
        both = sprite.mask | sprite.shell
        for _ in range(self.paste_tries):
            t = self.train_volumes[int(torch.randint(len(self.train_volumes), (1,),
                                                     generator=g))]
            src, point = pool[int(torch.randint(len(pool), (1,), generator=g))]
            shift = np.array([int(torch.randint(-int(a), int(a) + 1, (1,), generator=g))
                              for a in self.paste_jitter])
            origin = frame_voxel(point, self.frames[src], self.frames[t]) + shift - sprite.anchor
            if (origin < 0).any() or (origin + size > np.asarray(self.vols[t].shape)).any():
                continue
            box = tuple(slice(int(o), int(o + d)) for o, d in zip(origin, size, strict=True))
            if self.masks[t][box].any():
                continue
            region = np.asarray(self.vols[t][box], dtype=np.float32)
            base = float(region[sprite.shell].mean())
            if (abs(base - sprite.shell_mean) > self.paste_tol
                    or float(region[both].std()) > 1.5 * sprite.shell_sd + 5.0):
                continue
            return Paste(sprite, t, (int(origin[0]), int(origin[1]), int(origin[2])), base)
        return None

    def _sample(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        v, sl, paste = self._crop(g)
        shift = (float(torch.rand(1, generator=g)) * 2.0 - 1.0) * self.hu_jitter
        block = np.array(self.vols[v][sl], dtype=np.float32)  # a copy: pastes write into it
        m = np.array(self.masks[v][sl], dtype=np.int64)
        start = [a.start for a in sl]
        if paste is not None:
            paste.apply(block, m, start)
        hu = torch.from_numpy(block) + shift
        x = model_input(hu, self.model.cfg, self.frames[v], start)
        target = F.one_hot(torch.from_numpy(m), len(self.classes) + 1)[..., 1:]
        target = target.permute(3, 0, 1, 2).float()
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
                     commands: list[str] | None = None, notes: list[str] | None = None,
                     top_k: int | None = None) -> Path:
    """Package a run for shipping: ``lesionseg.pt`` with float16 weights (half the float32
    size; training cannot resume from it) and ``MODEL_CARD.md``. ``top_k`` replaces the run's
    volume read-out (the probabilities averaged per location, :func:`volume_scores`); it is
    part of the config, so the fingerprint changes with it."""
    from vlm.models.card import lesionseg_model_card
    from vlm.volume_encoder import VolumeEncoder

    state = read_checkpoint(model_dir, CHECKPOINT, "radlens train lesion-seg")
    weights = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in state["state_dict"].items()}
    meta = {k: v for k, v in state.items() if k not in ("state_dict", "summary")}
    if top_k is not None:
        cfg = dataclasses.replace(LesionSegConfig.from_dict(meta["config"]), top_k=int(top_k))
        meta["config"] = cfg.to_dict()
    path = write_checkpoint(out, CHECKPOINT, {**meta, "dtype": "float16"}, weights,
                            state.get("summary"))
    enc = VolumeEncoder.load(out)
    card = lesionseg_model_card(meta["config"], state.get("summary"), evaluation, commands,
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
