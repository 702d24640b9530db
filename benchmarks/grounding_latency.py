"""Latency of phrase grounding per phrase, both read-outs, next to the raw model in one run.

Usage: ``python benchmarks/grounding_latency.py [--model checkpoints/lrclr-r18] [--repeats 5]``

What is timed is :meth:`vlm.inference.Encoder.ground` for one phrase on one 512 px PhantomCXR
radiograph (decoded beforehand): ``gradient`` (one forward and one backward pass, the app's
default) and ``patch`` (one forward pass, patch cosine). The references, measured in the same
run on the same images: the raw model's ``encode_image`` forward on the preprocessed tensor
(no grounding), and the same forward plus backward with ``torch.autograd.grad`` (the floor of
any gradient read-out). Images: a fresh 16-image PhantomCXR sample (synthetic pixels).

Prints one JSON object; writes ``benchmarks/out/grounding_latency.json``.
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
PHRASES = ["small right pleural effusion", "cardiomegaly", "left upper lobe nodule",
           "pulmonary edema"]


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1), "n": len(ms)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "lrclr-r18"))
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    import vlm  # noqa: F401  (torchvision CPU shim)
    from vlm.data.phantom_cxr import generate_phantom_cxr
    from vlm.inference import Encoder
    from vlm.io import read_image

    enc = Encoder(args.model)
    with tempfile.TemporaryDirectory(prefix="radlens-ground-") as tmp:
        generate_phantom_cxr(Path(tmp), n=args.images, size=512, workers=1)
        images = [read_image(p) for p in sorted(Path(tmp).rglob("*.dcm"))][:args.images]
    tensors = [enc.preprocess(im)[0][None] for im in images]
    enc.ground(images[0], PHRASES[:1])  # warm up
    enc.ground(images[0], PHRASES[:1], method="patch")
    times: dict[str, list[float]] = {"gradient": [], "patch": [], "forward": [],
                                     "forward_backward": []}
    for _ in range(args.repeats):
        for image, x in zip(images, tensors, strict=True):
            for phrase in PHRASES:
                for method in ("gradient", "patch"):
                    t = time.perf_counter()
                    enc.ground(image, [phrase], method=method)
                    times[method].append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            with torch.inference_mode():
                enc.model.encode_image(x)
            times["forward"].append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            xg = x.clone().requires_grad_(True)
            out = enc.model.encode_image(xg).global_embedding.sum()
            torch.autograd.grad(out, [xg])
            times["forward_backward"].append((time.perf_counter() - t) * 1e3)
    result: dict[str, Any] = {
        "benchmark": "grounding_latency", "model": enc.name, "images": len(images),
        "image_px": list(images[0].pixels.shape), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ground_gradient_per_phrase": percentiles(times["gradient"]),
        "ground_patch_per_phrase": percentiles(times["patch"]),
        "raw_forward": percentiles(times["forward"]),
        "raw_forward_backward": percentiles(times["forward_backward"]),
    }
    write_result(args.out, "grounding_latency", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
