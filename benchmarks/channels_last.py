"""A CNN image tower in channels-last memory order against the default order, on the CPU.

Usage: ``python benchmarks/channels_last.py [--model checkpoints/lrclr-r18] [--images 512]``

``vlm.inference.Encoder`` (search, the app, ``radlens index build``, ``radlens eval``) and
``radlens train lrclr`` run a CNN tower channels-last on the CPU
(``VisionTower.use_channels_last``). This measures what that buys, both orders in one run,
alternating (default, channels-last, default, channels-last) so that drift of the machine's
speed hits both alike; the default order is the reference:

* **encode**: the model's image tower on seeded random tensors at the model's size, batch 32
  and batch 1, every core, best of three passes (images/s); and how far the two orders'
  embeddings lie apart (they should differ by float rounding only);
* **train step**: one bf16 LRCLR training step of 32 (as ``benchmarks/train_step.py``),
  samples/s.

Prints one JSON object; writes ``benchmarks/out/channels_last.{json,png}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import plot_medians, write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"
ORDERS = ("default", "channels_last")


def encode_rate(model: Any, x: Any, batch: int) -> float:
    import torch

    passes = []
    with torch.inference_mode():
        model.encode_image(x[:batch])  # first call in this order: kernel selection
        for _ in range(3):
            t = time.perf_counter()
            for s in range(0, len(x), batch):
                model.encode_image(x[s:s + batch])
            passes.append(len(x) / (time.perf_counter() - t))
    return max(passes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--train-model", default="lrclr-r18", help="config for the training step")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--single-images", type=int, default=64, help="images encoded one by one")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch
    from train_step import measure

    from vlm.allocator import tune_allocator
    from vlm.inference import Encoder

    allocator = tune_allocator()  # as every radlens command does
    encoder = Encoder(args.model)
    model = encoder.model
    if not model.visual.convolutional:
        print(f"{args.model}: not a CNN image tower; channels-last changes nothing",
              file=sys.stderr)
        return 2
    pre = model.config.preprocess
    x = torch.randn(args.images, pre.channels, pre.image_size, pre.image_size,
                    generator=torch.Generator().manual_seed(0))
    runs: dict[str, list[dict[str, float]]] = {o: [] for o in ORDERS}
    embeddings: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for order in ORDERS:
            model.visual.use_channels_last(order == "channels_last")
            with torch.inference_mode():
                embeddings[order] = model.encode_image(x[:args.batch_size]).global_embedding
            step = measure(args.train_model, "bf16", args.batch_size, steps=6, warmup=2,
                           channels_last=order == "channels_last")
            runs[order].append({
                f"encode_batch{args.batch_size}_images_per_s":
                    round(encode_rate(model, x, args.batch_size), 2),
                "encode_batch1_images_per_s": round(encode_rate(model, x[:args.single_images],
                                                                1), 2),
                "train_step_bf16_samples_per_s": step["samples_per_s"]})
            print(order, runs[order][-1], file=sys.stderr, flush=True)
    model.visual.use_channels_last()  # back to what Encoder uses
    a, b = embeddings["default"].float(), embeddings["channels_last"].float()
    medians = {o: {k: round(statistics.median(r[k] for r in runs[o]), 2) for k in runs[o][0]}
               for o in ORDERS}
    result = {
        "benchmark": "channels_last", "model": encoder.name, "train_model": args.train_model,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "malloc": allocator.reason, "images": args.images, "batch_size": args.batch_size,
        "runs": runs, "median": medians,
        "speedup": {k: round(medians["channels_last"][k] / medians["default"][k], 3)
                    for k in medians["default"]},
        "embedding_max_abs_difference": float((a - b).abs().max()),
        "embedding_min_cosine": round(float(torch.nn.functional.cosine_similarity(a, b).min()),
                                      8)}
    write_result(args.out, "channels_last", result)
    plot(result, args.out / "channels_last.png")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    plot_medians(result, ORDERS, ["default", "channels-last"],
                 f"{result['model']} on {result['threads']} CPU threads "
                 f"(median of {len(result['runs']['default'])})", path)


if __name__ == "__main__":
    raise SystemExit(main())
