"""Benchmark: generate all PhantomCXR studies (3,955 IU reports) at 512 px on every core.

Usage: ``python benchmarks/phantom_cxr_speed.py [--size 512] [--workers N] [--keep DIR]``.
Prints one JSON object (seconds, studies/s, rendered, skipped, contrast stats per finding).
Target: under 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm.data.manifest import read_jsonl
from vlm.data.phantom_cxr import generate_phantom_cxr, make_contact_sheet

logger = logging.getLogger("phantom_cxr_speed")


def _contrast_stats(out: Path) -> dict[str, dict[str, float]]:
    values: dict[str, list[float]] = {}
    for row in read_jsonl(out / "manifest.jsonl"):
        for f in row["findings"]:
            values.setdefault(f["finding"], []).append(f["contrast"])
    return {name: {"n": len(v), "min": min(v), "median": statistics.median(v), "max": max(v)}
            for name, v in sorted(values.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep the output")
    parser.add_argument("--contact-sheet", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        summary = generate_phantom_cxr(out, size=args.size, seed=args.seed,
                                       workers=args.workers)
        result = {
            "seconds": summary["seconds"], "studies_per_s": summary["images_per_s"],
            "rendered": summary["rendered"], "skipped": summary["skipped"],
            "skipped_by_reason": summary["skipped_by_reason"], "size": args.size,
            "workers": summary["workers"], "cpu_count": os.cpu_count(),
            "contrast": _contrast_stats(out),
        }
        if args.contact_sheet is not None:
            make_contact_sheet(out, args.contact_sheet)
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
