"""Zero-shot, grounding and evaluation: properties on tiny models and direct computations."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import vlm  # noqa: F401
from tests.tiny_cxr import make_tiny_cxr
from vlm.data.transforms import Letterbox, letterbox
from vlm.errors import ConfigError
from vlm.eval.metrics import average_precision_at_k, label_matched, recall_at_k, roc_auc
from vlm.grounding import (
    cam_stage,
    cnr,
    ground,
    ground_gradient,
    iou,
    mask_box,
    pointing_game,
    pointing_game_box,
)
from vlm.models import create_model, get_tokenizer
from vlm.models.config import load_config
from vlm.models.factory import build_model
from vlm.zeroshot import PromptSet, ZeroShotClassifier, platt


def test_metrics_match_direct_computations():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.3], [0.0, 0.5, 0.4]])
    r = recall_at_k(scores, (1, 2))
    assert r == {"R@1": 1 / 3, "R@2": 2 / 3}
    assert average_precision_at_k(np.array([1, 0, 1, 0]), 10) == pytest.approx((1 + 2 / 3) / 2)
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    sets = [frozenset({"a"}), frozenset(), frozenset({"a"}), frozenset()]
    eye = np.eye(4)
    out = label_matched(eye, sets, sets, k=1, random_rounds=50)
    assert out["hit@1"] == 1.0 and 0.3 < out["random_hit@1"] < 0.7


def test_platt_scaling_recovers_a_logistic_model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(2.0 * x - 0.5)))).astype(float)
    a, b = platt(x, y)
    assert a == pytest.approx(2.0, abs=0.2) and b == pytest.approx(-0.5, abs=0.15)


def test_prompt_sets_are_editable_and_checked(tmp_path):
    prompts = PromptSet.load()
    assert "pleural_effusion" in prompts.findings
    p = prompts.findings["pleural_effusion"]
    assert p.phrase("pleural_effusion", "left", "small") == "small left pleural effusion"
    edited = prompts.with_finding("hernia", ["hiatal hernia"], ["no hernia"])
    path = tmp_path / "p.json"
    path.write_text(edited.to_json())
    assert PromptSet.load(path).findings["hernia"].positive == ["hiatal hernia"]
    with pytest.raises(ConfigError):
        prompts.with_finding("x", [], ["no x"])
    path.write_text(json.dumps({"oops": 1}))
    with pytest.raises(ConfigError):
        PromptSet.load(path)


@pytest.mark.parametrize(("doc", "problem"), [
    ({"normal": "n", "findings": {}}, "'findings' must name at least one finding"),
    ({"normal": "n", "findings": []}, "'findings' must name at least one finding"),
    # a bare string became one prompt per character
    ({"normal": "n", "findings": {"a": {"positive": "effusion"}}},
     "'a': 'positive' must be a non-empty list of non-empty strings"),
    ({"normal": "n", "findings": {"a": {"positive": []}}}, "'a': 'positive' must be"),
    ({"findings": {"a": {"positive": ["x"], "negative": ["", "no x"]}}},
     "'a': 'negative' must be"),
    ({"normal": "n", "findings": {"a": {"positive": ["x", 3]}}}, "'a': 'positive' must be"),
])
def test_prompt_files_that_cannot_classify_are_one_line(tmp_path, doc, problem):
    """An empty 'findings' made eval fail with an internal 'stack expects a non-empty
    TensorList'; a string where a list belongs was split into letters."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        PromptSet.load(path)
    path.write_bytes(b"\xff\xfe not UTF-8 \x80")
    with pytest.raises(ConfigError, match="prompt file"):
        PromptSet.load(path)


def test_normal_study_text_is_the_default_negative_and_the_search_contrast(tmp_path):
    from index.engine import NORMAL_REFERENCE

    prompts = PromptSet.load()
    assert prompts.normal and prompts.normal == NORMAL_REFERENCE
    assert all(p.negative == [prompts.normal] for p in prompts.findings.values())
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"normal": "Normal chest.", "findings": {
        "a": {"positive": ["x"]}, "b": {"positive": ["y"], "negative": ["no y"]}}}))
    loaded = PromptSet.load(path)
    assert loaded.findings["a"].negative == ["Normal chest."]
    assert loaded.findings["b"].negative == ["no y"]
    path.write_text(loaded.to_json())  # round trip keeps the normal text
    assert PromptSet.load(path).normal == "Normal chest."
    path.write_text(json.dumps({"findings": {"a": {"positive": ["x"]}}}))
    with pytest.raises(ConfigError, match="'a' has no 'negative'"):
        PromptSet.load(path)


