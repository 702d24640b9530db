from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm.data.drasclr_patches import (
    anatomical_lattice,
    augment,
    bbox_frame,
    extract_patches,
    gaussian_noise,
    lattice_grid,
    nearest_neighbours,
    patch_grid,
    preprocess_hu,
    random_affine,
    random_contrast,
)
from vlm.losses import DrasCLRLoss
from vlm.models.drasclr import (
    ConditionalConv3d,
    DrasCLR,
    DrasCLRConfig,
    DrasEncoder,
    LocationQueues,
    location_features,
)

TINY = DrasCLRConfig(convs=((2, 1), (4, 2), (4, 2)), n_experts=3, proj_dim=4,
                     n_locations=3, queue_size=5, patch_size=8)


def test_defaults_are_official():
    cfg = DrasCLRConfig()
    assert sorted(set(cfg.channels)) == [1, 8, 16, 32, 64, 128] and cfg.n_experts == 8
    assert len(cfg.convs) == 13 and np.prod([s for _, s in cfg.convs]) == 32  # 32^3 -> 1^3
    assert cfg.repr_dim == cfg.proj_dim == 128 and cfg.conditional
    assert (cfg.queue_size, cfg.temperature, cfg.beta, cfg.momentum) == (4096, 0.2, 1.0, 0.999)
    assert (cfg.patch_size, cfg.patch_step, cfg.hu_min, cfg.hu_max) == (32, 26, -1024.0, 240.0)
    torch.manual_seed(0)
    out = DrasEncoder(cfg)(torch.randn(2, 1, 32, 32, 32), torch.rand(2, 3) * 2 - 1)
    assert out.representation.shape == (2, 128) and out.embedding.shape == (2, 128)


def test_conditional_conv_identical_experts_is_plain_conv():
    torch.manual_seed(0)
    conv = ConditionalConv3d(2, 3, 3, stride=1, n_experts=4)
    w0, b0 = torch.randn(3, 2, 3, 3, 3), torch.randn(3)
    with torch.no_grad():
        conv.weight.copy_(w0.expand(4, -1, -1, -1, -1, -1))
        conv.bias.copy_(b0)
        conv.routing.weight.zero_()
        conv.routing.bias.fill_(math.log(1 / 3))  # sigmoid = 1/4 -> sum_e r_e = 1
    x, xyz = torch.randn(3, 2, 5, 5, 5), torch.rand(3, 3) * 2 - 1
    assert torch.allclose(conv(x, xyz), F.conv3d(x, w0, b0, padding=1), atol=1e-5)


def test_conditional_conv_matches_per_sample_kernels_and_depends_on_xyz():
    torch.manual_seed(1)
    conv = ConditionalConv3d(2, 3, 3, stride=2, n_experts=4)
    x, xyz = torch.randn(3, 2, 6, 6, 6), torch.rand(3, 3) * 2 - 1
    out = conv(x, xyz)
    r = torch.sigmoid(conv.routing(xyz))
    for b in range(3):
        w = (r[b, :, None, None, None, None, None] * conv.weight).sum(0)
        ref = F.conv3d(x[b: b + 1], w, conv.bias, stride=2, padding=1)
        assert torch.allclose(out[b: b + 1], ref, atol=1e-5)
    same_x = x[:1].expand(2, -1, -1, -1, -1)
    two = conv(same_x, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    assert not torch.allclose(two[0], two[1])  # different experts + different place


def test_encoder_conditional_switch_and_gradients():
    torch.manual_seed(0)
    plain = DrasEncoder(dataclasses.replace(TINY, conditional=False))
    assert all(isinstance(b.conv, nn.Conv3d) for b in plain.blocks)
    enc = DrasEncoder(TINY)
    assert all(isinstance(b.conv, ConditionalConv3d) for b in enc.blocks)
    x, xyz = torch.randn(4, 1, 8, 8, 8), torch.rand(4, 3) * 2 - 1
    out = enc(x, xyz)
    assert out.representation.shape == (4, 4) and out.embedding.shape == (4, 4)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(4), atol=1e-5)
    out.embedding.sum().backward()
    assert enc.blocks[0].conv.routing.weight.grad is not None
    assert plain(x, xyz).representation.shape == (4, 4)


