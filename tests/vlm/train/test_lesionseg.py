"""The supervised lesion segmenter: shapes, inference on any size, profile vectors, training on
tiny PhantomCT, the volume encoder built on it, and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vlm  # noqa: F401  (torchvision shim before open_clip/timm)
from vlm.data.ct_dataset import CTDataset
from vlm.data.phantom_ct import generate_phantom_ct
from vlm.errors import ConfigError
from vlm.models.lesionseg import (
    LesionSeg3D,
    LesionSegConfig,
    coordinate_channels,
    model_input,
    predict,
    profile_vector,
    slice_scores,
    volume_scores,
)
from vlm.train import lesionseg as ls
from vlm.volume_encoder import SCORE_LESION, VolumeEncoder, export_volume_model

N, SHAPE = 12, (32, 32, 32)
TINY = LesionSegConfig(width=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> CTDataset:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pct_lesion")
    generate_phantom_ct(root, n=N, shape=SHAPE, seed=5, workers=1)
    return CTDataset(root)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lesion_run")
    train = ls.default_train_config(epochs=2, val_every=4, save_every=4)
    # val = the val and test volumes, so the monitored AUC exists on this tiny set
    val = [i for i, r in enumerate(data.rows) if r["split"] != "train"]
    summary = ls.train_lesionseg(data, out, TINY, train, val_volumes=val, samples_per_epoch=16)
    return out, summary


def _hu(shape, seed=0):
    """Air around a noisy soft-tissue block (a body for the coordinate frame)."""
    hu = np.full(shape, -1000.0, np.float32)
    _z, y, x = shape
    block = hu[:, y // 4: 3 * y // 4, x // 4: 3 * x // 4]
    block[...] = 40.0 + np.random.default_rng(seed).normal(0.0, 10.0, block.shape)
    return hu


def test_forward_shapes_and_refusals():
    torch.manual_seed(0)
    model = LesionSeg3D(TINY).eval()
    x = torch.rand(2, TINY.in_channels, 16, 24, 32)
    assert model(x).shape == (2, 8, 8, 12, 16)
    with pytest.raises(ConfigError, match="multiples of 4"):
        model(torch.rand(1, TINY.in_channels, 18, 24, 32))
    with pytest.raises(ConfigError, match="expects"):
        model(torch.rand(1, 3, 16, 16, 16))


def test_inputs_windows_and_coordinates():
    frame = {"lo": [0.0, 2.0, 4.0], "hi": [10.0, 12.0, 14.0]}
    c = coordinate_channels((11, 3, 3), frame, offset=(0, 2, 4))
    assert c.shape == (3, 11, 3, 3)
    assert c[0, 0, 0, 0] == -1.0 and c[0, 10, 0, 0] == 1.0 and c[1, 0, 0, 0] == -1.0
    assert torch.allclose(c[2, 0, 0], torch.tensor([-1.0, -0.8, -0.6]))
    hu = torch.tensor([[[-1000.0, -160.0, 40.0, 240.0, 1000.0]]])
    x = model_input(hu, LesionSegConfig(coords=False), frame)
    assert torch.allclose(x[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert x.shape == (2, 1, 1, 5) and float(x[1].min()) == 0.0


def test_predict_pads_any_size_and_chunks_consistently():
    torch.manual_seed(0)
    model = LesionSeg3D(TINY).eval()
    hu = _hu((37, 30, 27))
    prob = predict(model, hu)
    assert prob.shape == (8, 19, 15, 14)
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    chunked = predict(model, hu, chunk=8, margin=16)
    assert chunked.shape == prob.shape
    # chunks see 16 slices of context; the receptive field is wider, so agreement is close,
    # not exact -- a misplaced chunk would differ by far more
    assert float((chunked - prob).abs().max()) < 0.05
    assert not model.training
    with pytest.raises(ConfigError, match="CT volume in HU"):
        predict(model, np.full((8, 8, 8), -1000.0, np.float32))


def test_volume_and_slice_scores_and_profile():
    prob = torch.zeros(8, 4, 5, 5)
    prob[3, 1, :2, :2] = torch.tensor([[0.9, 0.7], [0.5, 0.3]])  # liver channel
    s = volume_scores(prob, top_k=2)
    assert s[3] == pytest.approx(0.8) and s[0] == 0.0
    per_slice = slice_scores(prob, n_slices=7)
    assert per_slice.tolist() == pytest.approx([0, 0, 0.9, 0.9, 0, 0, 0])
    liver = profile_vector(s)
    none = profile_vector(np.zeros(8))
    assert np.linalg.norm(liver) == pytest.approx(1.0) and none[-1] == pytest.approx(1.0)
    assert float(liver @ none) < 0.3  # lesion-free volumes are far from a liver-lesion query
    both = profile_vector(np.array([0, 0, 0, 0.8, 0, 0.8, 0, 0], np.float32))
    assert float(liver @ both) > float(liver @ none)


def test_location_masks_follow_the_manifest(data):
    for i, row in enumerate(data.rows):
        masks = ls.location_masks(data, i, list(TINY.classes))
        assert masks.shape == SHAPE
        for lesion in row["lesions"]:
            k, j, x = lesion["centre_voxel"]
            assert masks[k, j, x] == TINY.classes.index(lesion["location"]) + 1
        if not row["lesions"]:
            assert not masks.any()


def test_training_lowers_the_loss_on_a_fixed_batch(data):
    torch.manual_seed(0)
    model = LesionSeg3D(TINY)
    train = ls.default_train_config()
    task = ls.LesionSegTask(model, data, train, data.volumes_in(["train"]), [], crop=16,
                            p_lesion=1.0)
    batch = task.batch(list(range(4)), epoch=0)
    assert batch["x"].shape == (4, TINY.in_channels, 16, 16, 16)
    assert batch["target"].shape == (4, 8, 8, 8, 8) and float(batch["target"].sum()) > 0
    assert torch.equal(task.batch(list(range(4)), epoch=0)["x"], batch["x"])  # seeded
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    first = float(task.loss(batch)["loss"].detach())
    for _ in range(15):
        loss = task.loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(task.loss(batch)["loss"].detach()) < first


def test_train_writes_checkpoints_and_the_encoder_uses_them(data, run, tmp_path):
    out, summary = run
    assert summary["steps"] == 8 and summary["monitor"] == "val_macro_auc"
    meta = json.loads((out / "last" / "config.json").read_text())
    assert meta["kind"] == "lesionseg" and "lesion masks" in meta["supervised"]
    model = ls.load_lesionseg(out)
    assert not model.training and model.cfg == TINY
    enc = VolumeEncoder.load(out)
    assert enc.kind == "lesionseg" and enc.dim == 9 and enc.score_kind == SCORE_LESION
    from vlm.io import read_volume

    vol = read_volume(data.root / data.rows[0]["nifti"])
    e = enc.encode(vol)  # resampled from the tiny phantom's 15 mm slices to the model grid
    assert e.vector.shape == (9,) and np.linalg.norm(e.vector) == pytest.approx(1.0, abs=1e-5)
    assert e.slice_scores.shape == (SHAPE[0],) and set(e.findings) == set(TINY.classes)
    assert e.vector[:8] @ np.array(list(e.findings.values())) > 0
    # the fingerprint covers the weights: an exported float16 copy is a different model
    exported = ls.export_lesionseg(out, tmp_path / "ship")
    assert exported.stat().st_size < (out / "last" / ls.CHECKPOINT).stat().st_size
    shipped = VolumeEncoder.load(tmp_path / "ship")
    assert shipped.config_hash != enc.config_hash
    card = (tmp_path / "ship" / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card and "Supervised" in card
    assert shipped.config_hash in card
    assert np.allclose(shipped.encode(vol).vector, e.vector, atol=0.02)
    with pytest.raises(ConfigError, match="lesion segmenter"):
        VolumeEncoder.load(out, attention=tmp_path / "x")


def test_cli_trains_on_the_named_splits(data, tmp_path, capsys):
    from ui.cli import main

    args = ["train", "lesion-seg", "--data", str(data.root), "--width", "4", "--epochs", "1",
            "--batch-size", "2", "--crop", "16"]
    assert main([*args, "--out", str(tmp_path / "r"), "--splits", "train"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last[last.index("{"):])["steps"] == 100
    assert ls.load_lesionseg(tmp_path / "r").cfg.width == 4
    assert main([*args, "--out", str(tmp_path / "r2"), "--splits", "val"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--splits" in err[0]


def test_a_lesion_run_is_not_resumed_with_other_sampling(data, tmp_path):
    """The lesion-crop settings decide the samples as much as the volumes do: a run folder
    reused with another ``p_lesion`` is refused in one line instead of resumed."""
    from vlm.errors import ConfigError

    train = ls.default_train_config(epochs=1, save_every=4)
    val = [i for i, r in enumerate(data.rows) if r["split"] != "train"]
    ls.train_lesionseg(data, tmp_path, TINY, train, val_volumes=val, samples_per_epoch=8)
    with pytest.raises(ConfigError, match="is the state of a run on other training data"):
        ls.train_lesionseg(data, tmp_path, TINY, train, val_volumes=val, samples_per_epoch=8,
                           p_lesion=0.9)


def test_soft_dice_counts_only_the_classes_present_in_the_batch():
    target = torch.zeros(2, 3, 4, 4, 4)
    target[0, 1, :2, :2, :2] = 1.0  # class 1 present, classes 0 and 2 absent
    nothing = torch.zeros_like(target)
    assert float(ls.soft_dice_loss(nothing, target)) == pytest.approx(1 - 1 / 9)
    assert float(ls.soft_dice_loss(target.clone(), target)) == pytest.approx(0.0)
    # predicting an absent class costs nothing here (the cross-entropy handles it) ...
    noisy = target.clone()
    noisy[:, 2] = 0.5
    assert float(ls.soft_dice_loss(noisy, target)) == pytest.approx(0.0)
    # ... and no class present gives a zero that still has a gradient path
    empty = torch.zeros_like(target)
    prob = torch.full_like(target, 0.3, requires_grad=True)
    loss = ls.soft_dice_loss(prob, empty)
    loss.backward()
    assert float(loss.detach()) == 0.0 and prob.grad is not None


def test_focal_loss_is_the_retinanet_formula_normalised_by_positives():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    target = (torch.rand(2, 3, 4, 4, 4, generator=g) > 0.9).float()
    p = torch.sigmoid(logits)
    direct = 0.0
    for z, t in zip(p.flatten().tolist(), target.flatten().tolist(), strict=True):
        pt, at = (z, 0.25) if t else (1 - z, 0.75)
        direct += -at * (1 - pt) ** 2 * np.log(pt)
    assert float(ls.focal_loss(logits, target)) == pytest.approx(direct / target.sum().item(),
                                                                 rel=1e-4)
    # no positive cell: the sum is divided by 1, not by 0
    none = torch.zeros_like(target)
    assert np.isfinite(float(ls.focal_loss(logits, none)))
    # the output bias starts every location at a 1% prior
    model = LesionSeg3D(TINY).eval()
    assert torch.allclose(torch.sigmoid(model.head.bias), torch.full((8,), 0.01))


def test_export_volume_model_cli_packages_a_lesion_run(run, tmp_path, capsys):
    from ui.cli import main

    out, _ = run
    bench = tmp_path / "volume_retrieval.json"
    bench.write_text(json.dumps({"benchmark": "volume_retrieval", "models": {}}))
    assert main(["export-volume-model", "--run", str(out), "--out", str(tmp_path / "ship"),
                 "--benchmark", str(bench), "--command", "radlens train lesion-seg ...",
                 "--note", "a note"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["checkpoint"] == str(tmp_path / "ship") and printed["bytes"] > 0
    card = (tmp_path / "ship" / "MODEL_CARD.md").read_text()
    assert "radlens train lesion-seg ..." in card and "a note" in card
    assert "volume_retrieval" in card
    shipped = VolumeEncoder.load(tmp_path / "ship")
    assert shipped.kind == "lesionseg" and shipped.model.cfg.top_k == LesionSegConfig.top_k
    assert "the mean of the 20 highest lesion probabilities" in card

    # --top-k 1: the per-location score becomes the largest probability, the card says so,
    # and the fingerprint changes (an index built with the other read-out refuses it)
    assert main(["export-volume-model", "--run", str(out), "--out", str(tmp_path / "max"),
                 "--top-k", "1"]) == 0
    top1 = VolumeEncoder.load(tmp_path / "max")
    assert top1.model.cfg.top_k == 1 and top1.config_hash != shipped.config_hash
    assert "per location the largest lesion probability" in (
        tmp_path / "max" / "MODEL_CARD.md").read_text()
    hu = np.full((16, 32, 32), -1000, np.int16)
    hu[4:12, 8:24, 8:24] = 40
    prob = predict(top1.model, hu)
    largest = np.array(list(top1.encode(hu).findings.values()))
    assert np.allclose(largest, prob.flatten(1).max(1).values.numpy(), atol=1e-4)
    mean20 = np.array(list(shipped.encode(hu).findings.values()))
    assert np.all(mean20 <= largest + 1e-3)
    # refused in one line: k below 1, and --top-k for a model without that read-out
    capsys.readouterr()
    assert main(["export-volume-model", "--run", str(out), "--out", str(tmp_path / "zero"),
                 "--top-k", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "top_k must be at least 1" in err[0]
    (tmp_path / "lecl_run").mkdir()
    with pytest.raises(ConfigError, match="--top-k is the read-out of a lesion-seg run"):
        export_volume_model(tmp_path / "lecl_run", tmp_path / "x", top_k=1)


def _lesion_locations_drawn(task, n=200):
    """Location classes of the lesion crops among ``n`` draws of the task's sampler."""
    drawn = []
    for i in range(n):
        g = ls.sample_generator(0, 0, i)
        v, sl, _ = task._crop(g)
        present = np.unique(task.masks[v][sl])
        drawn.append({int(c) - 1 for c in present if c})
    return drawn


