"""LRCLR with tiny configs: shapes, norms, eval mode, learning, save/load, mismatch refusal,
open_clip starting point, timm backbone, SentencePiece tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from tests.vlm.models.conftest import REPORTS
from vlm.errors import ConfigError
from vlm.losses import LRCLRLoss
from vlm.models import create_model, get_tokenizer, load_config, save_checkpoint
from vlm.models.config import ModelConfig, config_hash
from vlm.models.factory import build_model
from vlm.models.sources import resolve_source
from vlm.models.tokenizer import ReportTokenizer, SentencePieceBackend, train_sentencepiece


def test_outputs_have_the_documented_shapes_and_unit_norms(tiny_model, batch):
    images, tokens = batch
    assert not tiny_model.training  # factory returns eval mode
    with torch.no_grad():
        img, txt = tiny_model(images, tokens)
    b, e = len(REPORTS), tiny_model.embed_dim
    assert img.global_embedding.shape == (b, e)
    assert img.patch_embeddings.shape == (b, 8, 8, e) and img.grid_size == (8, 8)
    assert img.region_embeddings is not None and img.region_embeddings.shape == (b, 6, e)
    assert img.region_boxes is not None and img.region_boxes.shape == (b, 6, 4)
    boxes = img.region_boxes
    assert (boxes[..., 0] < boxes[..., 2]).all() and (boxes[..., 1] < boxes[..., 3]).all()
    assert boxes.min() >= 0 and boxes.max() <= 64
    for t in (img.global_embedding, img.patch_embeddings, img.region_embeddings,
              txt.global_embedding, txt.sentence_embeddings[txt.sentence_mask]):
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]), rtol=0, atol=1e-4)
    assert txt.sentence_mask.sum(1).tolist() == [3, 2, 3, 2]
    assert img.region_scores is not None and ((img.region_scores > 0) &
                                              (img.region_scores < 1)).all()


def test_eval_mode_is_deterministic(tiny_model, batch):
    images, _tokens = batch
    with torch.no_grad():
        a = tiny_model.encode_image(images).global_embedding
        b = tiny_model.encode_image(images).global_embedding
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("local", [True, False], ids=["lrclr", "plain-clip"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(batch, local):
    images, tokens = batch
    cfg = load_config("lrclr-tiny")
    if not local:
        cfg = cfg.replace(region=cfg.region.__class__(enabled=False),
                          cross_attention=cfg.cross_attention.__class__(enabled=False))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    loss_fn = LRCLRLoss(cfg.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        out = loss_fn(model, *model(images, tokens))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert ("local" in out) == local
    assert losses[-1] < 0.6 * losses[0]


def test_region_scorer_gets_gradients(tiny_model, batch):
    images, tokens = batch
    model = tiny_model.train()
    out = LRCLRLoss(model.config.loss)(model, *model(images, tokens))
    out["loss"].backward()
    grad = model.regions.scorer[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_save_load_gives_identical_outputs_and_mismatch_is_refused(tiny_model, tiny_tokenizer,
                                                                   batch, tmp_path):
    images, tokens = batch
    folder = save_checkpoint(tiny_model, tmp_path / "ckpt", tiny_tokenizer, card="# test")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors",
                                                  "tokenizer", "MODEL_CARD.md"}
    loaded = create_model(folder)
    with torch.no_grad():
        a = tiny_model.encode_image(images)
        b = loaded.encode_image(images)
        ta = tiny_model.encode_text(tokens).global_embedding
        tb = loaded.encode_text(get_tokenizer(folder)(REPORTS)).global_embedding
    torch.testing.assert_close(a.global_embedding, b.global_embedding)
    torch.testing.assert_close(a.region_boxes, b.region_boxes)
    torch.testing.assert_close(ta, tb)
    # the same weights asked for under another architecture are refused
    other = load_config("lrclr-tiny").replace(embed_dim=48)
    with pytest.raises(ConfigError, match="config"):
        from vlm.models.checkpoint import load_state

        load_state(build_model(other), folder)
    # an edited config.json that no longer fits the weights is refused
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["embed_dim"] = 48
    meta["config_hash"] = config_hash(ModelConfig.from_dict(meta["model"]))
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises((ConfigError, RuntimeError)):
        create_model(folder)


def test_unknown_model_and_unknown_fields_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        load_config("no-such-model")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "vision": {"widht": 3}}))
    with pytest.raises(ConfigError, match="widht"):
        load_config(bad)


def test_open_clip_checkpoint_is_a_starting_point(tmp_path, batch):
    """Write a checkpoint in open_clip's own format (CustomTextCLIP with an HF text tower),
    load it as pretrained weights and get open_clip's image embeddings."""
    import open_clip
    from open_clip.model import CustomTextCLIP

    cfg = load_config("lrclr-tiny")
    source = str(resolve_source(cfg.text.source))
    torch.manual_seed(3)
    oc = CustomTextCLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg={"image_size": 64, "patch_size": 8, "width": 32, "layers": 2,
                    "head_width": 16},
        text_cfg={"hf_model_name": source, "hf_model_pretrained": False,
                  "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler"},
    ).eval()
    torch.save(oc.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model = create_model("lrclr-tiny", pretrained=f"local-dir:{tmp_path}")
    images, _ = batch
    with torch.no_grad():
        ours = model.encode_image(images).global_embedding
        theirs = torch.nn.functional.normalize(oc.encode_image(images), dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert open_clip.__version__


def test_timm_backbone_gives_the_same_contract():
    cfg = load_config("lrclr-tiny")
    cfg = cfg.replace(vision=cfg.vision.__class__(
        backend="timm", image_size=64, timm_model="vit_tiny_patch16_224",
        timm_kwargs={"depth": 2, "patch_size": 8}))
    model = build_model(cfg).eval()
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, 64, 64))
    assert img.patch_embeddings.shape == (2, 8, 8, cfg.embed_dim)
    assert img.region_boxes is not None and img.region_boxes.max() <= 64