def test_location_queues_are_per_location_and_wrap():
    q = LocationQueues(3, 4, 2, torch.Generator().manual_seed(0))
    before = q.queue.clone()
    keys = torch.arange(12, dtype=torch.float32).view(6, 2)
    q.enqueue(keys[:3], torch.tensor([0, 0, 0]))
    assert torch.equal(q.queue[0, :3], keys[:3]) and torch.equal(q.queue[0, 3], before[0, 3])
    assert torch.equal(q.queue[1:], before[1:]) and q.ptr.tolist() == [3, 0, 0]
    q.enqueue(keys[3:], torch.tensor([0, 0, 2]))  # wraps at location 0
    assert torch.equal(q.queue[0], torch.stack([keys[4], keys[1], keys[2], keys[3]]))
    assert torch.equal(q.queue[2, 0], keys[5]) and torch.equal(q.queue[1], before[1])
    assert q.ptr.tolist() == [1, 0, 1]
    q.enqueue(torch.ones(6, 2), torch.ones(6, dtype=torch.long))  # more than K: last K kept
    assert torch.equal(q.queue[1], torch.ones(4, 2)) and q.ptr[1].item() == 0


def test_location_queues_gather_over_ranks():
    q = LocationQueues(2, 4, 2)
    mine, other = torch.ones(1, 2), 2 * torch.ones(1, 2)
    loc_mine, loc_other = torch.tensor([0]), torch.tensor([1])

    def gather(x):
        return [x, other] if x.dtype == torch.float32 else [x, loc_other]

    q.enqueue(mine, loc_mine, rank=0, world_size=2, gather_fn=gather)
    assert torch.equal(q.queue[0, 0], mine[0]) and torch.equal(q.queue[1, 0], other[0])


