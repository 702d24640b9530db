"""Server-side latency of the app's text search on a 100,000-image index, next to raw faiss.

Usage: ``python benchmarks/app_search_latency.py [--n 100000] [--model checkpoints/lrclr-r18]``

What is timed is exactly what the app's "Search" button runs on the server
(``ui.handlers.search_text`` then ``ui.handlers.gallery``): encode the query text with the
model, search the index collection, fetch the catalog rows and resolve the thumbnails. The
references, measured in the same run on the same vectors: the raw faiss search of the
collection's own index (the query vector already encoded) and an exact ``IndexFlatIP``.

The index: ``n`` synthetic clustered unit vectors of the model's width (the generator from
``index_search.py``) with one catalog row each (modality, view, year, a thumbnail cycling over
a few real rendered images inside the index folder), built through ``IndexFolder`` and opened
read-only like ``radlens serve`` does. Queries are clinical phrases, each run without and with
a catalog filter (view = PA, year range).

Prints one JSON object; writes ``benchmarks/out/app_search_latency.{json,png}``. Target:
p95 < 300 ms on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
TARGET_P95_MS = 300.0
PHRASES = [
    "large right pleural effusion", "small left pleural effusion", "cardiomegaly",
    "the heart is enlarged", "no acute cardiopulmonary abnormality", "left lower lobe opacity",
    "right upper lobe nodule", "calcified granuloma", "pulmonary edema", "emphysema",
    "right pneumothorax", "thoracic scoliosis", "sternotomy wires", "bibasilar atelectasis",
    "rib fracture", "hyperinflated lungs", "vascular congestion", "lung mass",
    "blunting of the costophrenic angle", "normal chest",
]


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2),
            "p95_ms": round(float(np.percentile(a, 95)), 2),
            "mean_ms": round(float(a.mean()), 2), "n": len(ms)}


def build_index(path: Path, model_path: str, n: int, seed: int = 0) -> tuple[Any, np.ndarray]:
    """A read-only-openable index of ``n`` rows at ``path`` for the model at ``model_path``."""
    from index_search import synthetic
    from PIL import Image
    from pydicom.data import get_testdata_file

    from index.folder import IndexFolder
    from vlm.inference import Encoder
    from vlm.io import read_image, render

    enc = Encoder(model_path)
    x = synthetic(n, enc.dim, seed=seed)
    ix = IndexFolder.create(path, model_name=enc.name, config_hash=enc.config_hash,
                            dim=enc.dim, preprocessing={"model_path": model_path})
    (path / "thumbs").mkdir()
    names = []
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "JPEG2000.dcm"]):
        src = get_testdata_file(name)
        thumb = Image.fromarray(render(read_image(src)))
        thumb.thumbnail((256, 256))
        thumb.save(path / f"thumbs/{i}.png")
        names.append(f"thumbs/{i}.png")
    rng = np.random.default_rng(seed)
    views = np.array(["PA", "AP", "LATERAL"])
    rows = [{"modality": "CR", "view": str(views[rng.integers(0, 3)]),
             "year": int(2005 + rng.integers(0, 20)), "rows": 512, "cols": 512,
             "thumbnail": names[i % len(names)], "study": f"st-{i // 2:08d}",
             "content_hash": f"{i:064x}"} for i in range(n)]
    chunk = 20_000
    for s in range(0, n, chunk):
        ix.add("image", x[s:s + chunk], rows[s:s + chunk])
    ix.save()
    ix.close()
    return enc, x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--repeats", type=int, default=10, help="passes over the phrase list")
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import faiss

    import vlm  # noqa: F401  (torchvision CPU shim)
    from index.engine import Engine
    from index.folder import IndexFolder
    from ui import handlers as h

    with tempfile.TemporaryDirectory(prefix="radlens-latency-") as tmp:
        folder = Path(tmp) / "index"
        t0 = time.perf_counter()
        enc, x = build_index(folder, args.model, args.n)
        build_s = time.perf_counter() - t0
        engine = Engine(enc, IndexFolder.open(folder))
        coll = engine.index.collection("image", create=False)
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        queries = [(p, f) for p in PHRASES for f in (False, True)]
        for p, f in queries[:4]:  # warm up: model, faiss, catalog, page cache
            h.gallery(engine, h.search_text(engine, p, args.k, None, "PA" if f else None,
                                            2010 if f else None, 2020 if f else None))
        app_all, app_plain, app_filtered, encode_ms = [], [], [], []
        qvecs = []
        for _ in range(args.repeats):
            for phrase, filtered in queries:
                t = time.perf_counter()
                found = h.search_text(engine, phrase, args.k, None, "PA" if filtered else None,
                                      2010 if filtered else None, 2020 if filtered else None)
                items = h.gallery(engine, found)
                ms = (time.perf_counter() - t) * 1e3
                assert len(items) == min(args.k, len(found)) and found
                app_all.append(ms)
                (app_filtered if filtered else app_plain).append(ms)
        for phrase in PHRASES:
            t = time.perf_counter()
            v = enc.encode_text([phrase])[0]
            encode_ms.append((time.perf_counter() - t) * 1e3)
            qvecs.append(v)
        q = np.asarray(qvecs, np.float32)
        raw_ms, exact_ms = [], []
        for _ in range(args.repeats * 2):
            for v in q:
                t = time.perf_counter()
                coll.search(v[None], args.k)
                raw_ms.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                flat.search(v[None], args.k)
                exact_ms.append((time.perf_counter() - t) * 1e3)
        result: dict[str, Any] = {
            "benchmark": "app_search_latency", "n": args.n, "dim": int(x.shape[1]),
            "k": args.k, "model": enc.name, "cpu_count": os.cpu_count(),
            "index_factory": engine.index.info().get("collections", {}).get("image"),
            "index_build_s": round(build_s, 1),
            "app_search": percentiles(app_all), "app_search_unfiltered": percentiles(app_plain),
            "app_search_filtered": percentiles(app_filtered),
            "text_encode": percentiles(encode_ms),
            "raw_faiss_collection": percentiles(raw_ms),
            "raw_faiss_exact_flat": percentiles(exact_ms),
            "target_p95_ms": TARGET_P95_MS,
        }
        result["target_met"] = result["app_search"]["p95_ms"] < TARGET_P95_MS
        engine.index.close()
    write_result(args.out, "app_search_latency", result)
    plot(result, app_all, raw_ms, exact_ms, args.out / "app_search_latency.png")
    return 0


def plot(result: dict[str, Any], app: list[float], raw: list[float], exact: list[float],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot([app, raw, exact], whis=(5, 95), showfliers=False)
    ax.set_xticks([1, 2, 3], ["app text search", "faiss (collection)", "faiss exact flat"])
    ax.set_yscale("log")
    ax.set_ylabel("ms per query")
    ax.axhline(TARGET_P95_MS, color="r", ls="--", lw=1, label="p95 target")
    ax.set_title(f"Text search on {result['n']:,} images ({result['cpu_count']} cores)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
