"""``radlens train lrclr``: LRCLR (or its plain-CLIP baseline) on a PhantomCXR-style folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm.data.cxr_dataset import CXRDataset, check_workers
from vlm.data.transforms import Preprocess
from vlm.losses import LRCLRLoss
from vlm.models.card import model_card
from vlm.models.checkpoint import save_checkpoint
from vlm.models.factory import create_model, get_tokenizer
from vlm.models.lrclr import LRCLR
from vlm.models.outputs import TextEmbedding
from vlm.models.tokenizer import ReportTokenizer
from vlm.train.loop import TrainConfig, Trainer

logger = logging.getLogger(__name__)

VAL_MIN_POSITIVES = 10  # findings with fewer validation positives are left out of the AUC


@dataclass
class PooledText:
    report: torch.Tensor  # (N, H)
    sentences: torch.Tensor  # (N, S, H)
    mask: torch.Tensor  # (N, S)

    def take(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.report[idx], self.sentences[idx], self.mask[idx]


def pool_texts(model: LRCLR, tokenizer: ReportTokenizer, texts: list[str], batch: int = 64
               ) -> PooledText:
    """Frozen text encoder states for every text, once (the projection still trains)."""
    reports, sents, masks = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            r, s, m = model.text.pool(tokenizer(texts[i:i + batch]))
            reports.append(r)
            sents.append(s)
            masks.append(m)
    model.train(was_training)
    width = max(s.shape[1] for s in sents)
    sents = [torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[1])) for s in sents]
    masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]
    return PooledText(torch.cat(reports), torch.cat(sents), torch.cat(masks))


class LRCLRTask:
    def __init__(self, model: LRCLR, tokenizer: ReportTokenizer, train: CXRDataset,
                 val: CXRDataset, cfg: TrainConfig, rank: int = 0, world_size: int = 1,
                 fit_text_standardizer: bool = False) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.train_ds, self.val_ds = train, val
        self.rank, self.world_size = rank, world_size
        self.loss_fn = LRCLRLoss(model.config.loss)
        self.augment = Preprocess(model.config.preprocess, train=True)
        self.cached = model.config.text.freeze
        self.train_text = self._pooled(train) if self.cached else None
        self.val_text = self._pooled(val) if self.cached else None
        if fit_text_standardizer:
            pooled = self.train_text or pool_texts(model, tokenizer, train.texts)
            model.text.fit_standardizer(pooled.report, pooled.sentences, pooled.mask)

    def data_fingerprint(self) -> str:
        """The training data's identity for resuming (the files and report texts of both
        splits): a run folder's state is not resumed on other data."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(
            [[r["file"] for r in ds.rows] + ds.texts for ds in (self.train_ds, self.val_ds)]
        ).encode()).hexdigest()[:16]

    def _pooled(self, ds: CXRDataset) -> PooledText:
        """Frozen-encoder states, cached on disk beside the image cache (keyed by the texts
        and the text tower's config), so a resumed or second run does not recompute them."""
        import dataclasses
        import hashlib
        import json

        key = hashlib.sha256(json.dumps([ds.texts, dataclasses.asdict(
            self.model.config.text)], sort_keys=True).encode()).hexdigest()[:16]
        path = ds.root / ".cache" / f"text-{key}.pt"
        if path.is_file():
            return PooledText(**torch.load(path, weights_only=True))
        pooled = pool_texts(self.model, self.tokenizer, ds.texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        torch.save(dataclasses.asdict(pooled), tmp)
        os.replace(tmp, path)
        return pooled

    def train_size(self) -> int:
        return len(self.train_ds)

    def _generator(self, epoch: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(((self.cfg.seed * 1_000_003 + epoch) * 10_000_019
                                              + index) % 2**63)

    def batch(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        images = torch.stack([self.train_ds.image_tensor(i, self.augment,
                                                         self._generator(epoch, i))
                              for i in indices])
        return {"images": images, "indices": list(indices), "split": "train"}

    def _text(self, indices: list[int], split: str) -> TextEmbedding:
        pooled = self.train_text if split == "train" else self.val_text
        if pooled is not None:
            return self.model.text_from_pooled(*pooled.take(indices))
        ds = self.train_ds if split == "train" else self.val_ds
        return self.model.encode_text(self.tokenizer([ds.texts[i] for i in indices]))

    def loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = self.model.encode_image(batch["images"].to(self.cfg.device))
        text = self._text(batch["indices"], batch["split"])
        return self.loss_fn(self.model, image, text, self.rank, self.world_size,
                            max_sentences=self.model.config.text.max_sentences)

    def validate(self) -> dict[str, float]:
        """Validation loss, image->report recall@5 and zero-shot macro AUC (findings with at
        least 10 validation positives) on the validation split."""
        n = len(self.val_ds)
        bs = self.cfg.batch_size
        losses, images, texts = [], [], []
        for i in range(0, n - n % bs if n >= bs else n, bs):
            idx = list(range(i, min(i + bs, n)))
            batch = {"images": torch.stack([self.val_ds.image_tensor(j) for j in idx]),
                     "indices": idx, "split": "val"}
            out = self.loss(batch)
            losses.append(float(out["loss"]))
        for i in range(0, n, 128):
            idx = list(range(i, min(i + 128, n)))
            images.append(self.model.encode_image(
                torch.stack([self.val_ds.image_tensor(j) for j in idx]).to(self.cfg.device)
            ).global_embedding)
            texts.append(self._text(idx, "val").global_embedding)
        sim = torch.cat(images) @ torch.cat(texts).T
        top5 = sim.topk(min(5, n), dim=1).indices
        hits = top5 == torch.arange(n, device=top5.device)[:, None]
        recall5 = hits.any(1).float().mean().item()
        metrics: dict[str, float] = {"val_loss": sum(losses) / max(1, len(losses)),
                                     "val_i2t_recall@5": recall5}
        if self.zero_shot_scorable():
            metrics["val_zeroshot_auc"] = self._zero_shot_auc()
        return metrics

    def zero_shot_scorable(self) -> bool:
        """Whether some finding has enough validation positives for a zero-shot AUC."""
        from vlm.zeroshot import PromptSet

        labels = self.val_ds.labels(list(PromptSet.load().findings))
        return bool((labels.sum(0) >= VAL_MIN_POSITIVES).any())

    def _zero_shot_auc(self) -> float:
        from vlm.eval.lrclr import encode_images
        from vlm.eval.metrics import roc_auc
        from vlm.zeroshot import ZeroShotClassifier

        zs = ZeroShotClassifier(self.model, self.tokenizer)
        scores = zs.logit_differences(encode_images(self.model, self.val_ds))
        labels = self.val_ds.labels(zs.findings)
        aucs = [roc_auc(labels[:, j], scores[:, j]) for j in range(labels.shape[1])
                if labels[:, j].sum() >= VAL_MIN_POSITIVES]
        return float(sum(aucs) / len(aucs))

    def save(self, folder: Path, summary: dict[str, Any]) -> None:
        card = model_card(self.model.config, training={**summary,
                                                       "train_studies": len(self.train_ds)})
        save_checkpoint(self.model, folder, self.tokenizer, card=card, training=summary)


def train_lrclr(data: str | os.PathLike[str], model_name: str, out: str | os.PathLike[str],
                cfg: TrainConfig, pretrained: str | None = None, workers: int | None = None
                ) -> dict[str, Any]:
    """Train on ``data`` (a PhantomCXR folder), writing ``out/best`` and ``out/last``.
    ``workers``: decode processes (None: all cores; 0: this process)."""
    check_workers(workers)  # before the model is built
    torch.manual_seed(cfg.seed)
    model = create_model(model_name, pretrained=pretrained, device=cfg.device)
    if torch.device(cfg.device).type == "cpu":  # a bf16 step of a CNN tower: 1.3x here
        model.visual.use_channels_last()
    tokenizer = get_tokenizer(model_name)
    pre = model.config.preprocess
    train = CXRDataset(data, "train", pre, workers=workers)
    val = CXRDataset(data, "val", pre, workers=workers)
    logger.info("training on %d studies, validating on %d", len(train), len(val))
    task = LRCLRTask(model, tokenizer, train, val, cfg, fit_text_standardizer=pretrained is None)
    # Best checkpoint by validation zero-shot macro AUC (what the model is for); a validation
    # split too small for any AUC falls back to image->report recall@5.
    monitor = "val_zeroshot_auc" if task.zero_shot_scorable() else "val_i2t_recall@5"
    trainer = Trainer(model, task, cfg, Path(out), monitor=monitor, monitor_mode="max")
    return trainer.fit()
