"""Encode throughput of a RadLens model next to the same-size open_clip model without the LRCLR
layers, measured in one run (images/s and reports/s at batch sizes 1 and 32).

    python benchmarks/encode_throughput.py [--model lrclr-r18] [--seconds 10] [--device cuda]

Prints JSON and writes benchmarks/out/encode_throughput[_cudaN].json. Reports are timed from
token ids on the device for both models; ``radlens_reports_with_tokenizer_per_s_*`` adds
RadLens's sentence-aware tokenizer, which runs on the CPU. The reference is open_clip's
CustomTextCLIP with the identical image trunk (ViT config or timm model) and the identical HF
text tower, so the ratio isolates what region selection and sentence pooling cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import device_suffix

import vlm  # noqa: F401  (torchvision CPU shim)
from vlm.inference import check_device
from vlm.models import create_model, get_tokenizer
from vlm.models.sources import resolve_source

REPORT = ("The heart is mildly enlarged. There is a small left pleural effusion with adjacent "
          "atelectasis. No pneumothorax. Degenerative changes of the thoracic spine.")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(fn, items: int, seconds: float) -> float:
    fn()  # warm-up (on a GPU: cuDNN autotuning, lazy kernel loading)
    _sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += items
    _sync()
    return n / (time.perf_counter() - start)


def open_clip_reference(model):
    from open_clip.model import CustomTextCLIP

    cfg = model.config
    v = cfg.vision
    if v.backend == "timm":  # open_clip's TimmModel: same trunk, average pool, linear head
        vision_cfg = {"image_size": v.image_size, "timm_model_name": v.timm_model,
                      "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear"}
    else:
        vision_cfg = {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width,
                      "layers": v.layers, "head_width": v.head_width, "mlp_ratio": v.mlp_ratio}
    return CustomTextCLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=vision_cfg,
        text_cfg={"hf_model_name": str(resolve_source(cfg.text.source)),
                  "hf_model_pretrained": False, "hf_proj_type": cfg.text.proj_type,
                  "hf_pooler_type": "mean_pooler", "context_length": cfg.text.context_length},
    ).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lrclr-r18")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16 (both models)")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                    help="CNN towers of both models in channels-last order (default: on the "
                         "CPU, as RadLens's Encoder runs them)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = check_device(args.device)
    model = create_model(args.model, device=device, precision=args.precision)
    dtype = next(model.parameters()).dtype
    tok = get_tokenizer(args.model)
    ref = open_clip_reference(model).to(device, dtype)
    channels_last = (args.channels_last if args.channels_last is not None
                     else torch.device(device).type == "cpu")
    # both models alike, so that the ratio still isolates the LRCLR layers
    channels_last = channels_last and model.visual.use_channels_last()
    if channels_last:
        ref.visual.to(memory_format=torch.channels_last)
    size = model.config.preprocess.image_size
    out: dict[str, object] = {"model": args.model, "threads": torch.get_num_threads(),
                              "image_size": size, "device": device, "precision": args.precision,
                              "channels_last": channels_last,
                              "gpu": torch.cuda.get_device_name(device)
                              if device.startswith("cuda") else None}
    with torch.inference_mode():
        for b in (1, 32):
            x = torch.randn(b, 3, size, size, device=device, dtype=dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            reports = [REPORT] * b
            tokens = tok(reports)
            ref_tokens = tokens.input_ids[:, : model.config.text.context_length].to(device)
            out[f"radlens_images_per_s_b{b}"] = rate(lambda x=x: model.encode_image(x), b,
                                                     args.seconds)
            out[f"open_clip_images_per_s_b{b}"] = rate(lambda x=x: ref.encode_image(x), b,
                                                       args.seconds)
            # like for like with open_clip: already tokenized, on the device
            out[f"radlens_reports_per_s_b{b}"] = rate(
                lambda t=tokens.to(device): model.encode_text(t), b, args.seconds)
            # what a caller gets: RadLens's sentence-aware tokenizer (CPU) included
            out[f"radlens_reports_with_tokenizer_per_s_b{b}"] = rate(
                lambda r=reports: model.encode_text(tok(r)), b, args.seconds)
            out[f"open_clip_reports_per_s_b{b}"] = rate(
                lambda t=ref_tokens: ref.encode_text(t), b, args.seconds)
    for b in (1, 32):
        for kind in ("images", "reports"):
            ours, theirs = out[f"radlens_{kind}_per_s_b{b}"], out[f"open_clip_{kind}_per_s_b{b}"]
            out[f"ratio_{kind}_b{b}"] = float(ours) / float(theirs)  # type: ignore[arg-type]
    out = {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}
    path = Path(__file__).parent / "out" / f"encode_throughput{device_suffix(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
