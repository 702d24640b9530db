from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlm.data.lecl_views import (
    lecl_pair,
    lecl_views,
    lesion_crop,
    random_resized_crop,
    slice_boxes,
    window_slice,
)
from vlm.losses import lecl_symmetric
from vlm.models.clear import (
    ClearConfig,
    ClearMIL,
    LeCL,
    LeCLConfig,
    build_mlp,
    is_vit,
    pad_bags,
    positive_class_weights,
    select_slices,
)
from vlm.models.config import VisionConfig
from vlm.models.momentum import cosine_momentum, make_momentum_copy, momentum_update

TINY_VIT = VisionConfig(backend="open_clip", image_size=32, patch_size=8, width=32, layers=1,
                        head_width=16)


@pytest.fixture
def lecl() -> LeCL:
    torch.manual_seed(0)
    return LeCL(LeCLConfig(vision=TINY_VIT, embed_dim=16, mlp_hidden=32, out_dim=8))


# ----------------------------------------------------------------------------- LeCL model

def test_lecl_defaults_and_mlp_depths(lecl):
    cfg = LeCLConfig()
    assert (cfg.mlp_hidden, cfg.out_dim, cfg.momentum, cfg.temperature, cfg.lesion_weight) == (
        4096, 256, 0.99, 1.0, 10.0)
    assert is_vit(TINY_VIT) and is_vit(VisionConfig(backend="timm", timm_model="vit_tiny"))
    assert not is_vit(VisionConfig(backend="timm", timm_model="resnet50"))
    linears = [m for m in lecl.base.projector if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and linears[0].out_features == 32 and linears[-1].out_features == 8
    assert sum(isinstance(m, nn.Linear) for m in lecl.predictor) == 2
    assert isinstance(lecl.base.projector[-1], nn.BatchNorm1d)
    assert not lecl.base.projector[-1].affine
    two = build_mlp(2, 16, 32, 8, last_bn=False)
    assert sum(isinstance(m, nn.Linear) for m in two) == 2 and isinstance(two[-1], nn.Linear)


def test_lecl_forward_loss_and_gradients(lecl):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    out = lecl(x1, x2, momentum=0.99)
    for t in (out.q1, out.q2, out.k1, out.k2):
        assert t.shape == (4, 8)
        assert torch.allclose(t.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not out.k1.requires_grad and not out.k2.requires_grad
    loss = lecl_symmetric(out.q1, out.q2, out.k1, out.k2, torch.tensor([1, 0, 0, 1]).bool())
    loss.backward()
    assert lecl.predictor[0].weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lecl.encoder.parameters())
    assert all(p.grad is None for p in lecl.momentum_base.parameters())


def test_lecl_embed_needs_eval(lecl):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError):
        lecl.embed(x)
    assert lecl.eval().embed(x).shape == (2, 16)


def test_momentum_update_math():
    torch.manual_seed(0)
    online = nn.Linear(3, 2)
    target = make_momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.add_(1.0)
    before = target.weight.clone()
    momentum_update(online, target, 0.9)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight)
    momentum_update(online, target, 1.0)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight)
    momentum_update(online, target, 0.0)
    assert torch.equal(target.weight, online.weight)
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        momentum_update(online, target, 1.5)


# ----------------------------------------------------------------------------- ABMIL

@pytest.fixture
def mil() -> ClearMIL:
    torch.manual_seed(0)
    return ClearMIL(ClearConfig(in_dim=6, hidden_dim=8, attention_dim=8, head_dim=8,
                                n_outputs=3, top_k=3)).eval()


def test_abmil_attention_sums_to_one_and_ignores_padding(mil):
    g = torch.Generator().manual_seed(1)
    x, mask = pad_bags([torch.randn(5, 6, generator=g), torch.randn(2, 6, generator=g)])
    assert x.shape == (2, 5, 6) and mask.sum().item() == 7
    out = mil(x, mask)
    assert out.logits.shape == (2, 3) and out.attention.shape == (2, 5)
    assert torch.allclose(out.attention.sum(1), torch.ones(2))
    assert torch.all(out.attention[~mask] == 0)
    assert out.top_slices.shape == (2, 3)
    assert out.top_slices[1].tolist()[2] == -1 and set(out.top_slices[1, :2].tolist()) == {0, 1}
    x2 = x.clone()
    x2[1, 2:] = 100.0  # padding content must not matter
    assert torch.allclose(mil(x2, mask).logits, out.logits)


