"""Ingestion from a DICOMweb server against ingestion of the same files from a folder.

Usage: ``python benchmarks/dicomweb_ingest.py [--data data/phantom_cxr] [--limit 512]``

Starts a real Orthanc with its DICOMweb plugin on this machine (Debian ``orthanc`` and
``orthanc-dicomweb``; ``tests/orthanc.py``), stores the first ``--limit`` PhantomCXR images in
it through its REST API, then, in the same run and with the same encoder:

* **folder**: ``index.ingest.ingest`` over a folder holding the same files (the reference),
* **dicomweb**: the same over ``http://127.0.0.1:PORT/dicom-web`` (QIDO-RS listing, WADO-RS
  fetching in the decode processes),
* **rerun**: the DICOMweb build again, which must add and fetch nothing (instances the index
  holds are skipped by SOP Instance UID before any request),
* **encoder only**: the encoder on already-preprocessed tensors of the same images.

Orthanc shares the machine's cores with the build, as a PACS on the same host would; over a
network the fetch waits on the link instead. Prints one JSON object; writes
``benchmarks/out/dicomweb_ingest.{json,png}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from _common import have_phantom_cxr, plain_folder, plot_medians, write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "phantom_cxr")
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench_dicomweb")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from ingest_throughput import encoder_only

    import vlm  # noqa: F401  (torchvision CPU shim)
    from index.ingest import ingest
    from tests import orthanc
    from vlm.allocator import tune_allocator
    from vlm.inference import Encoder

    if not have_phantom_cxr(args.data):
        return 2
    if not orthanc.available():
        print("Orthanc with the DICOMweb plugin is not installed: apt-get install orthanc "
              "orthanc-dicomweb", file=sys.stderr)
        return 2
    tune_allocator()
    shutil.rmtree(args.work, ignore_errors=True)
    folder = args.work / "folder"
    files = plain_folder(args.data, args.limit, folder)
    encoder = Encoder(args.model)
    ref_before = encoder_only(encoder, files, args.batch_size, len(files))

    def build(source: str | Path, out: Path) -> tuple[Any, float]:
        t = time.perf_counter()
        report = ingest(encoder, source, out, batch_size=args.batch_size, progress=False,
                        model_path=args.model)
        return report, time.perf_counter() - t

    with orthanc.running(args.work / "orthanc") as base:
        t = time.perf_counter()
        orthanc.upload(base, files)
        upload_s = time.perf_counter() - t
        url = f"{base}/dicom-web"
        from_folder, folder_s = build(folder, args.work / "index_folder")
        from_web, web_s = build(url, args.work / "index_web")
        again, rerun_s = build(url, args.work / "index_web")
    ref_after = encoder_only(encoder, files, args.batch_size, len(files))
    ref = max(ref_before, ref_after, key=lambda r: r["images_per_s"])
    folder_rate, web_rate = from_folder.added / folder_s, from_web.added / web_s
    result: dict[str, Any] = {
        "benchmark": "dicomweb_ingest", "model": encoder.name, "cpu_count": os.cpu_count(),
        "images": len(files), "batch_size": args.batch_size,
        "upload_s": round(upload_s, 2),
        "encoder_only_images_per_s": ref["images_per_s"],
        "encoder_only_before_and_after": [ref_before["images_per_s"],
                                          ref_after["images_per_s"]],
        "folder": {"added": from_folder.added, "seconds": round(folder_s, 2),
                   "images_per_s": round(folder_rate, 2), "plan": from_folder.plan,
                   "schedule": from_folder.schedule, "failed": len(from_folder.failed)},
        "dicomweb": {"added": from_web.added, "seconds": round(web_s, 2),
                     "images_per_s": round(web_rate, 2), "plan": from_web.plan,
                     "schedule": from_web.schedule, "failed": len(from_web.failed),
                     "first_result_s": from_web.first_result_s},
        "rerun": {"added": again.added, "already_indexed": again.already_indexed,
                  "seconds": round(rerun_s, 2)},
        "dicomweb_vs_folder": round(web_rate / folder_rate, 3) if folder_rate else None,
        "dicomweb_vs_encoder_only": round(web_rate / ref["images_per_s"], 3),
        "rerun_added_nothing": again.added == 0 and again.already_indexed == len(files),
    }
    write_result(args.out, "dicomweb_ingest", result)
    plot_medians({"median": {k: {"images/s": v} for k, v in (
        ("encoder", ref["images_per_s"]), ("folder", folder_rate), ("dicomweb", web_rate))}},
        ("encoder", "folder", "dicomweb"), ["encoder only", "folder build", "DICOMweb build"],
        f"{len(files)} PhantomCXR images, {encoder.name}, {os.cpu_count()} cores",
        args.out / "dicomweb_ingest.png")
    return 0 if result["rerun_added_nothing"] and not from_web.failed else 1


if __name__ == "__main__":
    sys.exit(main())