def test_zero_shot_probabilities_are_softmax_of_the_prompt_pair():
    torch.manual_seed(0)
    model = create_model("lrclr-tiny")
    tok = get_tokenizer("lrclr-tiny")
    zs = ZeroShotClassifier(model, tok)
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, 64, 64))
    probs = zs.probabilities(img)
    assert probs.shape == (3, len(zs.findings)) and ((probs > 0) & (probs < 1)).all()
    # one prompt pair: probability == softmax over the two logits
    single = PromptSet({"x": PromptSet.load().findings["pleural_effusion"].__class__(
        ["left pleural effusion"], ["no pleural effusion"])})
    zs1 = ZeroShotClassifier(model, tok, single)
    logits = zs1.score_phrases(img, ["left pleural effusion", "no pleural effusion"])
    soft = torch.softmax(torch.from_numpy(logits), dim=1)[:, 0].numpy()
    np.testing.assert_allclose(zs1.probabilities(img)[:, 0], soft, rtol=1e-6)


def test_grounding_maps_back_through_the_letterbox():
    torch.manual_seed(0)
    model = create_model("lrclr-tiny")
    tok = get_tokenizer("lrclr-tiny")
    image = torch.rand(120, 80)  # portrait: padded left and right in the 64 px input
    x, box = letterbox(image, 64)
    assert isinstance(box, Letterbox) and box.pad_x > 0 and box.pad_y == 0
    with torch.no_grad():
        img = model.encode_image(((x - 0.5) / 0.25).expand(1, 3, 64, 64))
        text = model.encode_text(tok(["left pleural effusion"], split=False))
    g = ground(img, text, box)
    assert g.heatmap.shape == (120, 80)
    assert g.heatmap.min() >= 0.0 and g.heatmap.max() == pytest.approx(1.0)
    x0, y0, x1, y1 = g.box
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 120
    assert x0 <= g.peak[0] < x1 and y0 <= g.peak[1] < y1
    no_box = ground(img, text)
    assert no_box.heatmap.shape == (64, 64)


def _timm_model(name: str, **kwargs: object):
    cfg = load_config("lrclr-tiny")
    return build_model(cfg.replace(vision=cfg.vision.__class__(
        backend="timm", image_size=64, timm_model=name, timm_kwargs=dict(kwargs)))).eval()


def test_gradient_grounding_reads_the_stage_at_four_times_the_final_resolution():
    cnn = _timm_model("resnet18")
    assert cam_stage(cnn) is cnn.visual.trunk.layer2  # reductions 8 vs 32
    assert cam_stage(cnn, finer=2) is cnn.visual.trunk.layer3
    vit = _timm_model("vit_tiny_patch16_224", depth=2, patch_size=8)
    assert cam_stage(vit) is vit.visual.trunk.blocks[-1].norm1  # tokens entering the last block
    oc = create_model("lrclr-tiny")
    assert cam_stage(oc) is oc.visual.trunk.transformer.resblocks[-1].ln_1


@pytest.mark.parametrize("tower", ["open_clip", "resnet18", "vit"])
def test_gradient_grounding_maps_back_and_leaves_the_model_alone(tower):
    torch.manual_seed(0)
    model = (create_model("lrclr-tiny") if tower == "open_clip" else _timm_model("resnet18")
             if tower == "resnet18" else _timm_model("vit_tiny_patch16_224", depth=2,
                                                      patch_size=8))
    tok = get_tokenizer("lrclr-tiny")
    image = torch.rand(120, 80)
    x, box = letterbox(image, 64)
    x = ((x - 0.5) / 0.25).expand(1, 3, 64, 64)
    with torch.inference_mode():  # as the app encodes texts
        text = model.encode_text(tok(["left pleural effusion"], split=False))
        ref = model.encode_text(tok(["normal chest"], split=False)).global_embedding[0]
        before = model.encode_image(x).global_embedding.clone()
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    g = ground_gradient(model, x, text, ref, box)
    assert g.heatmap.shape == (120, 80) and g.heatmap.max() == pytest.approx(1.0)
    x0, y0, x1, y1 = g.box
    assert x0 <= g.peak[0] < x1 and y0 <= g.peak[1] < y1
    assert g.similarity.shape == ((2, 2) if tower == "resnet18" else (8, 8))
    again = ground_gradient(model, x, text, ref, box)
    np.testing.assert_array_equal(g.heatmap, again.heatmap)  # deterministic
    # the reference changes the map; no reference grounds the phrase alone
    alone = ground_gradient(model, x, text, None, box)
    assert not np.allclose(alone.heatmap, g.heatmap)
    plain = ground_gradient(model, x, text, ref).heatmap
    assert plain.shape == (64, 64)
    assert plain[:4].max() == plain[:, -4:].max() == 0.0  # padding artefacts zeroed
    assert ground_gradient(model, x, text, ref, border=0).heatmap[:4].max() > 0.0
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x).global_embedding, before)
    with pytest.raises(ConfigError, match="eval mode"):
        ground_gradient(model.train(), x, text, ref)
    with pytest.raises(ConfigError, match="one image"):
        ground_gradient(model.eval(), x.expand(2, 3, 64, 64), text, ref)


