"""LeCL slice pre-training (``lesion_weight=0``: plain MoCo v3) and slice-embedding extraction.

The recipe feeds every axial slice of the training volumes as one sample: slices with a lesion
box give a lesion-centred crop + the whole slice, others two random resized crops
(:mod:`vlm.data.lecl_views`); the loss is :func:`vlm.losses.lecl_symmetric`. The key encoder's
momentum follows MoCo v3's cosine schedule over epochs. The optimiser is the shared loop's AdamW.

A checkpoint folder holds ``lecl.pt`` (config + weights); :func:`load_lecl` rebuilds the model
from the stored config, so architecture and weights cannot disagree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlm.data.ct_dataset import CTDataset
from vlm.data.lecl_views import lecl_pair, window_slice
from vlm.errors import ConfigError
from vlm.losses import lecl_symmetric
from vlm.models.checkpoint import load_torch_state, update_with_weights
from vlm.models.clear import LeCL, LeCLConfig
from vlm.models.config import VisionConfig
from vlm.models.momentum import cosine_momentum
from vlm.train.loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)

CHECKPOINT = "lecl.pt"
SLICE_MEAN, SLICE_STD = 0.5, 0.25  # applied after the [0, 1] window, as PreprocessConfig

#: CPU-sized towers. "small": open_clip ViT 96 px, patch 16 (36 tokens), width 192, 4 layers.
#: "r18": timm ResNet-18 at the slice's own 128 px (a 4x4 grid), the CNN option of CLEAR's
#: slice encoder (README, CT volumes, has its numbers).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vision": {"backend": "open_clip", "image_size": 32, "patch_size": 8, "width": 32,
                        "layers": 1, "head_width": 16},
             "embed_dim": 32, "mlp_hidden": 64, "out_dim": 16},
    "small": {"vision": {"backend": "open_clip", "image_size": 96, "patch_size": 16,
                         "width": 192, "layers": 4, "head_width": 64},
              "embed_dim": 256, "mlp_hidden": 1024, "out_dim": 128},
    "r18": {"vision": {"backend": "timm", "timm_model": "resnet18", "image_size": 128},
            "embed_dim": 256, "mlp_hidden": 1024, "out_dim": 128},
}


def lecl_config(preset: str = "small", lesion_weight: float = 10.0, **changes: Any
                ) -> LeCLConfig:
    """A :class:`LeCLConfig` from a preset name (``tiny`` | ``small`` | ``r18``) plus field
    changes."""
    if not (math.isfinite(lesion_weight) and lesion_weight >= 0):
        raise ConfigError(f"the LeCL lesion weight w must be finite and >= 0 (0: plain MoCo "
                          f"v3), not {lesion_weight}")
    if preset not in PRESETS:
        raise ConfigError(f"unknown LeCL preset '{preset}': use one of {sorted(PRESETS)}")
    spec = {k: v for k, v in PRESETS[preset].items() if k != "vision"}
    spec.update(changes)
    vision = VisionConfig(**PRESETS[preset]["vision"])
    return LeCLConfig(vision=vision, lesion_weight=lesion_weight, **spec)


def config_to_dict(cfg: LeCLConfig) -> dict[str, Any]:
    return asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> LeCLConfig:
    data = dict(data)
    vision = VisionConfig(**data.pop("vision"))
    data["crop_scale"] = tuple(data.get("crop_scale", (0.08, 1.0)))
    return LeCLConfig(vision=vision, **data)


def slice_input(hu: torch.Tensor, size: int) -> torch.Tensor:
    """(Y, X) HU slice -> (3, size, size) model input (window, resize, normalise)."""
    x = window_slice(hu)  # (3, Y, X) in [0, 1]
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    return (x - SLICE_MEAN) / SLICE_STD


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The RNG of one sample: a function of (seed, epoch, index) only (resumable runs)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index)
                                         % 2**63)


class LeCLTask:
    """Every slice of the training volumes is one sample; validation = loss on fixed views."""

    def __init__(self, model: LeCL, data: CTDataset, cfg: TrainConfig,
                 train_volumes: Sequence[int], val_volumes: Sequence[int],
                 val_slices: int = 64) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.volumes = (list(train_volumes), list(val_volumes), int(val_slices))
        self.items = data.slice_items(train_volumes)
        val = data.slice_items(val_volumes) or self.items
        step = max(1, len(val) // val_slices)
        self.val_items = val[::step][:val_slices]
        self.size = model.cfg.vision.image_size

    def train_size(self) -> int:
        return len(self.items)

    def data_fingerprint(self) -> str:
        train, val, val_slices = self.volumes
        return self.data.fingerprint(train + val, split=len(train), val_slices=val_slices)

    def _views(self, items: Sequence[tuple[int, int]], generators: Sequence[torch.Generator]
               ) -> dict[str, torch.Tensor]:
        v1, v2, lesion = [], [], []
        for (vi, k), g in zip(items, generators, strict=True):
            x = window_slice(self.data.slice_hu(vi, k))
            a, b, is_lesion = lecl_pair(x, self.data.slice_boxes(vi, k), self.size, g,
                                        self.model.cfg.crop_scale)
            v1.append(a)
            v2.append(b)
            lesion.append(is_lesion)
        return {"x1": (torch.stack(v1) - SLICE_MEAN) / SLICE_STD,
                "x2": (torch.stack(v2) - SLICE_MEAN) / SLICE_STD,
                "lesion": torch.tensor(lesion, dtype=torch.bool)}

    def batch(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        items = [self.items[i] for i in indices]
        out: dict[str, Any] = self._views(items, [sample_generator(self.cfg.seed, epoch, i)
                                                  for i in indices])
        progress = epoch / max(1, self.cfg.epochs)
        out["momentum"] = cosine_momentum(self.model.cfg.momentum, progress)
        return out

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        dev = self.cfg.device
        out = self.model(batch["x1"].to(dev), batch["x2"].to(dev), batch.get("momentum"))
        c = self.model.cfg
        loss = lecl_symmetric(out.q1, out.q2, out.k1, out.k2, batch["lesion"].to(dev),
                              w=c.lesion_weight, temperature=c.temperature)
        return {"loss": loss, "lesion_fraction": batch["lesion"].float().mean()}

    def validate(self) -> dict[str, float]:
        if len(self.val_items) < 2:
            return {}
        gens = [sample_generator(self.cfg.seed + 7, 0, i) for i in range(len(self.val_items))]
        batch = self._views(self.val_items, gens)
        return {"val_loss": float(self.loss(batch)["loss"])}

    def save(self, folder: Path, summary: dict[str, Any]) -> None:
        save_lecl(self.model, folder, summary)


# --------------------------------------------------------------------------- checkpoints
# (shared by the CT recipes: vlm.train.drasclr uses the same folder layout)

def write_checkpoint(folder: str | os.PathLike[str], filename: str, meta: dict[str, Any],
                     state_dict: dict[str, Any], summary: dict[str, Any] | None = None) -> Path:
    """``folder/filename`` = meta + weights + summary (atomic), ``folder/config.json`` = meta."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{filename}.tmp"
    torch.save({**meta, "state_dict": state_dict, "summary": summary or {}}, tmp)
    os.replace(tmp, folder / filename)
    (folder / "config.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
    return folder / filename


def read_checkpoint(model_dir: str | os.PathLike[str], filename: str, recipe: str
                    ) -> dict[str, Any]:
    """The stored checkpoint of a folder, or of its ``best`` / ``last`` sub-folder."""
    root = Path(model_dir)
    for cand in (root / filename, root / "best" / filename, root / "last" / filename):
        if cand.is_file():
            return load_torch_state(cand, "checkpoint", f"train it again with {recipe}")
    raise ConfigError(f"{root}: no {filename}; train one with {recipe} first")


def recipe_train_config(lr: float, weight_decay: float, /, **changes: Any) -> TrainConfig:
    """CPU loop settings of the CT recipes: 10 epochs, batch 32, 10 warm-up steps, no bar;
    ``changes`` (``lr`` included) override them."""
    base = TrainConfig(epochs=10, batch_size=32, lr=lr, weight_decay=weight_decay,
                       warmup_steps=10, progress=False, save_every=100)
    return dataclasses.replace(base, **changes)


def save_lecl(model: LeCL, folder: str | os.PathLike[str], summary: dict[str, Any] | None = None
              ) -> Path:
    return write_checkpoint(folder, CHECKPOINT,
                            {"kind": "lecl", "config": config_to_dict(model.cfg)},
                            model.state_dict(), summary)


def load_lecl(model_dir: str | os.PathLike[str]) -> LeCL:
    """The LeCL model of a checkpoint folder (``best`` preferred inside a run folder), eval mode.

    An inference checkpoint (:func:`export_lecl`) holds only the slice encoder; the projector,
    predictor and momentum copy, which inference never uses, then keep their initial values.
    """
    return _model_from_state(read_checkpoint(model_dir, CHECKPOINT, "train_lecl"))


def _model_from_state(state: dict[str, Any]) -> LeCL:
    model = LeCL(config_from_dict(state["config"]))
    if state.get("encoder_only"):
        weights = {k: v.float() for k, v in state["state_dict"].items()}
        model.encoder.load_state_dict(weights)
    else:
        model.load_state_dict(state["state_dict"])
    return model.eval()


def export_lecl(model_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                half: bool = True) -> Path:
    """Write an inference checkpoint: the slice encoder only (float16 by default), about a
    seventh of a training checkpoint. Training cannot resume from it."""
    state = read_checkpoint(model_dir, CHECKPOINT, "train_lecl")
    model = _model_from_state(state)
    weights = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
               for k, v in model.encoder.state_dict().items()}
    return write_checkpoint(out, CHECKPOINT, {"kind": "lecl", "config": state["config"],
                                              "encoder_only": True,
                                              "dtype": "float16" if half else "float32"},
                            weights, state.get("summary"))