def test_drasclr_step_loss_and_momentum():
    torch.manual_seed(0)
    model = DrasCLR(TINY, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    n = 4
    xq, xk = torch.randn(n, 1, 8, 8, 8, generator=g), torch.randn(n, 1, 8, 8, 8, generator=g)
    xnb = torch.randn(n, 2, 1, 8, 8, 8, generator=g)
    xyz, xyz_nb = torch.rand(n, 3, generator=g), torch.rand(n, 2, 3, generator=g)
    loc = torch.tensor([0, 1, 2, 1])
    k_before = next(model.momentum_encoder.parameters()).clone()
    out = model(xq, xk, xyz, xnb, xyz_nb, momentum=0.5)
    assert out.q.shape == (n, 4) and out.q_neighbours.shape == (n, 2, 4)
    assert not out.k.requires_grad
    q_param = next(model.encoder.parameters())
    assert torch.allclose(next(model.momentum_encoder.parameters()),
                          0.5 * k_before + 0.5 * q_param)
    loss = DrasCLRLoss(TINY.temperature, TINY.beta)(out.q, out.k, out.q_neighbours, loc,
                                                     model.queues.queue)
    loss["loss"].backward()
    assert q_param.grad is not None and torch.isfinite(loss["loss"])
    model.queues.enqueue(out.k, loc)
    assert torch.allclose(model.queues.queue[2, 0], out.k[2])
    model.eval()
    patches, centres = torch.randn(5, 1, 8, 8, 8), torch.rand(5, 3)
    feats = model.patch_features(patches, centres, batch_size=2)
    assert feats.shape == (5, 4)
    assert torch.allclose(model.volume_embedding(patches, centres), feats.mean(0), atol=1e-6)
    with pytest.raises(RuntimeError):
        model.train().patch_features(patches, centres)


def test_patch_grid_extraction_and_preprocessing():
    hu = np.full((20, 30, 30), -1024.0, dtype=np.float32)
    hu[2:18, 5:25, 5:25] = 40.0  # "body"
    frame = bbox_frame(hu)
    assert frame["lo"] == [2.0, 5.0, 5.0] and frame["hi"] == [17.0, 24.0, 24.0]
    grid = patch_grid(hu.shape, frame, patch=8, step=6, n_neighbours=2)
    assert grid.location.tolist() == list(range(len(grid)))
    assert len(grid) == grid.coords.shape[0] and grid.neighbours.shape == (len(grid), 2)
    assert np.all(np.abs(grid.coords) <= 1.0)
    d = np.linalg.norm(grid.centres[grid.neighbours[0]] - grid.centres[0], axis=1)
    assert np.allclose(d, 6.0)  # the nearest grid neighbours are one step away
    keep = np.zeros(hu.shape, dtype=bool)
    keep[:10] = True
    part = patch_grid(hu.shape, frame, 8, 6, keep=keep)
    assert 0 < len(part) < len(grid) and set(part.location) <= set(grid.location)
    assert np.allclose(grid.centres[part.location], part.centres)
    x = preprocess_hu(torch.from_numpy(hu))
    assert float(x.min()) == -1.0 and float(preprocess_hu(torch.tensor([240.0, 3000.0])).min()) == 1
    patches = extract_patches(x, grid.centres, 8)
    assert patches.shape == (len(grid), 1, 8, 8, 8)
    k, j, i = np.round(grid.centres[0] - 3.5).astype(int)
    assert torch.equal(patches[0, 0], x[k: k + 8, j: j + 8, i: i + 8])
    edge = extract_patches(x, np.array([[0.0, 0.0, 0.0]]), 8)
    assert float(edge[0, 0, 0, 0, 0]) == -1.0  # outside the volume is filled
    assert nearest_neighbours(np.array([[0.0, 0, 0], [0, 0, 1], [0, 0, 3]]), 1).ravel().tolist() \
        == [1, 0, 1]


def test_augmentations_are_seeded_tensor_functions():
    x = torch.rand(3, 1, 8, 8, 8) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and a.abs().max() <= 1.0
    assert torch.equal(gaussian_noise(x, torch.Generator(), p=0.0), x)
    z = torch.zeros(2, 1, 16, 16, 16)
    noisy = gaussian_noise(z, torch.Generator().manual_seed(0), std_hu=50.0, p=1.0)
    assert noisy.std().item() == pytest.approx(2 * 50 / 1264, rel=0.1)
    assert torch.equal(random_contrast(x, torch.Generator(), p=0.0), x)
    ident = random_affine(x, torch.Generator(), degrees=0.0, scale=0.0, translate=0.0)
    assert torch.allclose(ident, x, atol=1e-5)
    shift = random_affine(x, torch.Generator().manual_seed(0), degrees=0.0, scale=0.0,
                          translate=2.0)
    assert not torch.allclose(shift, x)
    gam = random_contrast(x, torch.Generator().manual_seed(0), p=1.0)
    assert torch.allclose(gam.amin(dim=(1, 2, 3, 4)), x.amin(dim=(1, 2, 3, 4)), atol=1e-6)
    assert torch.allclose(gam.amax(dim=(1, 2, 3, 4)), x.amax(dim=(1, 2, 3, 4)), atol=1e-6)


def test_lattice_grid_is_anatomical():
    lattice = anatomical_lattice((2, 3, 4))
    assert lattice.shape == (24, 3) and np.all(np.abs(lattice) < 1.0)
    small = {"lo": [0.0, 0.0, 0.0], "hi": [9.0, 9.0, 9.0]}
    big = {"lo": [0.0, 0.0, 0.0], "hi": [19.0, 19.0, 19.0]}
    a = lattice_grid((10, 10, 10), small, lattice)
    b = lattice_grid((20, 20, 20), big, lattice)
    assert a.location.tolist() == b.location.tolist() == list(range(24))
    assert np.allclose(a.coords, b.coords) and np.allclose(b.centres, a.centres * 19 / 9)
    cut = lattice_grid((10, 10, 5), small, lattice)  # half the lattice falls outside
    assert 0 < len(cut) < 24 and np.all(cut.centres[:, 2] < 5)
    d = np.linalg.norm(cut.coords[cut.neighbours[0]] - cut.coords[0], axis=1)
    assert np.allclose(d, sorted(d)) and d.max() <= 1.0


def test_phantom_ct_subject_end_to_end():
    from vlm.data.phantom_ct.generate import manifest_row
    from vlm.data.phantom_ct.geometry import make_grid
    from vlm.data.phantom_ct.render import render_volume

    grid_mm = make_grid((24, 32, 32))
    vol = render_volume(grid_mm, seed=1, index=0)
    row = manifest_row(vol, grid_mm, seed=1, index=0)
    lattice = anatomical_lattice((4, 4, 4))
    grid = lattice_grid(vol.hu.shape, row["body_frame"], lattice, keep=vol.lung)
    assert len(grid) > 2 and np.all(np.abs(grid.coords) <= 1.0)
    x = preprocess_hu(torch.from_numpy(vol.hu.astype(np.float32)))
    patches = extract_patches(x, grid.centres, 8)  # (N, 1, 8, 8, 8)
    xyz = torch.from_numpy(grid.coords)
    nb = torch.from_numpy(grid.neighbours)  # (N, 2)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = DrasCLR(dataclasses.replace(TINY, n_locations=len(lattice)), g)
    out = model(augment(patches, g), augment(patches, g), xyz, augment(patches, g)[nb], xyz[nb],
                momentum=0.999)
    loc = torch.from_numpy(grid.location)
    loss = DrasCLRLoss()(out.q, out.k, out.q_neighbours, loc, model.queues.queue)["loss"]
    loss.backward()
    model.queues.enqueue(out.k, loc)
    emb = model.eval().volume_embedding(patches, xyz)
    table, present = location_features(model.patch_features(patches, xyz), loc, len(lattice))
    assert table.shape == (len(lattice), 4) and present.sum().item() == len(grid)
    assert torch.all(table[~present] == 0)
    assert emb.shape == (4,) and torch.isfinite(emb).all() and torch.isfinite(loss)
