"""PhantomCT generation speed: 100 volumes of 128^3 with all cores into a temporary folder.

Usage: ``python benchmarks/phantom_ct_speed.py [--n 100] [--size 128] [--workers N]``;
prints one JSON object (seconds, volumes_per_s, ...). Target: < 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished workers (shows contention: on an
    idle machine wall * workers is close to this)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from vlm.data.phantom_ct import generate_phantom_ct

    tmp = Path(tempfile.mkdtemp(prefix="phantom_ct_bench_"))
    load_before = os.getloadavg()[0]
    try:
        t0 = time.perf_counter()
        summary = generate_phantom_ct(tmp, n=args.n, shape=(args.size,) * 3, seed=args.seed,
                                      workers=args.workers)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        size_mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "phantom_ct_speed",
        "n_volumes": args.n,
        "shape": [args.size] * 3,
        "workers": summary["workers"],
        "cpu_count": os.cpu_count(),
        "seconds": round(wall, 2),
        "volumes_per_s": round(args.n / wall, 3),
        "seconds_per_volume_per_worker": round(wall * summary["workers"] / args.n, 3),
        "cpu_seconds": round(_cpu_seconds(), 1),
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        "output_mb": round(size_mb, 1),
        "target_seconds": 300,
        "within_target": wall < 300,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
