"""CPU encoding and training with glibc's default malloc settings against RadLens' tuned ones.

Usage: ``python benchmarks/allocator.py [--model checkpoints/lrclr-r18] [--images 512]``

Each setting runs in its own process (malloc settings are per process), twice, alternating
(default, tuned, default, tuned), so that drift of the machine's speed hits both alike:

* **encode**: the model's image tower on seeded random tensors at the model's size, batch 32,
  every core, best of three passes (images/s), with the minor page faults and kernel seconds
  of those passes;
* **train step**: one bf16 LRCLR training step of 32 (as ``benchmarks/train_step.py``), samples/s.

The default setting is the reference, measured in the same run. Prints one JSON object; writes
``benchmarks/out/allocator.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import plot_medians, write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
SETTINGS = ("default", "tuned")


def child(model: str, n: int, batch: int, train_model: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from vlm.allocator import tune_allocator

    tuning = tune_allocator()  # reads RADLENS_MALLOC, set by the parent
    import torch
    from train_step import measure

    from vlm.inference import Encoder

    encoder = Encoder(model)
    pre = encoder.model.config.preprocess
    x = torch.randn(n, pre.channels, pre.image_size, pre.image_size,
                    generator=torch.Generator().manual_seed(0)).to(torch.float16)
    passes = []
    with torch.inference_mode():
        encoder.model.encode_image(x[:batch].float())  # first call: kernel selection
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(3):
            t = time.perf_counter()
            for s in range(0, n, batch):
                encoder.model.encode_image(x[s:s + batch].float())
            passes.append(n / (time.perf_counter() - t))
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    step = measure(train_model, "bf16", batch, steps=6, warmup=2)
    return {"applied": tuning.applied, "reason": tuning.reason,
            "encode_images_per_s": round(max(passes), 2),
            "encode_minor_faults": r1.ru_minflt - r0.ru_minflt,
            "encode_kernel_seconds": round(r1.ru_stime - r0.ru_stime, 2),
            "train_step_samples_per_s": step["samples_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--train-model", default="lrclr-r18", help="config for the training step")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.images, args.batch_size, args.train_model)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            env = {**os.environ, "RADLENS_MALLOC": setting, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(
                [sys.executable, __file__, "--child", setting, "--model", args.model,
                 "--train-model", args.train_model, "--images", str(args.images),
                 "--batch-size", str(args.batch_size)],
                env=env, capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{setting}: {run}", file=sys.stderr, flush=True)
            runs[setting].append(run)

    def med(setting: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[setting]))

    summary = {s: {k: med(s, k) for k in ("encode_images_per_s", "encode_minor_faults",
                                           "encode_kernel_seconds", "train_step_samples_per_s")}
               for s in SETTINGS}
    result = {
        "benchmark": "allocator", "model": Path(args.model).name, "cpu_count": os.cpu_count(),
        "images": args.images, "batch_size": args.batch_size, "runs": runs, "median": summary,
        "encode_speedup": round(summary["tuned"]["encode_images_per_s"]
                                / summary["default"]["encode_images_per_s"], 3),
        "train_step_speedup": round(summary["tuned"]["train_step_samples_per_s"]
                                    / summary["default"]["train_step_samples_per_s"], 3),
        "tuned_applied": all(r["applied"] for r in runs["tuned"]),
    }
    write_result(args.out, "allocator", result)
    plot(result, args.out / "allocator.png")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    plot_medians(result, SETTINGS, ["glibc default", "tuned"],
                 f"malloc settings, {result['model']}, {result['cpu_count']} cores "
                 f"(median of {len(result['runs']['default'])} runs each)", path,
                 {"encode_images_per_s": "encode, images/s",
                  "train_step_samples_per_s": "bf16 train step, samples/s"})


if __name__ == "__main__":
    raise SystemExit(main())
