from __future__ import annotations

import numpy as np
import pytest
import torch

import vlm  # noqa: F401
from tests.vlm.io.conftest import sample_file
from vlm.errors import ConfigError, ImageReadError
from vlm.inference import Encoder
from vlm.io import ImageData, ImageMeta, read_image
from vlm.models import create_model, get_tokenizer, save_checkpoint


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(create_model("lrclr-tiny"), folder, get_tokenizer("lrclr-tiny"), card="#")
    return Encoder(folder)


def test_encoder_maps_regions_back_to_original_pixels(encoder):
    image = read_image(sample_file("RG1_UNCI.dcm"))  # 1955 x 1841, MONOCHROME1
    (enc,) = encoder.encode_images([image])
    assert enc.vector.shape == (encoder.dim,)
    assert np.linalg.norm(enc.vector) == pytest.approx(1.0, abs=1e-4)
    assert enc.region_vectors.shape == (6, encoder.dim)
    b = enc.region_boxes
    assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all()
    assert b[:, [0, 2]].max() <= 1841 and b[:, [1, 3]].max() <= 1955 and b.min() >= 0


def test_encoder_text_classify_ground(encoder):
    vecs = encoder.encode_text(["small left pleural effusion", "normal chest"])
    assert vecs.shape == (2, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    image = read_image(sample_file("CT_small.dcm"))
    probs = encoder.classify(image)
    assert set(probs) >= {"pleural_effusion", "cardiomegaly"}
    assert all(0.0 < p < 1.0 for p in probs.values())
    (g,) = encoder.ground(image, ["left lung"])
    assert g.heatmap.shape == image.pixels.shape
    (p,) = encoder.ground(image, ["left lung"], method="patch")
    assert p.heatmap.shape == image.pixels.shape
    assert not np.allclose(p.heatmap, g.heatmap)  # two methods, two maps
    assert all(q.grad is None for q in encoder.model.parameters())
    with pytest.raises(ConfigError, match="grounding method"):
        encoder.ground(image, ["left lung"], method="gradcam")


def test_check_device_refuses_what_torch_cannot_run_here(capsys, tmp_path):
    from ui.cli import main
    from vlm.inference import check_device

    assert check_device("cpu") == "cpu"
    for bad in ("gpu", "mps", "cuda:99"):
        with pytest.raises(ConfigError, match=bad.split(":")[0]):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_device("cuda")
    # the CLI says so in one line, before reading the source or touching the output
    code = main(["index", "build", "--model", "nowhere", "--source", str(tmp_path), "--out",
                 str(tmp_path / "never-created"), "--device", "cuda:99"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cuda:99" in err[0]
    assert not (tmp_path / "never-created").exists()
    # the volume encoder takes the same option and the same check
    code = main(["index", "build", "--volume-model", "random:lecl-tiny", "--source",
                 str(tmp_path), "--out", str(tmp_path / "never-created"), "--device", "mps"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "mps" in err[0]
    assert not (tmp_path / "never-created").exists()


def test_loading_the_shipped_model_draws_no_progress_bar(capfd):
    """The pretrained MiniLM text weights load in milliseconds; transformers' "Loading
    weights" bar would land on stderr of every command, --json ones included."""
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    shipped = Path(__file__).resolve().parents[2] / "checkpoints" / "lrclr-r18"
    encoder = Encoder(shipped)
    assert encoder.model.text.loaded_pretrained  # the weights were loaded, not a random tower
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # left as it was for the host application


def test_the_cpu_encoder_runs_a_cnn_tower_channels_last_and_a_vit_as_it_is(encoder):
    from pathlib import Path

    shipped = Encoder(Path(__file__).resolve().parents[2] / "checkpoints" / "lrclr-r18")
    assert shipped.model.visual.convolutional and shipped.model.visual._channels_last
    assert not encoder.model.visual.convolutional  # the tiny ViT
    assert not encoder.model.visual._channels_last


def test_bf16_autocast_encoding_is_close_to_fp32_and_fp16_is_for_gpus(encoder, tmp_path):
    folder = tmp_path / "tiny"
    save_checkpoint(encoder.model, folder, encoder.tokenizer, card="#")
    bf16 = Encoder(folder, amp="bf16")
    assert bf16.config_hash == Encoder(folder).config_hash  # the same model for an index
    image = read_image(sample_file("CT_small.dcm"))
    (a,), (b,) = encoder.encode_images([image]), bf16.encode_images([image])
    assert a.vector.dtype == b.vector.dtype == np.float32
    # unit vectors again in float32 (normalised in bf16 they were off by up to 0.003)
    assert abs(float(np.linalg.norm(b.vector)) - 1.0) < 1e-5
    assert np.allclose(np.linalg.norm(b.region_vectors, axis=1), 1.0, atol=1e-5)
    assert 0.99 < float(a.vector @ b.vector) < 1.0 + 1e-6
    assert not np.array_equal(a.vector, b.vector)  # really encoded another way
    with pytest.raises(ConfigError, match="fp16 autocast is for GPUs"):
        Encoder(folder, amp="fp16")
    with pytest.raises(ConfigError, match="unknown amp 'int8'"):
        Encoder(folder, amp="int8")


@pytest.mark.parametrize(("pixels", "frames", "problem"), [
    (np.zeros((64, 64), np.float32), 1, "blank (every pixel is 0)"),
    (np.full((3, 64, 64), 812.0, np.float32), 3, "blank (every pixel is 812)"),
    (np.full((64, 64), np.nan, np.float32), 1, "blank (no pixel has a finite value)"),
    (np.arange(8 * 40, dtype=np.float32).reshape(8, 40), 1, "too small to read (40x8 pixels"),
    (np.ones((1, 1, 3), np.float32), 1, "too small to read (1x1 pixels"),
])
def test_blank_and_tiny_images_are_refused_not_encoded(encoder, pixels, frames, problem):
    """A zero-filled export or a 1x1 upload encoded to a unit vector like any other, and a
    search by it returned a confident ranking of the archive."""
    colour = pixels.ndim == 3 and frames == 1
    image = ImageData(pixels, ImageMeta("png", frames=frames,
                                        samples_per_pixel=3 if colour else 1))
    assert problem in image.content_problem()
    for call in (lambda: encoder.encode_images([image]), lambda: encoder.classify(image),
                 lambda: encoder.ground(image, ["left lung"]),
                 lambda: encoder.ground(image, ["left lung"], method="patch")):
        with pytest.raises(ImageReadError, match=r"^image: (blank|too small)"):
            call()


def test_images_with_content_pass_whatever_their_layout():
    rng = np.random.default_rng(0)
    one_pixel_apart = np.zeros((64, 64), np.float32)
    one_pixel_apart[10, 13] = 1.0  # outside the sparse sample: the full pass finds it
    for pixels, meta in ((one_pixel_apart, ImageMeta("png")),
                         (rng.random((2, 16, 16), np.float32), ImageMeta("dicom", frames=2)),
                         (rng.random((16, 20, 3), np.float32),
                          ImageMeta("png", samples_per_pixel=3))):
        assert ImageData(pixels, meta).content_problem() is None
