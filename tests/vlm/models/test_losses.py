"""Losses against direct computations; the distributed path simulated with two ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlm  # noqa: F401
from vlm.losses import ClipLoss, LRCLRLoss, gather_features
from vlm.models.config import CrossAttentionConfig
from vlm.models.regions import RegionSentenceAttention, candidate_windows


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_loss_matches_the_formula():
    img, txt = _unit(5, 8, seed=1), _unit(5, 8, seed=2)
    scale = torch.tensor(math.log(1 / 0.07))
    loss = ClipLoss()(img, txt, scale)
    logits = img @ txt.T / 0.07
    manual = 0
    for i in range(5):
        manual += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    torch.testing.assert_close(loss, manual / 10, rtol=1e-5, atol=1e-6)


def test_two_ranks_average_to_the_single_process_loss():
    img, txt = _unit(6, 8, seed=3), _unit(6, 8, seed=4)
    scale = torch.tensor(2.0)
    full = ClipLoss()(img, txt, scale)
    per_rank = []
    for rank in range(2):
        mine = slice(rank * 3, rank * 3 + 3)

        def gather(x, rank=rank, mine=mine):
            """A fake all_gather: the other rank's shard arrives without gradient."""
            source = img if torch.equal(x, img[mine]) else txt
            shards = list(source.detach().chunk(2))
            shards[rank] = x
            return shards

        per_rank.append(ClipLoss()(img[mine], txt[mine], scale, rank=rank, world_size=2,
                                   gather_fn=gather))
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, full, rtol=1e-5, atol=1e-6)


def test_gather_keeps_the_local_gradient():
    x = torch.randn(2, 3, requires_grad=True)
    out = gather_features(x, rank=1, world_size=2, gather_fn=lambda t: [t.detach() * 0, t.detach()])
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 3))
    with pytest.raises(RuntimeError):
        gather_features(x, 0, 3, gather_fn=lambda t: [t])


def test_parameter_free_matching_score_is_gloria_aggregation():
    cfg = CrossAttentionConfig(learnable=False, attention_temperature=4.0, aggregation=5.0)
    attn = RegionSentenceAttention(8, cfg)
    sents, regions = _unit(2, 3, 8, seed=5), _unit(4, 5, 8, seed=6)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    scores = attn.match(sents, mask, regions)
    assert scores.shape == (2, 4)
    for t in range(2):
        for i in range(4):
            terms = []
            for s in range(3):
                if not mask[t, s]:
                    continue
                a = torch.softmax(4.0 * regions[i] @ sents[t, s], 0)
                ctx = (a[:, None] * regions[i]).sum(0)
                terms.append(5.0 * F.cosine_similarity(sents[t, s], ctx, dim=0))
            expected = torch.logsumexp(torch.stack(terms), 0) / 5.0
            torch.testing.assert_close(scores[t, i], expected, rtol=1e-5, atol=1e-6)


def test_candidate_windows_cover_the_grid():
    shapes, boxes = candidate_windows(8, 8, (1, 2, 4))
    assert shapes == [(8, 8), (7, 7), (3, 3)]
    assert boxes.shape == (64 + 49 + 9, 4)
    assert boxes[:, 2].max() == 8 and boxes[:, 3].max() == 8 and boxes.min() == 0
    side = boxes[:, 2] - boxes[:, 0]
    assert set(side.tolist()) == {1.0, 2.0, 4.0}


def test_lrclr_loss_reports_its_parts(tiny_model, batch):
    images, tokens = batch
    out = LRCLRLoss(tiny_model.config.loss)(tiny_model, *tiny_model(images, tokens))
    assert set(out) == {"global", "local", "loss"}
    torch.testing.assert_close(out["loss"], out["global"] + out["local"])
