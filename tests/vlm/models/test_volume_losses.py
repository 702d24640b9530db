from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlm.losses import (
    DrasCLRLoss,
    cox_partial_likelihood,
    lecl_loss,
    lecl_symmetric,
    location_infonce,
    moco_v3_loss,
)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _lecl_reference(q, k, lesion, w, t):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = []
    for i in range(q.shape[0]):
        s = [float(q[i] @ k[j]) / t for j in range(k.shape[0])]
        denom = sum(math.exp(v) for v in s)
        denom += sum(math.exp(w * s[j]) for j in range(k.shape[0]) if lesion[j] and j != i)
        losses.append(-(s[i] - math.log(denom)) * 2 * t)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("lesion", [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 1], [1] * 6])
@pytest.mark.parametrize(("w", "t"), [(10.0, 1.0), (3.0, 0.5)])
def test_lecl_matches_per_sample_loop(lesion, w, t):
    q, k = _unit(6, 5, seed=0), _unit(6, 5, seed=1)
    mask = torch.tensor(lesion, dtype=torch.bool)
    got = lecl_loss(q, k, mask, w=w, temperature=t)
    assert got.item() == pytest.approx(_lecl_reference(q, k, lesion, w, t), rel=1e-9)


def test_lecl_w0_is_moco_v3():
    q, k = _unit(5, 4, seed=2), _unit(5, 4, seed=3)
    mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    got = lecl_loss(q, k, mask, w=0.0, temperature=0.7)
    ref = _lecl_reference(q, k, [0] * 5, 0.0, 0.7)  # no extra negatives at all
    assert got.item() == pytest.approx(ref, rel=1e-9)
    assert torch.allclose(got, moco_v3_loss(q, k, temperature=0.7))
    # without lesions in the batch LeCL is MoCo v3 for any w
    assert torch.allclose(lecl_loss(q, k, torch.zeros(5, dtype=torch.bool), w=10.0),
                          moco_v3_loss(q, k))


def _fake_gather(rank: int, world: int, full: list[torch.Tensor]):
    """gather_fn of one rank: returns every rank's shard of whichever full tensor x belongs to."""

    def gather(x: torch.Tensor) -> list[torch.Tensor]:
        for t in full:
            shards = list(t.chunk(world))
            if shards[rank].shape == x.shape and torch.allclose(shards[rank].to(x), x):
                return shards if t.dtype == x.dtype else [s.to(x.dtype) for s in shards]
        raise AssertionError("gathered a tensor the test does not know")

    return gather


@pytest.mark.parametrize("w", [0.0, 10.0])
def test_lecl_two_rank_gather_equals_single_process(w):
    q, k = _unit(8, 4, seed=4), _unit(8, 4, seed=5)
    mask = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    full = lecl_loss(q, k, mask, w=w)
    per_rank = []
    for r in range(2):
        sl = slice(4 * r, 4 * r + 4)
        gather = _fake_gather(r, 2, [k, mask.to(k.dtype)])
        per_rank.append(lecl_loss(q[sl], k[sl], mask[sl], w=w, rank=r, world_size=2,
                                  gather_fn=gather))
    assert torch.allclose(sum(per_rank) / 2, full)


def test_lecl_symmetric_and_gradients():
    q1, q2 = _unit(4, 3, seed=6).requires_grad_(), _unit(4, 3, seed=7).requires_grad_()
    k1, k2 = _unit(4, 3, seed=8), _unit(4, 3, seed=9)
    mask = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    loss = lecl_symmetric(q1, q2, k1, k2, mask)
    assert torch.allclose(loss, lecl_loss(q1, k2, mask) + lecl_loss(q2, k1, mask))
    loss.backward()
    for g in (q1.grad, q2.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def _cox_reference(risk, time, event):
    total, n = 0.0, 0
    for i in range(len(risk)):
        if event[i]:
            denom = sum(math.exp(risk[j]) for j in range(len(risk)) if time[j] >= time[i])
            total += risk[i] - math.log(denom)
            n += 1
    return -total / n


def test_cox_partial_likelihood_breslow_ties():
    risk = [0.3, -1.2, 0.8, 0.1, 2.0, -0.4]
    time = [5.0, 3.0, 5.0, 1.0, 7.0, 3.0]  # ties at 3 and 5
    event = [1, 1, 0, 1, 1, 1]
    r = torch.tensor(risk, dtype=torch.float64, requires_grad=True)
    got = cox_partial_likelihood(r, torch.tensor(time), torch.tensor(event))
    assert got.item() == pytest.approx(_cox_reference(risk, time, event), rel=1e-9)
    got.backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()
    # no events: zero, still differentiable
    r2 = torch.zeros(3, requires_grad=True)
    none = cox_partial_likelihood(r2, torch.ones(3), torch.zeros(3))
    assert none.item() == 0.0
    none.backward()


def test_location_infonce_matches_loop():
    n, d, n_loc, size, t = 6, 4, 3, 5, 0.2
    q, k = _unit(n, d, seed=10), _unit(n, d, seed=11)
    queue = _unit(n_loc, size, d, seed=12)
    loc = torch.tensor([0, 2, 2, 1, 0, 2])
    ref = 0.0
    for i in range(n):
        logits = [float(q[i] @ k[i]) / t] + [float(q[i] @ queue[loc[i], j]) / t
                                             for j in range(size)]
        ref += -(logits[0] - math.log(sum(math.exp(v) for v in logits)))
    got = location_infonce(q, k, loc, queue, temperature=t)
    assert got.item() == pytest.approx(ref / n, rel=1e-9)


def test_drasclr_loss_combines_patch_and_neighbour_terms():
    q = _unit(4, 3, seed=13).requires_grad_()
    k, nb = _unit(4, 3, seed=14), _unit(4, 2, 3, seed=15).requires_grad_()
    queue, loc = _unit(2, 6, 3, seed=16), torch.tensor([0, 1, 1, 0])
    out = DrasCLRLoss(temperature=0.2, beta=0.5)(q, k, nb, loc, queue)
    assert torch.allclose(out["patch"], location_infonce(q, k, loc, queue, 0.2))
    r = F.normalize(nb, dim=-1)  # official logits: sum_r r . k and sum_r r . queue (no re-norm)
    pos = (r * k[:, None]).sum((1, 2)) / 0.2  # (N,)
    neg = torch.stack([r[i].sum(0) @ queue[loc[i]].T for i in range(4)]) / 0.2  # (N, K)
    ref = -(pos - torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1)).mean()
    assert torch.allclose(out["neighbour"], ref)
    assert torch.allclose(out["loss"], out["patch"] + 0.5 * out["neighbour"])
    out["loss"].backward()
    assert q.grad is not None and nb.grad is not None and nb.grad.abs().sum() > 0
    only_patch = DrasCLRLoss(beta=0.0)(q, k, nb, loc, queue)
    assert "neighbour" not in only_patch and torch.allclose(only_patch["loss"], out["patch"])
