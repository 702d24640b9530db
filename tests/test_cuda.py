"""The CUDA code paths: inference, a mixed-precision training run, ingestion from the CLI.

Skipped without a CUDA GPU (CI has none); run where one is lent, e.g.
``pytest -m gpu tests/test_cuda.py``. Each test compares against the CPU result of the same
weights, so a device bug (a tensor left on the host, a dtype the GPU path changes) fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_cxr import make_tiny_cxr

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny_cxr(tmp_path_factory) -> Path:
    return make_tiny_cxr(tmp_path_factory.mktemp("tiny_cxr"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from vlm.models import create_model, get_tokenizer, save_checkpoint

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_checkpoint(create_model("lrclr-tiny"), folder, get_tokenizer("lrclr-tiny"), card="#")
    return folder


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_encoder_on_cuda_matches_cpu(model_dir, tiny_cxr):
    from vlm.inference import Encoder
    from vlm.io import read_image

    cpu, gpu = Encoder(model_dir), Encoder(model_dir, device="cuda")
    assert next(gpu.model.parameters()).is_cuda and gpu.config_hash == cpu.config_hash
    images = [read_image(p) for p in sorted((tiny_cxr / "dicom").rglob("*.dcm"))[:6]]
    for a, b in zip(cpu.encode_images(images), gpu.encode_images(images), strict=True):
        assert _cos(a.vector, b.vector) > 0.999
        assert a.region_vectors.shape == b.region_vectors.shape
        assert np.isclose(np.linalg.norm(b.vector), 1.0, atol=1e-4)
    texts = ["Opacity in the left lung.", "The lungs are clear."]
    t_cpu, t_gpu = cpu.encode_text(texts), gpu.encode_text(texts)
    assert all(_cos(x, y) > 0.999 for x, y in zip(t_cpu, t_gpu, strict=True))
    p_cpu, p_gpu = cpu.classify(images[0]), gpu.classify(images[0])
    assert p_cpu.keys() == p_gpu.keys()
    assert max(abs(p_cpu[k] - p_gpu[k]) for k in p_cpu) < 1e-2
    for method in ("gradient", "patch"):
        h_cpu = cpu.ground(images[1], ["left lung opacity"], method=method)[0].heatmap
        h_gpu = gpu.ground(images[1], ["left lung opacity"], method=method)[0].heatmap
        assert h_gpu.shape == images[1].pixels.shape[:2]
        assert np.corrcoef(h_cpu.ravel(), h_gpu.ravel())[0, 1] > 0.99, method


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_encoding_on_cuda_is_close_to_cpu_fp32(model_dir, tiny_cxr, amp):
    """``index build --amp`` on a GPU: autocast on the device, unit vectors in float32, and
    the channels-last reordering (measured on the CPU only) left off."""
    from vlm.inference import Encoder
    from vlm.io import read_image

    cpu, gpu = Encoder(model_dir), Encoder(model_dir, device="cuda", amp=amp)
    assert not gpu.model.visual._channels_last
    images = [read_image(p) for p in sorted((tiny_cxr / "dicom").rglob("*.dcm"))[:6]]
    for a, b in zip(cpu.encode_images(images), gpu.encode_images(images), strict=True):
        assert b.vector.dtype == np.float32 and _cos(a.vector, b.vector) > 0.99
        assert np.isclose(np.linalg.norm(b.vector), 1.0, atol=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_on_cuda_with_amp_learns(tiny_cxr, tmp_path, amp):
    from vlm.inference import Encoder
    from vlm.train.loop import TrainConfig
    from vlm.train.lrclr import train_lrclr

    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, warmup_steps=2, save_every=100,
                      progress=False, log_every=1, device="cuda", amp=amp)
    summary = train_lrclr(tiny_cxr, "lrclr-tiny", tmp_path / "run", cfg, workers=1)
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert all(np.isfinite(losses))
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3])
    # the checkpoint written from GPU weights loads and encodes on the CPU
    enc = Encoder(tmp_path / "run" / "best")
    assert enc.device.type == "cpu"
    assert np.isfinite(enc.encode_text(["Opacity in the left lung."])).all()


def _build(model: Path, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from ui.cli import main; sys.exit(main())",
         "index", "build", "--model", str(model), "--source", str(source), "--out", str(out),
         "--no-progress", "--workers", "2", "--batch-size", "8", *extra],
        capture_output=True, text=True, timeout=600, env=dict(os.environ))


def test_index_build_on_cuda_matches_cpu_and_reopens_on_cpu(model_dir, tiny_cxr, tmp_path):
    from index.engine import Engine

    on_gpu = _build(model_dir, tiny_cxr / "dicom", tmp_path / "gpu", "--device", "cuda")
    assert on_gpu.returncode == 0, on_gpu.stderr[-2000:]
    on_cpu = _build(model_dir, tiny_cxr / "dicom", tmp_path / "cpu")
    assert on_cpu.returncode == 0, on_cpu.stderr[-2000:]
    query = sorted((tiny_cxr / "dicom").rglob("*.dcm"))[5]
    # the index filled on the GPU is searched on the CPU with the same weights (same
    # fingerprint), and finds what the CPU-built index finds
    a = Engine.open(tmp_path / "gpu", model=str(model_dir)).search_image(query, k=5)
    b = Engine.open(tmp_path / "cpu", model=str(model_dir)).search_image(query, k=5)
    assert len(a) == len(b) == 5
    assert a[0].id == b[0].id and a[0].score > 0.999
    assert np.allclose([r.score for r in a], [r.score for r in b], atol=2e-3)


def test_eval_on_cuda_matches_cpu(model_dir, tmp_path):
    from vlm.eval.lrclr import evaluate

    data = make_tiny_cxr(tmp_path / "data", n=30)
    cpu = evaluate(model_dir, data)
    gpu = evaluate(model_dir, data, device="cuda")
    assert gpu["studies"] == cpu["studies"] == 6
    for name, v in cpu["zero_shot"]["per_finding"].items():
        if v["auc"] is not None:
            assert gpu["zero_shot"]["per_finding"][name]["auc"] == pytest.approx(v["auc"],
                                                                                abs=0.05)
    assert gpu["retrieval"]["label_matched"]["queries"] == \
        cpu["retrieval"]["label_matched"]["queries"]
    assert gpu["grounding"]["instances"] == cpu["grounding"]["instances"]


@pytest.mark.parametrize("name", ["random:lecl-tiny@0", "random:drasclr-tiny@0"])
def test_volume_encoders_on_cuda_match_cpu(name):
    """CLEAR's slice encoder (LeCL) and DrasCLR on CUDA give the CPU's vector and scores."""
    from vlm.volume_encoder import VolumeEncoder

    z, y, x = np.mgrid[:32, :64, :64].astype(np.float32)
    body = ((y - 32) / 28) ** 2 + ((x - 32) / 30) ** 2 < 1
    lungs = body & (((y - 30) / 14) ** 2 + ((np.abs(x - 32) - 13) / 9) ** 2 < 1)
    hu = np.where(body, 40.0, -1000.0) + np.where(lungs, -890.0, 0.0)
    hu += np.where(((z - 16) ** 2 + (y - 28) ** 2 + (x - 20) ** 2) < 16, 900.0, 0.0)  # a lesion
    hu = hu.astype(np.float32)
    cpu = VolumeEncoder.load(name, device="cpu").encode(hu)
    gpu = VolumeEncoder.load(name, device="cuda").encode(hu)
    assert gpu.vector.dtype == np.float32 and gpu.vector.shape == cpu.vector.shape
    assert _cos(cpu.vector, gpu.vector) > 0.999
    # TF32 convolutions on the GPU: scores agree to a small share of their spread
    np.testing.assert_allclose(gpu.slice_scores, cpu.slice_scores,
                               atol=1e-4 + 0.02 * float(np.ptp(cpu.slice_scores)))