#: slices per training batch at least: the projection MLPs' BatchNorm1d cannot train on one
MIN_BATCH = 2


def default_train_config(**changes: Any) -> TrainConfig:
    """LeCL: AdamW 3e-4 (short CPU runs), weight decay 1e-6 (official)."""
    return recipe_train_config(3e-4, 1e-6, **changes)


def train_lecl(data: str | os.PathLike[str] | CTDataset, out: str | os.PathLike[str],
               cfg: LeCLConfig | None = None, lesion_weight: float = 10.0,
               train: TrainConfig | None = None, volumes: Sequence[int] | None = None,
               val_volumes: Sequence[int] | None = None) -> dict[str, Any]:
    """Pre-train a LeCL slice encoder (``lesion_weight=0``: plain MoCo v3) into ``out``.

    Args:
        data: a PhantomCT folder or dataset. cfg: model (default: ``lecl_config("small")``);
            its ``lesion_weight`` is replaced by the argument.
        volumes / val_volumes: dataset indices (default: splits train+test / val; without val
            volumes the validation views come from training slices).

    Returns:
        The loop's summary; the model is in ``out/best`` and ``out/last``.
    """
    ds = data if isinstance(data, CTDataset) else CTDataset(data)
    cfg = dataclasses.replace(cfg or lecl_config("small"), lesion_weight=float(lesion_weight))
    train = train or default_train_config()
    if train.batch_size < MIN_BATCH:  # before anything is built or written
        raise ConfigError(f"LeCL trains with batch normalisation, which needs at least "
                          f"{MIN_BATCH} slices per batch: batch size {train.batch_size} is "
                          f"too small")
    volumes, val_volumes = ds.pretraining_split(volumes, val_volumes)
    torch.manual_seed(train.seed)
    model = LeCL(cfg).to(train.device)
    task = LeCLTask(model, ds, train, volumes, val_volumes)
    n = task.train_size()
    if n < 2:
        raise ConfigError("LeCL needs at least 2 training slices")
    if n < train.batch_size * train.grad_accum and n % train.batch_size == 1:
        # fewer slices than one step: the loop's last micro-batch would hold a single slice
        raise ConfigError(f"{n} training slices in batches of {train.batch_size} leave a "
                          "batch of one slice, which batch normalisation cannot train on: "
                          "choose another batch size")
    logger.info("LeCL (w=%g): %d training slices", cfg.lesion_weight, task.train_size())
    return Trainer(model, task, train, Path(out), monitor="val_loss", monitor_mode="min").fit()


