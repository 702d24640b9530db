"""Inference runtime: one loaded model + tokenizer + preprocessing, used by the index, the CLI
and the app. Inputs are :class:`vlm.io.ImageData` (any reader output) or text; outputs are
numpy vectors (unit length), region boxes in *original* image pixels, probabilities, heatmaps.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlm.amp import AMP_CHOICES, cpu_bf16_flags
from vlm.amp import autocast as amp_autocast
from vlm.data.transforms import Letterbox, Preprocess
from vlm.errors import ConfigError
from vlm.grounding import METHODS as GROUNDING_METHODS
from vlm.grounding import Grounding, ground, ground_gradient
from vlm.io import ImageData, readable
from vlm.models.checkpoint import WEIGHTS_FILE, is_checkpoint, update_with_weights
from vlm.models.config import config_hash, load_config
from vlm.models.factory import create_model, get_tokenizer
from vlm.models.lrclr import LRCLR
from vlm.models.outputs import ImageEmbedding
from vlm.zeroshot import PromptSet, ZeroShotClassifier, load_calibration

logger = logging.getLogger(__name__)


def check_device(device: str) -> str:
    """``device`` if torch can run on it here, else a one-line :class:`ConfigError` (a typo, or
    ``cuda`` on a machine without a CUDA GPU or with a CPU-only torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: no CUDA GPU visible to this torch "
                              f"({torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA "
                              f"device(s) here")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r}: RadLens runs on cpu or cuda")
    return device


@dataclass
class EncodedImage:
    vector: np.ndarray  # (E,) float32, unit length
    region_vectors: np.ndarray  # (K, E) float32 (K = 0 without region selection)
    region_boxes: np.ndarray  # (K, 4) x0, y0, x1, y1 in original pixels
    region_scores: np.ndarray  # (K,)


def model_fingerprint(model: LRCLR, source: str | os.PathLike[str] | None = None
                      ) -> str:
    """sha256 (16 hex) of a model's config hash and its weights: what an index records.

    Two trainings of one config make different vectors, so the config alone cannot tell an
    index's model from a retrained one. The weights are the checkpoint's ``model.safetensors``
    bytes when ``source`` is a checkpoint folder (independent of the precision it is loaded in),
    else the parameters and buffers themselves. Pinned base weights (the text tower) are named
    by their sha256 inside the config.
    """
    weights = Path(source) / WEIGHTS_FILE if source is not None else None
    if weights is not None and weights.is_file():
        return _fingerprint_file(config_hash(model.config), weights)
    h = hashlib.sha256(config_hash(model.config).encode())
    update_with_weights(h, model, as_float=True)
    return h.hexdigest()[:16]


def checkpoint_fingerprint(folder: str | os.PathLike[str]) -> str:
    """``Encoder(folder).config_hash`` without building the model (a config and a file hash)."""
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"{folder}: no {WEIGHTS_FILE}; not a RadLens checkpoint folder")
    return _fingerprint_file(config_hash(load_config(folder)), weights)


