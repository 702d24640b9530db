"""How a DICOMweb build holds up when every WADO-RS answer waits on a network.

Usage: ``python benchmarks/dicomweb_latency.py [--data data/phantom_cxr] [--limit 768]
[--latency-ms 0,10,25,50,100]``

Serves the first ``--limit`` PhantomCXR images from the test suite's DICOMweb server
(``tests/index/dicomweb_server.py``, threaded, in a process of its own), which holds every
instance answer back by the given latency, as a PACS or a cloud VNA across a hospital network
would. For each latency it
builds an index from the server ``--repeat`` times with ``index.ingest.ingest`` (default plan;
the median rate is kept), and, as the
reference measured in the same run, builds one from a folder of the same files. A build that
hides the latency keeps the folder's rate; one that fetches an instance at a time per decode
process falls to about ``processes / (latency + fetch + decode)``.

Prints one JSON object; writes ``benchmarks/out/dicomweb_latency.{json,png}``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import have_phantom_cxr, plain_folder, write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"


def _serve(archive: Any, urls: Any) -> None:
    from tests.index.dicomweb_server import Server

    with Server(archive) as url:
        urls.put(url)
        threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "phantom_cxr")
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--limit", type=int, default=768)
    ap.add_argument("--latency-ms", default="0,10,25,50,100")
    ap.add_argument("--repeat", type=int, default=3, help="builds per latency (median kept)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench_dicomweb_latency")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import vlm  # noqa: F401  (torchvision CPU shim)
    from index.ingest import ingest
    from tests.index.dicomweb_server import Archive
    from vlm.allocator import tune_allocator
    from vlm.inference import Encoder

    if not have_phantom_cxr(args.data):
        return 2
    tune_allocator()
    shutil.rmtree(args.work, ignore_errors=True)
    folder = args.work / "folder"
    files = plain_folder(args.data, args.limit, folder)
    encoder = Encoder(args.model)
    archive = Archive()
    for f in files:
        archive.add_file(f)

    def build(source: str | Path, out: Path) -> dict[str, Any]:
        t = time.perf_counter()
        report = ingest(encoder, source, out, progress=False, model_path=args.model)
        s = time.perf_counter() - t
        return {"added": report.added, "seconds": round(s, 2),
                "images_per_s": round(report.added / s, 2), "plan": report.plan,
                "schedule": report.schedule, "failed": len(report.failed)}

    folder_run = build(folder, args.work / "idx_folder")
    runs: dict[str, Any] = {}
    ctx = multiprocessing.get_context("fork")  # the archive's bytes are inherited, not sent
    for ms in (float(v) for v in args.latency_ms.split(",")):
        archive.latency_s = ms / 1000.0
        urls = ctx.Queue()
        server = ctx.Process(target=_serve, args=(archive, urls), daemon=True)
        server.start()  # its own process, as a PACS is: it does not share this one's GIL
        try:
            url = urls.get(timeout=60)
            tries = [build(url, args.work / f"idx_{ms:g}ms_{r}") for r in range(args.repeat)]
            rates = sorted(t["images_per_s"] for t in tries)
            runs[f"{ms:g}"] = {**tries[0], "images_per_s": rates[len(rates) // 2],
                               "images_per_s_each": [t["images_per_s"] for t in tries],
                               "failed": sum(t["failed"] for t in tries),
                               "added": min(t["added"] for t in tries)}
        finally:
            server.terminate()
            server.join()
    for run in runs.values():
        run["vs_folder"] = round(run["images_per_s"] / folder_run["images_per_s"], 3)
    result = {"benchmark": "dicomweb_latency", "model": encoder.name,
              "cpu_count": os.cpu_count(), "images": len(files), "folder": folder_run,
              "dicomweb_by_latency_ms": runs}
    write_result(args.out, "dicomweb_latency", result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    lat = [float(k) for k in runs]
    ax.plot(lat, [r["images_per_s"] for r in runs.values()], "o-", color="#2a7",
            label="DICOMweb build")
    ax.axhline(folder_run["images_per_s"], color="#888", ls="--", label="folder build")
    ax.set_xlabel("latency per WADO-RS answer (ms)", fontsize=8)
    ax.set_ylabel("images/s", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "dicomweb_latency.png", dpi=120)
    shutil.rmtree(args.work, ignore_errors=True)
    bad = any(r["failed"] or r["added"] != len(files) for r in runs.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
