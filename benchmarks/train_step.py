"""Training-step throughput of an LRCLR config in fp32 and with bf16 autocast, in one run.

Usage: ``python benchmarks/train_step.py [--model lrclr-r18] [--threads 1] [--steps 6]``

One step is what ``radlens train lrclr`` does per batch: image tower forward (a CNN in
channels-last order, as training runs it on the CPU; under
``torch.autocast`` for bf16; weights and optimiser stay fp32), the text side from frozen
pooled states through the trainable projection, the global + local LRCLR loss, backward,
gradient clipping and an AdamW step. Images are random tensors at the model's size and the
reports are fixed sentences, so no data set is needed; the text tower's frozen pass runs once,
outside the timing, as the training cache does. The fp32 step is the reference; the result is
the ratio of samples/s. Whether bf16 pays depends on the CPU (AVX-512 BF16 or AMX: large; none:
it can be slower), which is why this is measured rather than assumed.

Prints one JSON object; writes ``benchmarks/out/train_step.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from _common import write_result

OUT = Path(__file__).resolve().parent / "out"

REPORTS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion.",
    "Small left pleural effusion. Mild cardiomegaly.",
    "Patchy opacity in the right lower lobe, likely atelectasis.",
    "Calcified granuloma in the left upper lobe. No acute abnormality.",
]


def measure(model_name: str, amp: str | None, batch: int, steps: int, warmup: int,
            channels_last: bool = True) -> dict[str, Any]:
    """``channels_last``: a CNN image tower in channels-last order, as ``radlens train lrclr``
    runs it on the CPU."""
    import torch

    from vlm.losses import LRCLRLoss
    from vlm.models import create_model, get_tokenizer
    from vlm.train.lrclr import pool_texts

    torch.manual_seed(0)
    model = create_model(model_name)
    model.visual.use_channels_last(channels_last)
    tokenizer = get_tokenizer(model_name)
    pooled = pool_texts(model, tokenizer, [REPORTS[i % len(REPORTS)] for i in range(batch)])
    model.train()
    loss_fn = LRCLRLoss(model.config.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    pre = model.config.preprocess
    images = torch.randn(batch, pre.channels, pre.image_size, pre.image_size)
    cast = (torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16"
            else contextlib.nullcontext())
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        with cast:
            image = model.encode_image(images)
            text = model.text_from_pooled(*pooled.take(list(range(batch))))
            loss = loss_fn(model, image, text, 0, 1,
                           max_sentences=model.config.text.max_sentences)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"amp": amp or "fp32", "seconds_per_step": round(median, 4),
            "samples_per_s": round(batch / median, 2),
            "final_loss": round(float(loss.detach()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="lrclr-r18")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from vlm.amp import cpu_bf16_flags

    torch.set_num_threads(args.threads)
    runs = [measure(args.model, amp, args.batch_size, args.steps, args.warmup)
            for amp in (None, "bf16")]
    result = {"benchmark": "train_step", "model": args.model, "threads": args.threads,
              "batch_size": args.batch_size, "steps": args.steps,
              "cpu": platform.processor() or platform.machine(), "cpu_bf16_flags": cpu_bf16_flags(),
              "torch": torch.__version__, "runs": runs,
              "bf16_speedup": round(runs[1]["samples_per_s"] / runs[0]["samples_per_s"], 2)}
    write_result(args.out, "train_step", result)


if __name__ == "__main__":
    main()