def test_location_weights_steer_the_lesion_crops(data):
    train = ls.default_train_config(epochs=1)
    vols = [i for i, r in enumerate(data.rows) if r["split"] == "train"]
    model = LesionSeg3D(TINY)
    uniform = ls.LesionSegTask(model, data, train, vols, [], crop=16, p_lesion=1.0)
    classes = sorted(uniform.lesions)
    assert len(classes) >= 2, "the tiny set needs lesions of two locations"
    only = classes[0]
    weights = {uniform.classes[c]: (1.0 if c == only else 0.0) for c in classes}
    steered = ls.LesionSegTask(model, data, train, vols, [], crop=16, p_lesion=1.0,
                               location_weights=weights)
    assert steered.lesion_keys == [only]
    # every crop of the steered task holds a lesion of that location (the lesion's centre voxel
    # is jittered by a third of the crop, so it stays inside); uniform draws hold other ones
    assert all(only in d for d in _lesion_locations_drawn(steered))
    assert any(only not in d for d in _lesion_locations_drawn(uniform))
    # no weights = the uniform draw of earlier runs, unchanged
    g1, g2 = ls.sample_generator(0, 0, 3), ls.sample_generator(0, 0, 3)
    assert uniform._crop(g1) == ls.LesionSegTask(model, data, train, vols, [], crop=16,
                                                 p_lesion=1.0, location_weights={})._crop(g2)


