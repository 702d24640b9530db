"""One factory for models, transforms and tokenizers, in the spirit of open_clip.

    model, preprocess_train, preprocess = create_model_and_transforms("lrclr-tiny")
    tokenizer = get_tokenizer("lrclr-tiny")

``name_or_path`` is a built-in config name (``vlm/model_configs/*.json``), a config JSON file
or a checkpoint folder. ``pretrained`` (optional) is a RadLens checkpoint folder for the same
config, or open_clip-format weights (a ``.bin``/``.pt``/``.safetensors`` file or a folder with
``open_clip_pytorch_model.bin``/``open_clip_model.safetensors``), by path, ``local-dir:`` or
``hf-hub:`` name; LRCLR fine-tunes from such a CLIP/BiomedCLIP starting point.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from vlm.data.transforms import Preprocess
from vlm.errors import ConfigError
from vlm.models.checkpoint import is_checkpoint, load_state, read_checkpoint_meta
from vlm.models.config import ModelConfig, load_config
from vlm.models.lrclr import LRCLR
from vlm.models.sources import resolve_source, verify_sha256
from vlm.models.tokenizer import HFBackend, ReportTokenizer, SentencePieceBackend

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def build_model(config: ModelConfig) -> LRCLR:
    """A model from its config; pinned pretrained text weights are loaded and verified."""
    source = resolve_source(config.text.source)
    load_weights = config.text.pretrained and not config.text.overrides
    if load_weights and config.text.sha256:
        weights = source / "model.safetensors"
        if not weights.is_file():
            raise ConfigError(f"{config.text.source}: no model.safetensors to verify")
        verify_sha256(weights, config.text.sha256, f"text tower {config.text.source}")
    return LRCLR(config, source, load_text_weights=load_weights)


def _place(model: LRCLR, device: str | torch.device, precision: str) -> LRCLR:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    model = model.to(device=torch.device(device))
    if precision != "fp32":
        model = model.to(dtype=PRECISIONS[precision])
    return model.eval()


def create_model(name_or_path: str | os.PathLike[str], pretrained: str | None = None,
                 device: str | torch.device = "cpu", precision: str = "fp32") -> LRCLR:
    """Build (and optionally load) a model; returned in eval mode on ``device``."""
    if is_checkpoint(name_or_path):
        config = ModelConfig.from_dict(read_checkpoint_meta(name_or_path)["model"])
        model = build_model(config)
        load_state(model, name_or_path)
        if pretrained:
            raise ConfigError("pass either a checkpoint folder or pretrained weights, not both")
        return _place(model, device, precision)
    model = build_model(load_config(name_or_path))
    if pretrained:
        path = resolve_source(pretrained)
        if is_checkpoint(path):
            load_state(model, path)
        else:
            load_open_clip_weights(model, path)
    return _place(model, device, precision)


def create_model_and_transforms(name_or_path: str | os.PathLike[str],
                                pretrained: str | None = None,
                                device: str | torch.device = "cpu", precision: str = "fp32",
                                seed: int | None = None) -> tuple[LRCLR, Preprocess, Preprocess]:
    """Model plus its training (augmenting) and evaluation preprocessing."""
    model = create_model(name_or_path, pretrained, device=device, precision=precision)
    cfg = model.config.preprocess
    return model, Preprocess(cfg, train=True, seed=seed), Preprocess(cfg, train=False)


def get_tokenizer(name_or_path: str | os.PathLike[str]) -> ReportTokenizer:
    """The tokenizer of a built-in config, config file or checkpoint folder."""
    folder: Path | None = None
    if is_checkpoint(name_or_path):
        meta = read_checkpoint_meta(name_or_path)
        config = ModelConfig.from_dict(meta["model"])
        folder = Path(name_or_path) / "tokenizer"
    else:
        config = load_config(name_or_path)
    text = config.text
    if text.tokenizer == "sentencepiece":
        path = (folder / "spiece.model") if folder else (
            resolve_source(text.tokenizer_path) if text.tokenizer_path else None)
        if path is None:
            raise ConfigError(f"model '{config.name}' uses SentencePiece but names no "
                              "tokenizer_path")
        backend: HFBackend | SentencePieceBackend = SentencePieceBackend(path)
        return ReportTokenizer(backend, text.context_length, text.max_sentences, lowercase=True)
    if text.tokenizer != "hf":
        raise ConfigError(f"unknown tokenizer '{text.tokenizer}': use hf or sentencepiece")
    source = folder if folder else (resolve_source(text.tokenizer_path) if text.tokenizer_path
                                    else resolve_source(text.source))
    return ReportTokenizer(HFBackend(source), text.context_length, text.max_sentences)


def load_open_clip_weights(model: LRCLR, path: Path) -> None:
    """Start from an open_clip checkpoint (CLIP / BiomedCLIP layout): ``visual.*`` goes into
    the image tower; ``text.transformer.*``/``text.proj.*`` (HF text towers) and
    ``logit_scale`` load where shapes match."""
    if path.is_dir():
        found = [path / f for f in OPEN_CLIP_FILES if (path / f).is_file()]
        if not found:
            raise ConfigError(f"{path}: no open_clip weights ({' or '.join(OPEN_CLIP_FILES)})")
        path = found[0]
    raw: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:  # weights only: a foreign pickle runs no code here
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # a text file was an internal KeyError, a truncated one others
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"{path}: not readable as model weights ({reason}): give a RadLens "
                          "checkpoint folder or open_clip weights (.bin, .pt, .safetensors)"
                          ) from None
    if isinstance(raw, dict) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: not a state dict")
    state: dict[str, torch.Tensor] = raw
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    mapped, skipped = {}, []
    for key, value in state.items():
        target = key
        if key.startswith("visual.") and model.visual.proj is None:
            target = "visual.trunk." + key[len("visual."):]
        if target in own and own[target].shape == value.shape:
            mapped[target] = value
        else:
            skipped.append(key)
    visual_keys = [k for k in own if k.startswith("visual.")]
    missing_visual = [k for k in visual_keys if k not in mapped]
    if missing_visual:
        raise ConfigError(f"{path.name}: the image tower does not match this config "
                          f"({len(missing_visual)} of {len(visual_keys)} tensors missing or "
                          "shaped differently)")
    model.load_state_dict(mapped, strict=False)
    logger.info("loaded %d open_clip tensors (%d skipped)", len(mapped), len(skipped))