def test_sentencepiece_tokenizer_trained_on_reports_runs_a_tower(tmp_path):
    texts = REPORTS * 30 + [f"nodule measuring {i} mm in the right lung." for i in range(60)]
    model_file = train_sentencepiece(texts, tmp_path / "spm", vocab_size=120)
    tok = ReportTokenizer(SentencePieceBackend(model_file), context_length=48, max_sentences=4,
                          lowercase=True)
    tokens = tok(REPORTS)
    assert tokens.input_ids.max() < tok.vocab_size
    cfg = load_config("lrclr-tiny")
    cfg = cfg.replace(text=cfg.text.__class__(
        source=cfg.text.source, pretrained=False, tokenizer="sentencepiece",
        tokenizer_path=f"local-dir:{model_file}",
        overrides={**cfg.text.overrides, "vocab_size": tok.vocab_size}))
    model = build_model(cfg).eval()
    with torch.no_grad():
        txt = model.encode_text(tokens)
    assert txt.global_embedding.shape == (len(REPORTS), cfg.embed_dim)
    assert txt.sentence_mask.sum(1).tolist() == [3, 2, 3, 2]


def test_partially_frozen_towers():
    cfg = load_config("lrclr-tiny")
    cfg = cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.__dict__, "freeze_layers": 1}),
                      text=cfg.text.__class__(**{**cfg.text.__dict__, "freeze_layers": 1}))
    model = build_model(cfg)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "visual.trunk.conv1.weight" in frozen
    assert any(n.startswith("visual.trunk.transformer.resblocks.0.") for n in frozen)
    assert not any(n.startswith("visual.trunk.transformer.resblocks.1.") for n in frozen)
    assert "visual.trunk.proj" not in frozen
    assert any("embeddings" in n for n in frozen if n.startswith("text."))
    assert not any(".layer.1." in n for n in frozen)
    assert not any(n.startswith(("regions.", "cross.", "text.proj")) for n in frozen)