def test_location_weights_and_windows_are_checked(data, tmp_path, capsys):
    from ui.cli import main

    train = ls.default_train_config(epochs=1)
    vols = [i for i, r in enumerate(data.rows) if r["split"] == "train"]
    with pytest.raises(ConfigError, match="unknown locations"):
        ls.LesionSegTask(LesionSeg3D(TINY), data, train, vols, [], crop=16,
                         location_weights={"brain": 2.0})
    with pytest.raises(ConfigError, match=">= 0"):
        ls.LesionSegTask(LesionSeg3D(TINY), data, train, vols, [], crop=16,
                         location_weights={"liver": -1.0})
    with pytest.raises(ConfigError, match="low end"):
        LesionSegConfig(windows=((100.0, -100.0),))
    with pytest.raises(ConfigError, match="at least one"):
        LesionSegConfig(windows=())
    args = ["train", "lesion-seg", "--data", str(data.root), "--width", "4", "--epochs", "1",
            "--batch-size", "2", "--crop", "16", "--out", str(tmp_path / "r")]
    for bad, option in ((["--window=-20"], "--window"), (["--location-weight", "liver"],
                                                          "--location-weight"),
                        (["--location-weight", "brain=2"], "unknown locations"),
                        (["--copy-paste", "liver"], "--copy-paste"),
                        (["--copy-paste", "liver=2"], "[0, 1]")):
        assert main([*args, *bad]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and option in err[0], err
    assert not (tmp_path / "r" / "last").exists()
    good = ["--window=-160:240", "--window=-20:140", "--location-weight", "liver=3",
            "--copy-paste", "liver=0.5"]
    assert main([*args, *good]) == 0
    capsys.readouterr()
    cfg = ls.load_lesionseg(tmp_path / "r").cfg
    assert cfg.windows == ((-160.0, 240.0), (-20.0, 140.0)) and cfg.in_channels == 5


def _lesion_block(value=40.0, contrast=-30.0, seed=0):
    """A noisy tissue block with one spherical lesion (label 1) of ``contrast`` HU at its centre."""
    rng = np.random.default_rng(seed)
    hu = (value + rng.normal(0.0, 5.0, (32, 32, 32))).astype(np.float32)
    z, y, x = np.mgrid[:32, :32, :32]
    lesion = (z - 16) ** 2 + (y - 15) ** 2 + (x - 17) ** 2 <= 9
    hu[lesion] += contrast
    return hu, lesion.astype(np.int32)


def test_cut_sprite_and_paste_move_a_lesion_with_its_contrast():
    hu, labels = _lesion_block()
    sprite = ls.cut_sprite(hu, labels, 1, cls=2)
    assert sprite is not None and sprite.mask.sum() == labels.sum()
    assert abs(sprite.shell_mean - 40.0) < 2.0 and 3.0 < sprite.shell_sd < 7.0
    assert abs(sprite.values[sprite.mask].mean() + 30.0) < 3.0
    assert not sprite.values[~sprite.mask].any() and not (sprite.shell & sprite.mask).any()
    edge = np.zeros_like(labels)
    edge[0:3, 10:13, 10:13] = 1  # touches the volume edge: no complete shell
    assert ls.cut_sprite(hu, edge, 1, cls=2) is None
    assert ls.cut_sprite(hu, labels, 7, cls=2) is None  # no such label
    # paste on 70-HU tissue: the lesion keeps its contrast against its new surroundings
    paste = ls.Paste(sprite, 0, (4, 5, 6), base=70.0)
    target, classes = np.full((20, 20, 20), 70.0, np.float32), np.zeros((20, 20, 20), np.int64)
    paste.apply(target, classes, (0, 0, 0))
    box = tuple(slice(o, o + d) for o, d in zip(paste.origin, sprite.mask.shape, strict=True))
    np.testing.assert_allclose(target[box][sprite.mask], sprite.values[sprite.mask] + 70.0)
    assert (classes[box][sprite.mask] == 3).all() and classes.sum() == 3 * sprite.mask.sum()
    assert (target[classes == 0] == 70.0).all()
    # a crop that cuts through the sprite receives only its part, at the right voxels
    part, part_cls = np.full((8, 20, 20), 70.0, np.float32), np.zeros((8, 20, 20), np.int64)
    paste.apply(part, part_cls, (8, 0, 0))
    np.testing.assert_array_equal(part, target[8:16])
    np.testing.assert_array_equal(part_cls, classes[8:16])
    paste.apply(part, part_cls, (40, 0, 0))  # no overlap: nothing written
    np.testing.assert_array_equal(part, target[8:16])
    # body frames: the same normalised position in another body
    src, dst = {"lo": [0, 0, 0], "hi": [10, 10, 10]}, {"lo": [10, 20, 30], "hi": [30, 40, 50]}
    assert ls.frame_voxel(np.array([5, 0, 10]), src, dst).tolist() == [20, 20, 50]


def test_copy_paste_moves_training_lesions_into_other_volumes(data):
    train = ls.default_train_config(epochs=1)
    vols = [i for i, r in enumerate(data.rows) if r["split"] == "train"]
    model = LesionSeg3D(TINY)
    plain = ls.LesionSegTask(model, data, train, vols, [], crop=16, p_lesion=1.0)
    only = max(plain.lesions, key=lambda c: len(plain.lesions[c]))
    name = plain.classes[only]
    weights = {plain.classes[c]: float(c == only) for c in plain.lesions}
    task = ls.LesionSegTask(model, data, train, vols, [], crop=16, p_lesion=1.0,
                            location_weights=weights, paste={name: 1.0}, paste_tol=60.0,
                            paste_jitter=(2, 4, 4))  # shifts for 32^3 volumes
    assert len(task.sprites[only]) == len(task.lesions[only])
    before = {v: np.array(task.vols[v]) for v in vols}
    pastes = 0
    for i in range(40):
        v, sl, paste = task._crop(ls.sample_generator(0, 0, i))
        if paste is None:
            continue
        pastes += 1
        sprite = paste.sprite
        assert v == paste.volume in vols and sprite.cls == only
        box = tuple(slice(o, o + d) for o, d in zip(paste.origin, sprite.mask.shape,
                                                     strict=True))
        assert not task.masks[v][box].any()  # never on top of another lesion
        assert abs(paste.base - sprite.shell_mean) <= 60.0
        # the crop holds the pasted lesion: its centre's cell is a target of its location
        _x, target = task._sample(ls.sample_generator(0, 0, i))
        cell = (np.asarray(paste.origin) + sprite.anchor - [s.start for s in sl]) // 2
        assert target[only][tuple(cell)] == 1
    assert pastes >= 5, pastes
    for v in vols:  # pastes write into copies, never into the cached training volumes
        np.testing.assert_array_equal(np.asarray(task.vols[v]), before[v])
    # a location without copy-paste keeps the exact draws of earlier runs
    g1, g2 = ls.sample_generator(0, 0, 3), ls.sample_generator(0, 0, 3)
    assert plain._crop(g1) == ls.LesionSegTask(model, data, train, vols, [], crop=16,
                                               p_lesion=1.0, paste={})._crop(g2)
    with pytest.raises(ConfigError, match="unknown locations"):
        ls.LesionSegTask(model, data, train, vols, [], crop=16, paste={"brain": 0.5})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        ls.LesionSegTask(model, data, train, vols, [], crop=16, paste={name: 1.5})


def test_width_below_one_is_refused_in_one_line(data, tmp_path, capsys):
    """``--width 0`` built zero-channel convolutions and died as an internal RuntimeError at
    the first step; width 1 is the smallest network that trains."""
    from ui.cli import main

    for width in (0, -3):
        with pytest.raises(ConfigError, match=r"width .* must be at least 1"):
            LesionSegConfig(width=width)
    capsys.readouterr()
    assert main(["train", "lesion-seg", "--data", str(data.root), "--out", str(tmp_path / "r"),
                 "--width", "0", "--epochs", "1", "--batch-size", "2", "--crop", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "width" in err[0] and "at least 1" in err[0], err
    assert not (tmp_path / "r").exists()
    assert LesionSeg3D(LesionSegConfig(width=1))(torch.zeros(1, 5, 8, 8, 8)).shape[1] == 8


def test_absurd_voxel_sizes_are_refused_before_resampling(run):
    """A volume whose spacing claimed 1e6 mm asked the resampler for millions of slices (an
    overflow, or a run that never ended); such sizes are one line, and an ordinary volume is
    still resampled to the model grid."""
    from vlm.errors import RadLensError
    from vlm.io.types import ImageMeta, Volume
    from vlm.volume_encoder import MAX_RESAMPLED_VOXELS, resample_to_spacing

    target = TINY.spacing_mm
    hu = _hu((8, 16, 16))
    assert resample_to_spacing(hu, (7.5, 5.4688, 5.4688), target).shape == (16, 32, 32)
    for spacing, why in (((1e6, 1.0, 1.0), r"spans 8e\+06 mm along z"),
                         ((float("nan"), 1.0, 1.0), "not three positive finite"),
                         ((0.0, 1.0, 1.0), "not three positive finite"),
                         ((-2.0, 1.0, 1.0), "not three positive finite")):
        with pytest.raises(RadLensError, match=why):
            resample_to_spacing(hu, spacing, target)
    with pytest.raises(RadLensError, match=f"at most {MAX_RESAMPLED_VOXELS:,}"):
        resample_to_spacing(np.zeros((100, 600, 600), np.float32), (20.0, 5.0, 5.0),
                            (1.0, 1.0, 1.0))
    enc = VolumeEncoder.load(run[0])
    affine = np.diag([1e6, 2.0, 2.0, 1.0])
    meta = ImageMeta(source_format="nifti", rows=16, columns=16, frames=8)
    with pytest.raises(RadLensError, match="is the voxel size right"):
        enc.encode(Volume(array=hu, affine=affine, meta=meta))
