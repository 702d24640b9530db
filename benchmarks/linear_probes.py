"""Where is an image–text model's zero-shot ceiling? Supervised linear probes on each tower.

For a RadLens checkpoint and a PhantomCXR folder, per finding with at least 20 test positives:

* ``text_states``: logistic regression on the text tower's pooled report states (before the
  projection; frozen MiniLM by default), fitted on the train split's reports, scored on the
  test split's reports. High values mean the text side can tell the findings apart.
* ``image_global``: the same on the image tower's global embeddings of the radiographs.
* ``image_patches``: the same on the flattened projected patch grid.
* ``zero_shot``: the model's own prompt-pair zero-shot AUC on the test split (calibrated on
  val), for comparison.

A finding that the text probe separates but the image probe does not is limited by what the
image tower learned, not by the text encoder or the contrastive alignment.

Usage: ``python benchmarks/linear_probes.py [--model checkpoints/lrclr-r18]
[--data data/phantom_cxr]``; prints one JSON object, writes ``benchmarks/out/linear_probes.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import have_phantom_cxr, write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
MIN_POSITIVES = 20


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
          names: list[str], c: float = 0.05) -> dict[str, float]:
    """Per-label test AUC of an L2 logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    out: dict[str, float] = {}
    for j, name in enumerate(names):
        if test_y[:, j].sum() < MIN_POSITIVES or train_y[:, j].sum() < 2:
            continue
        clf = LogisticRegression(C=c, max_iter=2000).fit(a, train_y[:, j])
        out[name] = round(float(roc_auc_score(test_y[:, j], clf.predict_proba(b)[:, 1])), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "phantom_cxr")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    import vlm  # noqa: F401  (torchvision CPU shim)
    from vlm.data.cxr_dataset import CXRDataset
    from vlm.eval.lrclr import encode_images
    from vlm.models.factory import create_model, get_tokenizer
    from vlm.train.lrclr import pool_texts
    from vlm.zeroshot import ZeroShotClassifier

    if not have_phantom_cxr(args.data):
        return 2
    model = create_model(args.model)
    tokenizer = get_tokenizer(args.model)
    pre = model.config.preprocess
    train, val, test = (CXRDataset(args.data, s, pre) for s in ("train", "val", "test"))
    zs = ZeroShotClassifier(model, tokenizer)
    names = zs.findings
    ytr, yte = train.labels(names), test.labels(names)

    with torch.no_grad():
        text_tr = pool_texts(model, tokenizer, train.texts).report.float().numpy()
        text_te = pool_texts(model, tokenizer, test.texts).report.float().numpy()
    img_tr, img_te = encode_images(model, train), encode_images(model, test)
    zs.calibrate(encode_images(model, val), val.labels(names))
    probs = zs.probabilities(img_te)

    from sklearn.metrics import roc_auc_score

    zero = {n: round(float(roc_auc_score(yte[:, j], probs[:, j])), 4)
            for j, n in enumerate(names) if yte[:, j].sum() >= MIN_POSITIVES}
    rows: dict[str, dict[str, float]] = {
        "text_states": probe(text_tr, ytr, text_te, yte, names),
        "image_global": probe(img_tr.global_embedding.float().numpy(), ytr,
                              img_te.global_embedding.float().numpy(), yte, names),
        "image_patches": probe(img_tr.patch_embeddings.flatten(1).float().numpy(), ytr,
                               img_te.patch_embeddings.flatten(1).float().numpy(), yte, names),
        "zero_shot": zero,
    }
    result: dict[str, Any] = {
        "benchmark": "linear_probes", "model": model.config.name, "data": str(args.data),
        "train": len(train), "test": len(test), "min_test_positives": MIN_POSITIVES,
        "per_finding": rows,
        "macro": {k: round(float(np.mean(list(v.values()))), 4) if v else None
                  for k, v in rows.items()},
    }
    write_result(args.out, "linear_probes", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