def test_grounding_metrics():
    heat = np.zeros((10, 10))
    heat[2:4, 2:4] = 1.0
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    assert pointing_game(heat, mask) and not pointing_game(heat, ~mask)
    ring = np.zeros((10, 10), bool)  # a hollow square: its box holds points its mask misses
    ring[1:8, 1] = ring[1:8, 7] = ring[1, 1:8] = ring[7, 1:8] = True
    assert mask_box(ring) == (1, 1, 8, 8)
    assert not pointing_game(heat, ring) and pointing_game_box(heat, mask_box(ring))
    assert not pointing_game_box(heat, (4, 4, 8, 8)) and pointing_game_box(heat, (2, 2, 3, 3))
    assert iou(heat, mask) == pytest.approx(4 / 9)
    assert cnr(heat, mask) == pytest.approx(4 / np.sqrt(20))  # (4/9) / sqrt(4/9 * 5/9)
    assert cnr(np.zeros((10, 10)), mask) == 0.0


@pytest.mark.slow
def test_eval_runs_end_to_end_on_a_tiny_archive(tmp_path):
    from ui.cli import main

    data = make_tiny_cxr(tmp_path / "data", n=30)
    model = create_model("lrclr-tiny")
    from vlm.models import save_checkpoint

    save_checkpoint(model, tmp_path / "ckpt", get_tokenizer("lrclr-tiny"), card="# tiny")
    code = main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(data), "--out",
                 str(tmp_path / "eval"), "--json"])
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["studies"] == 6
    assert set(result["retrieval"]["report_to_image"]) == {"R@1", "R@5", "R@10"}
    assert (tmp_path / "eval" / "roc.png").is_file() and (tmp_path / "eval" / "eval.md").is_file()
    assert result["confidence"]["rounds"] == 1000 and result["confidence"]["unit"] == "study"
    g = result["grounding"]
    assert not any(k.startswith("_") for k in (*g, *result["grounding_patch"]))
    for value, interval in ((g["pointing_game"], g["pointing_game_ci95"]),
                            (g["pointing_game_box"], g["pointing_game_box_ci95"]),
                            (result["retrieval"]["label_matched"]["hit@10"],
                             result["retrieval"]["label_matched"]["hit@10_ci95"])):
        assert interval is None or interval[0] <= value <= interval[1]


def test_weighted_auc_is_the_auc_of_the_resample_it_stands_for():
    from vlm.eval.metrics import roc_auc, weighted_auc

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(5, 60))
        y, score = rng.random(n) < 0.3, rng.integers(0, 6, n).astype(float)  # many ties
        counts = rng.integers(0, 3, n)
        drawn = np.repeat(np.arange(n), counts)
        expect = roc_auc(y[drawn], score[drawn])
        got = weighted_auc(y, score, counts)
        assert (np.isnan(expect) and np.isnan(got)) or got == pytest.approx(expect, abs=1e-12)


def test_bootstrap_intervals_cover_the_truth_and_say_when_undefined():
    from vlm.eval.metrics import bootstrap_ci

    hits = (np.random.default_rng(1).random(400) < 0.3).astype(float)

    def mean(counts):
        return float((hits * counts).sum() / counts.sum())

    lo, hi = bootstrap_ci(mean, len(hits), rounds=500, seed=0)
    assert lo < hits.mean() < hi and lo < 0.3 < hi
    assert 0.06 < hi - lo < 0.12  # about 2 x 1.96 x sqrt(0.21 / 400) = 0.090
    assert bootstrap_ci(mean, len(hits), rounds=500, seed=0) == (lo, hi)  # seeded
    assert bootstrap_ci(mean, 1) is None
    assert bootstrap_ci(lambda c: float("nan"), 50, rounds=20) is None


def test_label_matched_hands_out_its_per_query_scores():
    scores = np.random.default_rng(2).random((6, 6))
    sets = [frozenset(s) for s in (["a"], ["a"], [], [], ["b"], ["c"])]
    per: dict[str, list[float]] = {}
    out = label_matched(scores, sets, sets, k=2, per_query=per)
    assert per["query"] == [float(q) for q in range(6)]  # every set has a match (itself)
    assert np.mean(per["hit"]) == out["hit@2"] and np.mean(per["ap"]) == out["mAP@2"]
