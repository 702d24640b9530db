"""What a sharded build costs beside one build: the shard builds' overhead on real images, and
the merge's rate at scale on synthetic rows.

Usage: ``python benchmarks/sharded_build.py [--data data/phantom_cxr] [--limit 768]
[--shards 2] [--rows 200000] [--parts 4]``

Two measurements, each against a reference taken in the same run:

* **real images**: the first ``--limit`` PhantomCXR images in a plain folder, indexed by one
  ``ingest`` (the reference) and by ``build_distributed(..., shards=S, engine="local:S")``:
  S ``radlens index build --shard i/S`` subprocesses on this machine, then the merge. On one
  machine the shards share its cores, so this is the price of sharding (a model load per
  shard, the merge, the thumbnails copied), not a speed-up; on S machines each shard has its
  own. The merged index must hold exactly the single build's images.
* **merge at scale**: ``--parts`` synthetic index folders holding ``--rows`` rows in all
  (512-d unit vectors with catalog rows like an image's), merged into one with
  ``merge_indexes`` (reading, deduplicating and re-adding every row, one generation per part),
  against adding the same vectors and rows straight into one index (the reference: what a
  single build spends in the index, without decoding or encoding).

Prints one JSON object; writes ``benchmarks/out/sharded_build.{json,png}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    SYNTHETIC_DIM,
    have_phantom_cxr,
    plain_folder,
    plot_medians,
    synthetic_index,
    synthetic_rows,
    synthetic_vectors,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
DIM = SYNTHETIC_DIM


def merge_at_scale(work: Path, rows: int, parts: int) -> dict[str, Any]:
    from index.folder import IndexFolder
    from index.merge import merge_indexes

    per = rows // parts
    part_dirs = []
    for p in range(parts):
        part_dirs.append(work / f"part{p}")
        synthetic_index(part_dirs[-1], p * per, per, seed=p)
    # the reference: the same rows added straight into one index, part by part
    ref = work / "direct"
    t = time.perf_counter()
    ix = IndexFolder.create(ref, model_name="synthetic", config_hash="0" * 16, dim=DIM)
    try:
        for p in range(parts):
            x = synthetic_vectors(per, seed=p)
            for at in range(0, per, 8192):
                m = min(8192, per - at)
                ix.add("image", x[at:at + m], synthetic_rows(p * per + at, m))
            ix.save()
    finally:
        ix.close()
    direct_s = time.perf_counter() - t
    t = time.perf_counter()
    report = merge_indexes(part_dirs, work / "merged")
    merge_s = time.perf_counter() - t
    t = time.perf_counter()
    again = merge_indexes(part_dirs, work / "merged")
    rerun_s = time.perf_counter() - t
    merged = IndexFolder.open(work / "merged")
    try:
        count, factory = merged.catalog.count("image"), merged.collection("image").factory
    finally:
        merged.close()
    return {"rows": per * parts, "parts": parts, "dim": DIM,
            "direct_add_s": round(direct_s, 2), "merge_s": round(merge_s, 2),
            "merge_rows_per_s": round(per * parts / merge_s, 1),
            "direct_rows_per_s": round(per * parts / direct_s, 1),
            "merge_vs_direct": round(direct_s / merge_s, 3),
            "rerun_s": round(rerun_s, 2), "rerun_added": again.added.get("image", 0),
            "merged_rows": count, "merged_factory": factory,
            "complete": count == per * parts and report.added.get("image") == per * parts}


def real_images(data: Path, model: str, work: Path, limit: int, shards: int
                ) -> dict[str, Any]:
    from index.distributed import build_distributed
    from index.folder import IndexFolder
    from index.ingest import ingest
    from vlm.inference import Encoder

    folder = work / "archive"
    plain_folder(data, limit, folder)
    t = time.perf_counter()
    single = ingest(Encoder(model), folder, work / "single", progress=False, model_path=model)
    single_s = time.perf_counter() - t  # the model load included, as in each shard
    t = time.perf_counter()
    dist = build_distributed(folder, work / "sharded", shards=shards, work_dir=work / "shards",
                             engine=f"local:{shards}", model=model)
    sharded_s = time.perf_counter() - t
    shard_s = [r["seconds"] for r in dist.shards]

    def hashes(p: Path) -> set[str]:
        ix = IndexFolder.open(p)
        try:
            return ix.catalog.content_hashes("image")
        finally:
            ix.close()

    same = hashes(work / "single") == hashes(work / "sharded")
    return {"images": single.added, "shards": shards,
            "single_s": round(single_s, 2),
            "single_images_per_s": round(single.added / single_s, 2),
            "sharded_s": round(sharded_s, 2),
            "sharded_images_per_s": round(dist.merge["added"].get("image", 0) / sharded_s, 2),
            "shard_build_s": shard_s, "merge_s": dist.merge["seconds"],
            "sharded_vs_single": round(single_s / sharded_s, 3),
            "same_images": same, "unfinished": dist.unfinished}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "phantom_cxr")
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--limit", type=int, default=768)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench_sharded")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import vlm  # noqa: F401  (torchvision CPU shim)

    if not have_phantom_cxr(args.data):
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    (args.work / "scale").mkdir(parents=True)
    real = real_images(args.data, args.model, args.work / "real", args.limit, args.shards)
    scale = merge_at_scale(args.work / "scale", args.rows, args.parts)
    result = {"benchmark": "sharded_build", "cpu_count": os.cpu_count(), "real_images": real,
              "merge_at_scale": scale}
    write_result(args.out, "sharded_build", result)
    plot_medians({"median": {
        "single": {"images/s (real)": real["single_images_per_s"],
                   "rows/s into the index (synthetic)": scale["direct_rows_per_s"]},
        "sharded": {"images/s (real)": real["sharded_images_per_s"],
                    "rows/s into the index (synthetic)": scale["merge_rows_per_s"]}}},
        ("single", "sharded"), ["one build / direct add", f"{args.shards} shards / merge"],
        f"sharded build on one {os.cpu_count()}-core machine", args.out / "sharded_build.png")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0 if real["same_images"] and not real["unfinished"] and scale["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
