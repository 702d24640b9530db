"""Volume search quality on PhantomCT: do a volume's nearest neighbours share its lesions?

For each volume model, every PhantomCT volume is encoded exactly as ``radlens index build
--volume-model`` encodes it (:class:`vlm.volume_encoder.VolumeEncoder`). For each label (a
lesion location, or an emphysema class), every volume with the label queries the others
(itself left out, cosine similarity). Reported per label: mean precision@k over those queries
against the base rate (the share of the other volumes with the label, the expected precision
of a random ranking), and a one-sided permutation p-value (labels shuffled over volumes, same
statistic). For a lesion model (``radlens train lesion-seg``), whose encodings carry
per-location findings, the volume-level ROC AUC of each location's score is reported too.

Usage::

    python benchmarks/volume_retrieval.py --data data/phantom_ct \\
        --model lecl=runs/eval-volumes/clear_lecl --model random=random:lecl-small@0 [-k 5]

Prints one JSON object; writes ``benchmarks/out/volume_retrieval.json``. The index's own
acceptance query is "a volume with a liver lesion returns liver-lesion volumes above the base
rate", i.e. the ``liver`` row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"


def neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each volume's k most similar other volumes (cosine)."""
    sim = vectors @ vectors.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def precision_at_k(top: np.ndarray, labels: np.ndarray) -> float:
    """Mean over positive volumes of the share of positives among their neighbours."""
    pos = np.flatnonzero(labels)
    return float(labels[top[pos]].mean()) if len(pos) else float("nan")


def retrieval_table(vectors: np.ndarray, locations: np.ndarray, names: list[str], k: int,
                    permutations: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    n = len(vectors)
    top = neighbours(vectors, k)
    out: dict[str, dict[str, float]] = {}
    for j, name in enumerate(names):
        y = locations[:, j].astype(bool)
        if y.sum() < 2:
            continue
        p = precision_at_k(top, y)
        null = np.array([precision_at_k(top, rng.permutation(y)) for _ in range(permutations)])
        out[name] = {"queries": int(y.sum()), "precision_at_k": round(p, 4),
                     "base_rate": round(float((y.sum() - 1) / (n - 1)), 4),
                     "p_value": round(float((1 + (null >= p).sum()) / (1 + permutations)), 4)}
    return out


def finding_aucs(findings: list[dict[str, float]], locations: np.ndarray, names: list[str]
                 ) -> dict[str, float]:
    """Volume-level ROC AUC of a lesion model's per-location score against the labels (only
    locations with positives and negatives), and their macro mean."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float] = {}
    for j, name in enumerate(names):
        y = locations[:, j].astype(int)
        if 0 < y.sum() < len(y):
            out[name] = round(float(roc_auc_score(y, [f.get(name, 0.0) for f in findings])), 4)
    if out:
        out["macro"] = round(float(np.mean(list(out.values()))), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "phantom_ct")
    ap.add_argument("--model", action="append", required=True,
                    help="NAME=SOURCE (a LeCL/DrasCLR run or checkpoint folder, or random:...)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--splits", default=None, help="comma-separated manifest splits to use")
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import vlm  # noqa: F401  (torchvision CPU shim)
    from vlm.data.ct_dataset import EMPHYSEMA_NAMES, CTDataset
    from vlm.data.phantom_ct.tissues import LOCATION_CLASSES
    from vlm.volume_encoder import VolumeEncoder

    if not (args.data / "manifest.jsonl").is_file():
        print(f"{args.data}: no PhantomCT here; run `radlens data phantom-ct --out {args.data} "
              "--n 300` first", file=sys.stderr)
        return 2
    ds = CTDataset(args.data, args.splits.split(",") if args.splits else None)
    ep = ds.endpoints()
    # lesion locations, then the emphysema classes (diffuse disease) as further label columns
    labels = np.concatenate([ep.locations, np.eye(len(EMPHYSEMA_NAMES))[ep.emphysema_class]], 1)
    names = list(LOCATION_CLASSES) + [f"emphysema_{c}" for c in EMPHYSEMA_NAMES]
    result: dict[str, Any] = {"benchmark": "volume_retrieval", "data": str(args.data),
                              "volumes": len(ds), "k": args.k, "models": {}}
    for spec in args.model:
        name, _, source = spec.partition("=")
        enc = VolumeEncoder.load(source or name)
        t = time.perf_counter()
        encodings = [enc.encode(ds.volume_tensor(i).numpy()) for i in range(len(ds))]
        vectors = np.stack([e.vector for e in encodings])
        seconds = time.perf_counter() - t
        table = retrieval_table(vectors, labels, names, args.k, args.permutations)
        result["models"][name] = {"source": source or name, "encoder": repr(enc),
                                  "seconds_per_volume": round(seconds / len(ds), 3),
                                  "labels": table}
        if all(e.findings for e in encodings):  # a lesion model: its scores as detectors too
            result["models"][name]["finding_auc"] = finding_aucs(
                [e.findings or {} for e in encodings], ep.locations, list(LOCATION_CLASSES))
        print(f"{name}: liver {table.get('liver')}", file=sys.stderr, flush=True)
    write_result(args.out, "volume_retrieval", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
