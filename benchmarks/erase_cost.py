"""What an erasure (``radlens index remove``) and a check (``radlens index verify``) cost at
archive scale, beside an ordinary removal measured in the same run.

Usage: ``python benchmarks/erase_cost.py [--rows 200000] [--repeats 3]``

An index of ``--rows`` synthetic 512-d rows (catalog rows like an image's, three images per
study; the automatic factory, so IVF + fast-scan PQ above 50k rows) is built once. Then, on a
fresh copy each time, one study is taken out two ways:

* **reference**: an ordinary removal, ``IndexFolder.remove`` + ``save`` (tombstones; the rows'
  bytes stay in free pages and in the previous generation);
* **erasure**: :func:`index.remove.remove_items` (withheld, compacted, securely deleted,
  ``VACUUM``, older generations deleted, unreferenced files swept).

and :func:`index.verify.verify` is timed on the erased index. Medians of ``--repeats`` runs.
Prints one JSON object; writes ``benchmarks/out/erase_cost.{json,png}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import plot_medians, synthetic_index, write_result

OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its JSON and write the JSON and plot under benchmarks/out."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from index.folder import IndexFolder
    from index.remove import remove_items
    from index.verify import verify

    work = Path(tempfile.mkdtemp(prefix="radlens_erase_bench_"))
    try:
        built = work / "built"
        build_s = synthetic_index(built, 0, args.rows, seed=0)
        with IndexFolder.open(built) as ix:
            factory = ix.collection("image").factory
        runs: dict[str, list[float]] = {"remove_and_save_s": [], "erase_s": [], "verify_s": []}
        for r in range(args.repeats):
            study = f"st-{(r * 7919) % (args.rows // 3):020x}"  # three rows each
            plain, erased = work / f"plain{r}", work / f"erased{r}"
            shutil.copytree(built, plain)
            shutil.copytree(built, erased)
            t = time.perf_counter()
            with IndexFolder.open(plain, mode="w") as ix:
                ids = ix.catalog.ids_matching("study", [study])
                ix.remove(ids)
                ix.save()
            runs["remove_and_save_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            report = remove_items(erased, studies=[study])
            runs["erase_s"].append(time.perf_counter() - t)
            assert report.removed == len(ids) == 3, (report, ids)
            t = time.perf_counter()
            checked = verify(erased)
            runs["verify_s"].append(time.perf_counter() - t)
            assert checked["ok"], checked["problems"]
            shutil.rmtree(plain)
            shutil.rmtree(erased)
        median = {k: round(statistics.median(v), 3) for k, v in runs.items()}
        result: dict[str, Any] = {
            "benchmark": "erase_cost", "rows": args.rows, "factory": factory,
            "repeats": args.repeats, "cpu_count": os.cpu_count(),
            "build_s": round(build_s, 1), "runs": {k: [round(x, 3) for x in v]
                                                   for k, v in runs.items()},
            "median": {"reference": {"seconds": median["remove_and_save_s"]},
                       "erase": {"seconds": median["erase_s"]},
                       "verify": {"seconds": median["verify_s"]}},
            "erase_vs_remove": round(median["erase_s"] / median["remove_and_save_s"], 2),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        plot_medians(result, ("reference", "erase", "verify"),
                     ["remove + save (reference)", "index remove (erasure)", "index verify"],
                     f"Erasing one study from {args.rows:,} rows", args.out / "erase_cost.png",
                     keys={"seconds": "seconds (median)"})
        write_result(args.out, "erase_cost", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
