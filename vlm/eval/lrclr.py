"""``radlens eval``: zero-shot AUC, retrieval (exact and label-matched) and grounding scores of
an image–text model on a PhantomCXR split; JSON, a markdown table and plots."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm.data.cxr_dataset import CXRDataset
from vlm.eval.metrics import bootstrap_ci, label_matched, recall_at_k, roc_auc, weighted_auc
from vlm.grounding import METHODS as GROUNDING_METHODS
from vlm.grounding import (
    cnr,
    ground,
    ground_gradient,
    iou,
    mask_box,
    pointing_game,
    pointing_game_box,
)
from vlm.models.factory import create_model, get_tokenizer
from vlm.models.lrclr import LRCLR
from vlm.models.outputs import ImageEmbedding
from vlm.zeroshot import PromptSet, ZeroShotClassifier

logger = logging.getLogger(__name__)
MIN_POSITIVES = 20
#: percentile-bootstrap resamples of the split's studies behind every ``*_ci95`` interval
BOOTSTRAP_ROUNDS = 1000


def encode_images(model: LRCLR, ds: CXRDataset, batch: int = 64) -> ImageEmbedding:
    parts: list[ImageEmbedding] = []
    param = next(model.parameters())
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            x = torch.stack([ds.image_tensor(j) for j in range(i, min(i + batch, len(ds)))])
            parts.append(model.encode_image(x.to(param.device, param.dtype)))

    def cat(name: str) -> torch.Tensor | None:
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else torch.cat(vals)

    return ImageEmbedding(global_embedding=cat("global_embedding"),  # type: ignore[arg-type]
                          patch_embeddings=cat("patch_embeddings"),  # type: ignore[arg-type]
                          region_embeddings=cat("region_embeddings"),
                          region_boxes=cat("region_boxes"), region_scores=cat("region_scores"),
                          patch_size=parts[0].patch_size)


def _similarity(model: LRCLR, image: ImageEmbedding, texts: list[str], tokenizer: Any,
                chunk: int = 128) -> np.ndarray:
    cols = []
    with torch.no_grad():
        for i in range(0, len(texts), chunk):
            text = model.encode_text(tokenizer(texts[i:i + chunk]))
            cols.append(model.similarity(image, text).cpu())
    return torch.cat(cols, dim=1).double().numpy()  # (I, T)


def evaluate(model_path: str | os.PathLike[str], data: str | os.PathLike[str],
             split: str = "test", out_dir: str | os.PathLike[str] | None = None,
             prompts: PromptSet | None = None, max_grounding: int | None = None,
             device: str = "cpu") -> dict[str, Any]:
    model = create_model(model_path, device=device)
    assert not model.training
    if torch.device(device).type == "cpu":  # as Encoder: the same scores, faster
        model.visual.use_channels_last()
    tokenizer = get_tokenizer(model_path)
    pre = model.config.preprocess
    test = CXRDataset(data, split, pre)
    val = CXRDataset(data, "val", pre)
    zs = ZeroShotClassifier(model, tokenizer, prompts)
    findings = zs.findings

    val_img = encode_images(model, val)
    zs.calibrate(val_img, val.labels(findings))
    img = encode_images(model, test)
    probs = zs.probabilities(img)
    labels = test.labels(findings)
    per_finding: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(findings):
        pos = int(labels[:, j].sum())
        auc = roc_auc(labels[:, j], probs[:, j])
        per_finding[name] = {"positives": pos, "auc": None if np.isnan(auc) else auc}
    macro_set = [f for f, v in per_finding.items()
                 if v["positives"] >= MIN_POSITIVES and v["auc"] is not None]
    macro = float(np.mean([per_finding[f]["auc"] for f in macro_set])) if macro_set else None

    # Retrieval: report -> image and image -> report over the split.
    sim = _similarity(model, img, test.texts, tokenizer)  # (I, T)
    t2i = recall_at_k(sim.T)
    i2t = recall_at_k(sim)
    sets = [frozenset(r.get("labels", [])) for r in test.rows]
    queries: dict[str, list[float]] = {}
    matched = label_matched(sim.T, sets, sets, k=10, per_query=queries)

    grounding = _grounding(model, tokenizer, test, img, zs, max_grounding)
    macro_ci = _confidence(len(test), labels, probs, findings, per_finding, macro_set, queries,
                           matched, grounding["gradient"])
    result: dict[str, Any] = {
        "model": model.config.name, "split": split, "studies": len(test),
        "zero_shot": {"per_finding": per_finding, "macro_auc": macro,
                      "macro_auc_ci95": macro_ci, "macro_over": macro_set,
                      "min_positives": MIN_POSITIVES},
        "retrieval": {"report_to_image": t2i, "image_to_report": i2t,
                      "label_matched": matched},
        # the default method's scores; "grounding_patch": the patch-cosine method's
        "grounding": {"method": "gradient", **_public(grounding["gradient"])},
        "grounding_patch": {"method": "patch", **_public(grounding["patch"])},
        # findings left out of both grounding scores because their mask cannot be read, and
        # studies left out of every score because their image cannot be read
        "grounding_skipped_masks": grounding["gradient"]["skipped_masks"],
        # what the "*_ci95" intervals are
        "confidence": {"interval": "95% percentile bootstrap", "unit": "study",
                       "rounds": BOOTSTRAP_ROUNDS, "seed": 0,
                       "retrieval": "query studies resampled, the gallery fixed"},
        "unreadable_images": len(test.skipped) + len(val.skipped),
    }
    if out_dir is not None:
        write_outputs(Path(out_dir), result, labels, probs, findings, model, tokenizer, test, zs)
    return result


def _confidence(n: int, labels: np.ndarray, probs: np.ndarray, findings: list[str],
                per_finding: dict[str, dict[str, Any]], macro_set: list[str],
                queries: dict[str, list[float]], matched: dict[str, Any],
                grounding: dict[str, Any]) -> list[float] | None:
    """95% bootstrap intervals over the split's ``n`` studies, added in place as ``*_ci95``
    beside each headline number (per-finding AUC, label-matched hit@10 and mAP@10, the
    default read-out's pointing games); returns the macro AUC's. They say how far a score
    could move with another draw of studies; the spread between training seeds is another
    question."""
    def ci(stat: Any) -> list[float] | None:
        found = bootstrap_ci(stat, n, rounds=BOOTSTRAP_ROUNDS, seed=0)
        return [round(found[0], 4), round(found[1], 4)] if found else None

    col = {name: j for j, name in enumerate(findings)}
    for name, v in per_finding.items():
        j = col[name]
        v["auc_ci95"] = ci(lambda c, j=j: weighted_auc(labels[:, j], probs[:, j], c))
    q = np.asarray(queries.get("query", []), dtype=np.int64)
    for key, metric in (("hit", "hit@10"), ("ap", "mAP@10")):
        vals = np.asarray(queries.get(key, []), dtype=np.float64)
        matched[f"{metric}_ci95"] = (ci(lambda c, v=vals: _weighted_mean(v, c[q]))
                                     if len(vals) else None)
    studies = np.asarray(grounding["_studies"], dtype=np.int64)
    for key, name in (("_pointing", "pointing_game"), ("_pointing_box", "pointing_game_box")):
        hits = np.asarray(grounding[key], dtype=np.float64)
        grounding[f"{name}_ci95"] = (ci(lambda c, h=hits: _weighted_mean(h, c[studies]))
                                     if len(hits) else None)
    if not macro_set:
        return None
    cols = [col[f] for f in macro_set]
    return ci(lambda c: float(np.mean([weighted_auc(labels[:, j], probs[:, j], c)
                                       for j in cols])))


def _public(summary: dict[str, Any]) -> dict[str, Any]:
    """A grounding summary without its per-instance lists (``_``-prefixed, for the intervals)."""
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    total = float(weights.sum())
    return float((values * weights).sum() / total) if total else float("nan")


def _grounding(model: LRCLR, tokenizer: Any, ds: CXRDataset, img: ImageEmbedding,
               zs: ZeroShotClassifier, limit: int | None) -> dict[str, dict[str, Any]]:
    """Pointing game, mIoU and CNR per finding with a mask, for both grounding methods."""
    per: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in GROUNDING_METHODS}
    reference = zs.reference_embedding()
    done = 0
    unread: list[str] = []  # masks that cannot be read: left out, counted, one warning
    for i, row in enumerate(ds.rows):
        for f in row.get("findings", []):
            mask_file = f.get("mask")
            if not mask_file or f["finding"] not in zs.prompts.findings:
                continue
            mask = _read_mask(ds.root / mask_file)
            if isinstance(mask, str):
                unread.append(f"{mask_file}: {mask}")
                continue
            if not mask.any():
                continue
            phrase = zs.prompts.findings[f["finding"]].phrase(
                f["finding"], f.get("side"), f.get("severity"), f.get("zone"))
            with torch.no_grad():
                text = model.encode_text(tokenizer([phrase], split=False))
            box = _letterbox(ds, i, mask.shape)
            truth_box = mask_box(mask)
            maps = {"patch": ground(_one(img, i), text, box),
                    "gradient": ground_gradient(model, ds.image_tensor(i)[None], text,
                                                reference, box)}
            for method, g in maps.items():
                entry = per[method].setdefault(
                    f["finding"], {"pointing": [], "pointing_box": [], "iou": [], "cnr": [],
                                   "chance": [], "chance_box": [], "study": []})
                entry["study"].append(float(i))
                entry["pointing"].append(float(pointing_game(g.heatmap, mask)))
                entry["pointing_box"].append(float(pointing_game_box(g.heatmap, truth_box)))
                entry["chance"].append(float(mask.mean()))
                x0, y0, x1, y1 = truth_box
                entry["chance_box"].append((x1 - x0) * (y1 - y0) / mask.size)
                entry["iou"].append(iou(g.heatmap, mask))
                entry["cnr"].append(cnr(g.heatmap, mask))
            done += 1
        if limit and done >= limit:
            break
    if unread:
        logger.warning("grounding leaves out %d findings whose mask cannot be read: %s%s",
                       len(unread), "; ".join(unread[:10]),
                       f"; and {len(unread) - 10} more" if len(unread) > 10 else "")
    return {method: {**_grounding_summary(found), "skipped_masks": len(unread)}
            for method, found in per.items()}


def _read_mask(path: Path) -> np.ndarray | str:
    """A finding's mask as a 2-D bool array, or why it cannot be read."""
    try:
        with Image.open(path) as im:
            mask = np.asarray(im) > 0
    except FileNotFoundError:
        return "no such file"
    except Image.UnidentifiedImageError:
        return "not an image file"
    except OSError as exc:  # a truncated file, a folder, no permission
        return " ".join(f"unreadable ({exc.strerror or exc})".split())
    if mask.ndim != 2:
        return f"not a single-channel mask (shape {list(mask.shape)})"
    return mask


def _grounding_summary(per: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """``pointing_game``: the peak inside the finding's mask; ``pointing_game_box``: inside the
    mask's bounding box (the protocol of ``methods.md`` and MS-CXR); ``chance_*``: the same for
    a uniformly random point (mean mask / box area)."""
    def mean(key: str, found: dict[str, list[float]] | None = None) -> float | None:
        vals = (found[key] if found is not None
                else [x for v in per.values() for x in v[key]])
        return float(np.mean(vals)) if vals else None

    summary = {k: {"n": len(v["pointing"]), "pointing_game": mean("pointing", v),
                   "pointing_game_box": mean("pointing_box", v),
                   "miou": mean("iou", v), "cnr": mean("cnr", v)}
               for k, v in sorted(per.items())}
    def every(key: str) -> list[float]:
        return [x for v in per.values() for x in v[key]]

    return {"per_finding": summary, "pointing_game": mean("pointing"),
            "pointing_game_box": mean("pointing_box"), "miou": mean("iou"),
            "chance_mask": mean("chance"), "chance_box": mean("chance_box"),
            "instances": sum(len(v["pointing"]) for v in per.values()),
            # per instance, for the bootstrap intervals (left out of the result: _public)
            "_studies": every("study"), "_pointing": every("pointing"),
            "_pointing_box": every("pointing_box")}


def _one(img: ImageEmbedding, i: int) -> ImageEmbedding:
    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[i:i + 1]

    return ImageEmbedding(img.global_embedding[i:i + 1], img.patch_embeddings[i:i + 1],
                          pick(img.region_embeddings), pick(img.region_boxes),
                          pick(img.region_scores), None, img.patch_size)


def _letterbox(ds: CXRDataset, i: int, shape: tuple[int, ...]) -> Any:
    from vlm.data.transforms import Letterbox

    h, w = int(shape[0]), int(shape[1])
    size = ds.preprocess.image_size
    scale = size / max(h, w)
    return Letterbox(h, w, scale, (size - round(w * scale)) // 2, (size - round(h * scale)) // 2,
                     size)


def _ci(interval: list[float] | None) -> str:
    return f" [95% CI {interval[0]:.3f}–{interval[1]:.3f}]" if interval else ""


def markdown_table(result: dict[str, Any]) -> str:
    zs = result["zero_shot"]
    lines = [f"### {result['model']} on the {result['split']} split ({result['studies']} studies)",
             "", "| finding | test positives | zero-shot AUC [95% CI] | pointing game (mask) | "
             "pointing game (box) | mIoU | CNR |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    gr = result["grounding"]["per_finding"]
    for name, v in zs["per_finding"].items():
        g = gr.get(name, {})
        cells = [f"{v['auc']:.3f}{_ci(v.get('auc_ci95')).replace('[95% CI ', '[')}"
                 if v["auc"] is not None else "–"]
        cells += [f"{g[k]:.3f}" if k in g else "–"
                  for k in ("pointing_game", "pointing_game_box", "miou", "cnr")]
        lines.append(f"| {name} | {v['positives']} | " + " | ".join(cells) + " |")
    macro = zs["macro_auc"]
    lines += ["", f"Macro zero-shot AUC over findings with ≥ {zs['min_positives']} positives: "
              f"**{macro:.3f}**{_ci(zs.get('macro_auc_ci95'))}" if macro is not None else "",
              ""]
    r = result["retrieval"]
    lines += ["| retrieval | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
    for key in ("report_to_image", "image_to_report"):
        v = r[key]
        lines.append(f"| {key.replace('_', ' ')} | {v['R@1']:.3f} | {v['R@5']:.3f} | "
                     f"{v['R@10']:.3f} |")
    m = r["label_matched"]
    lines += ["", f"Label-matched report→image: hit@10 {m['hit@10']:.3f}"
              f"{_ci(m.get('hit@10_ci95'))} (random {m['random_hit@10']:.3f}), mAP@10 "
              f"{m['mAP@10']:.3f}{_ci(m.get('mAP@10_ci95'))} (random "
              f"{m['random_mAP@10']:.3f}) over {m['queries']} queries.", ""]
    g = result["grounding"]
    if g["pointing_game"] is not None:
        lines.append(f"Grounding ({g.get('method', 'patch')} method, in the table) over "
                     f"{g['instances']} findings with masks: pointing game "
                     f"{g['pointing_game']:.3f}{_ci(g.get('pointing_game_ci95'))} inside the "
                     f"mask (a random point {g['chance_mask']:.3f}), "
                     f"{g['pointing_game_box']:.3f}{_ci(g.get('pointing_game_box_ci95'))} "
                     f"inside its box (random {g['chance_box']:.3f}); mIoU {g['miou']:.3f}.")
    p = result.get("grounding_patch")
    if p and p["pointing_game"] is not None:
        lines.append(f"Patch-cosine method: pointing game {p['pointing_game']:.3f} (mask), "
                     f"{p['pointing_game_box']:.3f} (box); mIoU {p['miou']:.3f}.")
    if result.get("grounding_skipped_masks"):
        lines.append(f"{result['grounding_skipped_masks']} findings are left out of grounding: "
                     "their mask cannot be read.")
    if result.get("unreadable_images"):
        lines.append(f"{result['unreadable_images']} studies are left out of every score: "
                     "their image cannot be read.")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, result: dict[str, Any], labels: np.ndarray, probs: np.ndarray,
                  findings: list[str], model: LRCLR, tokenizer: Any, ds: CXRDataset,
                  zs: ZeroShotClassifier) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    (out / "eval.md").write_text(markdown_table(result))
    (out / "calibration.json").write_text(json.dumps(zs.calibration, indent=1))
    fig, ax = plt.subplots(figsize=(6, 6))
    for j, name in enumerate(findings):
        if 0 < labels[:, j].sum() < len(labels):
            fpr, tpr, _ = roc_curve(labels[:, j], probs[:, j])
            auc = result["zero_shot"]["per_finding"][name]["auc"]
            ax.plot(fpr, tpr, label=f"{name} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"Zero-shot ROC, {result['model']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    _heatmap_examples(out / "heatmaps.png", model, tokenizer, ds, zs)


def _heatmap_examples(path: Path, model: LRCLR, tokenizer: Any, ds: CXRDataset,
                      zs: ZeroShotClassifier, n: int = 8) -> None:
    import matplotlib.pyplot as plt

    picks = [(i, f) for i, r in enumerate(ds.rows) for f in r.get("findings", [])
             if f.get("mask") and f["finding"] in zs.prompts.findings][:: 7][:n]
    if not picks:
        return
    reference = zs.reference_embedding()
    fig, axes = plt.subplots(2, (len(picks) + 1) // 2, figsize=(3 * ((len(picks) + 1) // 2), 6))
    for ax, (i, f) in zip(np.ravel(axes), picks, strict=False):
        base = np.asarray(ds.images[i], dtype=np.float32) / 255
        phrase = zs.prompts.findings[f["finding"]].phrase(f["finding"], f.get("side"),
                                                          f.get("severity"), f.get("zone"))
        with torch.no_grad():
            text = model.encode_text(tokenizer([phrase], split=False))
        g = ground_gradient(model, ds.image_tensor(i)[None], text, reference)
        ax.imshow(base, cmap="gray")
        ax.imshow(g.heatmap, cmap="jet", alpha=0.35)
        x0, y0, x1, y1 = g.box
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime"))
        ax.plot([g.peak[0]], [g.peak[1]], "+", color="white", ms=10, mew=2)
        ax.set_title(phrase[:32], fontsize=8)
        ax.axis("off")
    for ax in np.ravel(axes)[len(picks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