# --------------------------------------------------------------------------- embeddings

def model_fingerprint(model: LeCL) -> str:
    """sha256 (16 hex) of the model's config and weights: the model half of a cache key."""
    h = hashlib.sha256(json.dumps(config_to_dict(model.cfg), sort_keys=True,
                                  default=list).encode())
    update_with_weights(h, model.encoder)
    return h.hexdigest()[:16]


@dataclass
class SliceEmbeddings:
    """Slice embeddings per volume (dataset order) and how many came from the cache."""

    volume_ids: list[str]
    bags: list[torch.Tensor]  # [(S_i, E)] float32
    hits: int
    computed: int
    model_key: str


@torch.no_grad()
def embed_volume(model: LeCL, hu: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(Z, Y, X) HU -> (Z, E) slice embeddings (model in eval mode)."""
    size = model.cfg.vision.image_size
    out = []
    for k0 in range(0, hu.shape[0], batch_size):
        x = torch.stack([slice_input(s, size) for s in hu[k0:k0 + batch_size]])
        out.append(model.embed(x))
    return torch.cat(out)


def extract_slice_embeddings(model_dir: str | os.PathLike[str] | LeCL,
                             data: str | os.PathLike[str] | CTDataset,
                             cache: str | os.PathLike[str] | None = None,
                             batch_size: int = 64) -> SliceEmbeddings:
    """Embeddings of every slice of every volume, cached by (volume content hash, model).

    Args:
        model_dir: a LeCL checkpoint folder (or a model, e.g. a random-init baseline).
        cache: folder of the cache (default ``<data>/.cache/slice_embeddings``); one float16
            file per (model fingerprint, volume hash).
    """
    ds = data if isinstance(data, CTDataset) else CTDataset(data)
    model = model_dir if isinstance(model_dir, LeCL) else load_lecl(model_dir)
    model.eval()
    key = model_fingerprint(model)
    folder = Path(cache) if cache is not None else ds.cache_dir / "slice_embeddings"
    folder = folder / key
    bags, hits, computed = [], 0, 0
    for i in range(len(ds)):
        path = folder / f"{ds.content_hash(i)}.pt"
        if path.is_file():
            bags.append(torch.load(path, map_location="cpu").float())
            hits += 1
            continue
        emb = embed_volume(model, ds.volume_tensor(i), batch_size)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(emb.half(), tmp)
        os.replace(tmp, path)
        bags.append(emb.half().float())
        computed += 1
    return SliceEmbeddings(ds.volume_ids, bags, hits, computed, key)