def test_abmil_is_invariant_to_slice_order(mil):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 7, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    perm = torch.tensor([6, 3, 0, 5, 1, 4, 2])
    a, b = mil(x, mask), mil(x[:, perm], mask[:, perm])
    assert torch.allclose(a.logits, b.logits, atol=1e-6)
    assert torch.allclose(a.attention[:, perm], b.attention, atol=1e-6)
    assert perm[b.top_slices[0, 0]] == a.top_slices[0, 0]


def test_abmil_heads_and_gradients():
    torch.manual_seed(0)
    cox = ClearMIL(ClearConfig(in_dim=4, hidden_dim=8, attention_dim=8, head_dim=8, task="cox"))
    x = torch.randn(3, 4, 4, requires_grad=True)
    out = cox(x)
    assert out.logits.shape == (3, 1) and out.risk.shape == (3,)
    out.risk.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert cox.attention[0].weight.grad is not None
    with pytest.raises(ValueError):
        cox(x, torch.zeros(3, 4, dtype=torch.bool))


def test_select_slices_keeps_lesions_and_weights():
    g = torch.Generator().manual_seed(0)
    idx = select_slices(100, 10, keep=[3, 97], generator=g)
    assert len(idx) == 10 and {3, 97} <= set(idx.tolist())
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert select_slices(5, 10).tolist() == [0, 1, 2, 3, 4]
    assert len(select_slices(50, 4, keep=range(10), generator=g)) == 4
    w = positive_class_weights(torch.tensor([[1, 0], [0, 0], [1, 0], [0, 1]]))
    assert w.tolist() == [1.0, 3.0]


# ----------------------------------------------------------------------------- views

def test_lesion_pair_views():
    hu = torch.full((40, 48), -1024.0)
    hu[30:34, 5:9] = 100.0  # lesion
    x = window_slice(hu)
    assert x.shape == (3, 40, 48) and float(x.min()) == 0.0 and float(x.max()) <= 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        v1, v2, flag = lecl_pair(x, [[30, 5, 34, 9]], 16, g)
        assert flag and v1.shape == v2.shape == (3, 16, 16)
        assert v1.max() > 0.5  # the lesion is inside the crop
    v2_ref = torch.nn.functional.interpolate(x[None], size=(16, 16), mode="bilinear",
                                             align_corners=False, antialias=True)[0]
    assert torch.allclose(v2, v2_ref)
    crop = lesion_crop(x, [30, 5, 34, 9], 8, g, side_range=(math.sqrt(0.08), math.sqrt(0.08)))
    assert crop.shape == (3, 8, 8)


def test_random_views_and_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 20, 24, generator=g)
    assert random_resized_crop(x, 12, g).shape == (3, 12, 12)
    views = lecl_views([x, x, x], [[], [[2, 2, 6, 6]], []], 12,
                       torch.Generator().manual_seed(5))
    again = lecl_views([x, x, x], [[], [[2, 2, 6, 6]], []], 12,
                       torch.Generator().manual_seed(5))
    assert views.view1.shape == (3, 3, 12, 12) and views.lesion.tolist() == [False, True, False]
    assert torch.equal(views.view1, again.view1) and torch.equal(views.view2, again.view2)
    row = {"slice_boxes": {"4": [[1, 2, 3, 4]]}}
    assert slice_boxes(row, 4) == [[1.0, 2.0, 3.0, 4.0]] and slice_boxes(row, 5) == []


def test_phantom_ct_lesion_slice_views():
    from vlm.data.phantom_ct.generate import manifest_row
    from vlm.data.phantom_ct.geometry import make_grid
    from vlm.data.phantom_ct.render import render_volume

    grid = make_grid((24, 32, 32))
    vol = render_volume(grid, seed=1, index=0)
    row = manifest_row(vol, grid, seed=1, index=0)
    ks = [k for k, flag in enumerate(row["slice_flags"]) if flag]
    assert ks, "phantom has no lesion slice"
    slices = [window_slice(torch.from_numpy(vol.hu[k].astype("float32"))) for k in (ks[0], 0)]
    boxes = [slice_boxes(row, ks[0]), slice_boxes(row, 0)]
    views = lecl_views(slices, boxes, 32, torch.Generator().manual_seed(0))
    assert views.lesion.tolist() == [True, False] and views.view1.shape == (2, 3, 32, 32)
