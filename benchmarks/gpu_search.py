"""faiss-gpu against faiss-cpu through the RadLens index, on the same data in the same run.

Usage: ``python benchmarks/gpu_search.py [--n 1000000] [--dim 512] [--nq 1000]``
(needs faiss-gpu and a CUDA GPU; without one it says so and exits 1).

Same archive-like synthetic vectors, queries, exact ``IndexFlatIP`` reference and code path
as ``benchmarks/index_search.py`` (collection add with training -> save -> open -> search).
Each configuration is built and searched twice: once with ``RADLENS_INDEX_GPU=0`` (faiss-cpu
behaviour on all cores: the reference) and once with the GPU (IVF k-means on the GPU, the
search on a float16 GPU clone; fast-scan PQ and HNSW stay on the CPU, so ``auto`` above 50k
vectors shows only the training change). Reported per configuration and device: build time,
recall@10 against exact search, batched queries/s and one-at-a-time latency.

Prints one JSON object; writes ``benchmarks/out/gpu_search.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import write_result
from index_search import exact_reference, queries_near, run_config, synthetic

OUT = Path(__file__).resolve().parent / "out"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, title in ((axes[0], "batched_qps", "batched queries/s (log)"),
                           (axes[1], "build_s", "build seconds")):
        for j, dev in enumerate(("cpu", "gpu")):
            vals = [result["configs"][n][dev][key] for n in names]
            ax.bar([i + 0.4 * j for i in range(len(names))], vals, 0.4, label=dev)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].axhline(result["exact"]["batched_qps"], ls="--", color="k", lw=0.8,
                    label="exact faiss Flat, CPU")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"faiss-gpu vs faiss-cpu through RadLens, n={result['n']:,} "
                 f"dim={result['dim']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its JSON and write the JSON and plot under benchmarks/out."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--configs", default="flat,ivf_sq8,ivf_flat",
                    help="any of flat, ivf_sq8, ivf_flat, auto")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    from index.factory import nlist_for
    from index.gpu import GPU_ENV, gpu_available

    if not gpu_available():
        print("gpu_search: this faiss build sees no GPU (needs faiss-gpu and CUDA)",
              file=sys.stderr)
        return 1
    x = synthetic(args.n, args.dim)
    q = queries_near(x, args.nq)
    ref = exact_reference(x, q, 10, min(args.single, 50))
    truth = ref.pop("truth")
    nlist = nlist_for(args.n)
    factories = {"flat": "Flat", "ivf_sq8": f"IVF{nlist},SQ8", "ivf_flat": f"IVF{nlist},Flat",
                 "auto": "auto"}
    result: dict[str, Any] = {
        "benchmark": "gpu_search", "n": args.n, "dim": args.dim, "queries": args.nq,
        "nprobe": args.nprobe, "cpu_count": os.cpu_count(), "faiss": faiss.__version__,
        "gpus": faiss.get_num_gpus(), "exact": ref, "configs": {},
    }
    for name in args.configs.split(","):
        row: dict[str, Any] = {}
        for dev in ("cpu", "gpu"):
            if dev == "cpu":
                os.environ[GPU_ENV] = "0"
            else:
                os.environ.pop(GPU_ENV, None)
            t = time.perf_counter()
            cfg = run_config(f"{name}/{dev}", factories[name], x, q, truth, 10, [args.nprobe],
                             args.single)
            p = cfg["points"][0]
            row[dev] = {"factory": cfg["factory"], "build_s": cfg["build_s"],
                        "recall_at_10": p["recall_at_10"], "batched_qps": p["batched_qps"],
                        "p50_ms": p["p50_ms"], "p95_ms": p["p95_ms"],
                        "wall_s": round(time.perf_counter() - t, 1)}
        os.environ.pop(GPU_ENV, None)
        row["gpu_speedup_batched"] = round(row["gpu"]["batched_qps"] / row["cpu"]["batched_qps"],
                                           2)
        result["configs"][name] = row
        args.out.mkdir(parents=True, exist_ok=True)  # written after each configuration
        (args.out / "gpu_search.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.out / "gpu_search.png")
    write_result(args.out, "gpu_search", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