def _fingerprint_file(config_digest: str, weights: Path) -> str:
    h = hashlib.sha256(config_digest.encode())
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class Encoder:
    """A model ready for inference (eval mode asserted).

    Identity: :attr:`name` and :attr:`config_hash`, a fingerprint of the config *and* the
    weights (:func:`model_fingerprint`), as :class:`vlm.volume_encoder.VolumeEncoder` does; an
    index refuses an encoder whose fingerprint differs from the one that filled it.
    """

    def __init__(self, model: str | os.PathLike[str], device: str = "cpu",
                 precision: str = "fp32", prompts: PromptSet | None = None,
                 batch_size: int = 16, amp: str | None = None) -> None:
        """``amp``: encode images under ``torch.autocast`` in bf16 (CPU or GPU) or fp16 (GPU);
        the weights stay as loaded. On this project's CPU (AVX-512 BF16) bf16 encodes the
        shipped model about 2.8x faster than fp32; a bf16 build of PhantomCXR stored vectors at
        cosine >= 0.9998 to the fp32 build's (README, "Index, ingestion and search"). Text,
        classification and grounding stay in the loaded precision."""
        if amp is not None and amp not in AMP_CHOICES:
            raise ConfigError(f"unknown amp '{amp}': use {' or '.join(AMP_CHOICES)}")
        if amp == "fp16" and torch.device(device).type == "cpu":
            raise ConfigError("fp16 autocast is for GPUs; use bf16 on the CPU")
        if amp == "bf16" and torch.device(device).type == "cpu" and not cpu_bf16_flags():
            logger.warning("this CPU has no native bfloat16 (no avx512_bf16 or amx flag): bf16 "
                           "encoding is emulated and may be slower than fp32")
        if not is_checkpoint(model):
            # a config name or JSON builds untrained, unseeded weights: vectors that match no
            # text and an index no later process could reopen (its fingerprint is random)
            config = load_config(model)  # unknown names and bad JSON: their own one line
            raise ConfigError(
                f"model '{model}' is a configuration ({config.name}) without trained weights: "
                "give a checkpoint folder made by 'radlens train lrclr' (shipped: "
                "checkpoints/lrclr-r18)")
        self.amp = amp
        self.model = create_model(model, device=device, precision=precision)
        assert not self.model.training, "inference needs eval mode"
        self.tokenizer = get_tokenizer(model)
        self.preprocess = Preprocess(self.model.config.preprocess, train=False)
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype
        self.batch_size = batch_size
        self.name = self.model.config.name
        self.config_hash = model_fingerprint(self.model, model)
        if self.device.type == "cpu":  # 1.2x for a CNN tower here; GPUs not measured
            self.model.visual.use_channels_last()
        calibration_file = Path(model) / "calibration.json"
        calibration = load_calibration(calibration_file) if calibration_file.is_file() else None
        self.zeroshot = ZeroShotClassifier(self.model, self.tokenizer, prompts, calibration)

    @property
    def dim(self) -> int:
        return int(self.model.config.embed_dim)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """Where images are encoded: ``torch.autocast`` in :attr:`amp`, or nothing."""
        return amp_autocast(self.amp, self.device)

    def _embed(self, images: Sequence[ImageData]) -> tuple[ImageEmbedding, list[Letterbox]]:
        tensors, boxes = [], []
        for image in images:
            x, box = self.preprocess(readable(image))
            tensors.append(x)
            boxes.append(box)
        return self.encode_tensor(torch.stack(tensors).to(self.device, self.dtype)), boxes

    def encode_tensor(self, x: torch.Tensor) -> ImageEmbedding:
        """A preprocessed input batch -> its embeddings, under :meth:`autocast`. With ``amp``
        the unit vectors are normalised again in float32: normalised in bf16 they come out
        with norms of 1 +- 0.003, and an index scores by inner product."""
        with torch.inference_mode(), self.autocast():
            emb = self.model.encode_image(x)
        if self.amp is not None:
            emb.global_embedding = F.normalize(emb.global_embedding.float(), dim=-1)
            emb.patch_embeddings = F.normalize(emb.patch_embeddings.float(), dim=-1)
            if emb.region_embeddings is not None:
                emb.region_embeddings = F.normalize(emb.region_embeddings.float(), dim=-1)
        return emb

    def encode_images(self, images: Sequence[ImageData]) -> list[EncodedImage]:
        out: list[EncodedImage] = []
        for i in range(0, len(images), self.batch_size):
            emb, boxes = self._embed(images[i:i + self.batch_size])
            for j, box in enumerate(boxes):
                if emb.region_embeddings is not None and emb.region_boxes is not None:
                    rv = emb.region_embeddings[j].float().cpu().numpy()
                    rb = box.to_original(emb.region_boxes[j].float().cpu().numpy())
                    rs = emb.region_scores[j].float().cpu().numpy() if \
                        emb.region_scores is not None else np.ones(len(rv), np.float32)
                else:
                    rv = np.zeros((0, self.dim), np.float32)
                    rb, rs = np.zeros((0, 4)), np.zeros(0, np.float32)
                out.append(EncodedImage(emb.global_embedding[j].float().cpu().numpy(), rv,
                                        rb.astype(np.float32), rs.astype(np.float32)))
        return out

    def encode_text(self, texts: Sequence[str], split: bool = True) -> np.ndarray:
        """(N, E) unit vectors for queries or reports (global report embedding)."""
        vecs = []
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                tokens = self.tokenizer(list(texts[i:i + 64]), split=split)
                vecs.append(self.model.encode_text(tokens).global_embedding.float().cpu())
        return torch.cat(vecs).numpy()

    def classify(self, image: ImageData, prompts: PromptSet | None = None) -> dict[str, float]:
        """Finding probabilities for one image (calibrated when the checkpoint has them)."""
        zs = self.zeroshot if prompts is None else ZeroShotClassifier(
            self.model, self.tokenizer, prompts, self.zeroshot.calibration)
        emb, _ = self._embed([image])
        probs = zs.probabilities(emb)[0]
        return dict(zip(zs.findings, (float(p) for p in probs), strict=True))

    def ground(self, image: ImageData, phrases: Sequence[str], method: str = "gradient"
               ) -> list[Grounding]:
        """One heatmap (original image size) and box per phrase.

        ``method``: ``"gradient"`` (phrase against the prompt set's normal-study sentence,
        one backward pass per phrase) or ``"patch"`` (patch-embedding cosine, no gradient);
        see :mod:`vlm.grounding`.
        """
        if method not in GROUNDING_METHODS:
            raise ConfigError(f"grounding method must be one of {', '.join(GROUNDING_METHODS)}, "
                              f"not {method!r}")
        with torch.inference_mode():
            texts = [self.model.encode_text(self.tokenizer([p], split=False)) for p in phrases]
        if method == "patch":
            emb, boxes = self._embed([image])
            return [ground(emb, text, boxes[0]) for text in texts]
        x, box = self.preprocess(readable(image))
        x = x[None].to(self.device, self.dtype)
        reference = self.zeroshot.reference_embedding()
        return [ground_gradient(self.model, x, text, reference, box) for text in texts]