def test_exported_checkpoint_is_half_size_and_loads(tiny_model, tiny_tokenizer, batch, tmp_path):
    from vlm.models.checkpoint import export_checkpoint

    images, _ = batch
    src = save_checkpoint(tiny_model, tmp_path / "run", tiny_tokenizer, card="#")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "calibration.json").write_text('{"cardiomegaly": [2.0, -1.0]}')
    dst = export_checkpoint(src, tmp_path / "ship", eval_dir=tmp_path / "eval",
                            note="> Below the floors.", commands=["radlens train lrclr --x 1"])
    assert (dst / "model.safetensors").stat().st_size < 0.6 * (
        src / "model.safetensors").stat().st_size
    card = (dst / "MODEL_CARD.md").read_text()
    assert (dst / "calibration.json").is_file() and "Not for clinical use" in card
    assert card.index("> Below the floors.") < card.index("## Model details")
    assert "## How it was made" in card and "radlens train lrclr --x 1" in card
    shipped = create_model(dst)
    with torch.no_grad():
        a = tiny_model.encode_image(images).global_embedding
        b = shipped.encode_image(images).global_embedding
    torch.testing.assert_close(a, b, atol=5e-3, rtol=0)


def test_batch_embed_norm_separates_near_identical_images(batch):
    """Near-identical inputs (radiographs share most pixels) give near-identical embeddings
    from a random tower; the batch embed norm removes that common mode, and it is part of the
    checkpoint (running statistics) so eval mode is reproducible after save/load."""
    torch.manual_seed(0)
    base = torch.randn(1, 3, 64, 64)
    images = base + 0.02 * torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    plain = create_model("lrclr-tiny")
    normed = build_model(load_config("lrclr-tiny").replace(
        vision=replace(load_config("lrclr-tiny").vision, embed_norm="batch")))
    for m in (plain, normed):
        m.train()

    def mean_cos(m):
        with torch.no_grad():
            g = m.encode_image(images).global_embedding
        s = g @ g.T
        return float((s.sum() - len(g)) / (len(g) ** 2 - len(g)))

    assert mean_cos(plain) > 0.95
    assert mean_cos(normed) < 0.5
    assert normed.image_norm is not None and normed.image_norm.num_batches_tracked > 0
    with pytest.raises(ConfigError, match="embed_norm"):
        build_model(load_config("lrclr-tiny").replace(
            vision=replace(load_config("lrclr-tiny").vision, embed_norm="layer")))


def test_text_standardizer_centres_the_projection_input(tiny_model, tiny_tokenizer):
    tower = tiny_model.text
    report, sents, mask = tower.pool(tiny_tokenizer(REPORTS))
    before = tower.project(report)
    tower.fit_standardizer(report, sents, mask)
    states = torch.cat([report, sents[mask]])
    z = (states - tower.pool_mean) / tower.pool_std
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(z.shape[1]), atol=1e-4, rtol=0)
    assert not torch.allclose(tower.project(report), before)
    assert "text.pool_mean" in tiny_model.state_dict()


def _tiny_cnn_config() -> ModelConfig:
    cfg = load_config("lrclr-tiny")
    return cfg.replace(vision=cfg.vision.__class__(backend="timm", image_size=64,
                                                   timm_model="resnet18"))


def test_channels_last_cnn_gives_the_same_outputs_and_the_same_saved_weights(tiny_tokenizer,
                                                                             tmp_path):
    """``Encoder`` and ``radlens train lrclr`` run a CNN tower channels-last on the CPU (faster
    with oneDNN): the outputs must stay the same up to float rounding, and what is saved or
    fingerprinted must not depend on the memory order."""
    from vlm.inference import model_fingerprint

    torch.manual_seed(0)
    model = build_model(_tiny_cnn_config()).eval()
    assert model.visual.convolutional
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_image(x)
    fingerprint = model_fingerprint(model)
    assert model.visual.use_channels_last()
    conv = next(m for m in model.visual.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model.encode_image(x)
    torch.testing.assert_close(out.global_embedding, ref.global_embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_embeddings, ref.patch_embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.region_boxes, ref.region_boxes)
    assert model_fingerprint(model) == fingerprint
    loaded = create_model(save_checkpoint(model, tmp_path / "ckpt", tiny_tokenizer, card="#"))
    assert not loaded.visual._channels_last  # a loaded model starts in the default order
    with torch.no_grad():
        again = loaded.encode_image(x)
    torch.testing.assert_close(again.global_embedding, ref.global_embedding, atol=1e-5, rtol=0)
    assert model.visual.use_channels_last(False)  # and back
    assert conv.weight.is_contiguous()
    # a ViT has nothing to reorder
    assert not build_model(load_config("lrclr-tiny")).visual.use_channels_last()
