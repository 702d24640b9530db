"""VolumeEncoder: the vector definitions against direct computations, slice scores, identity,
loading LeCL / DrasCLR / CLEAR ABMIL checkpoints and seeded random towers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlm  # noqa: F401  (torchvision shim before open_clip/timm)
from vlm.errors import ConfigError, RadLensError
from vlm.io.types import ImageMeta, Volume
from vlm.models.clear import ClearConfig, ClearMIL, LeCL
from vlm.models.drasclr import DrasCLR
from vlm.train import drasclr as dr
from vlm.train import lecl as lc
from vlm.volume_encoder import (
    SCORE_ATTENTION,
    SCORE_DISTINCT,
    VolumeEncoder,
    load_clear_mil,
    save_clear_mil,
)


def _phantom(shape=(20, 40, 40), seed=0, lesion=True) -> np.ndarray:
    """Air around a water ellipse body with a bright disc on a few slices, in HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 + ((x - shape[2] / 2) /
                                                          (shape[2] * 0.35)) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
    if lesion:
        disc = ((y - shape[1] * 0.45) ** 2 + (x - shape[2] * 0.6) ** 2 < 16) & (abs(z - 8) < 2)
        hu[disc] = 400.0
    return hu.astype(np.float32)


@pytest.fixture(scope="module")
def lecl_dir(tmp_path_factory):
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("lecl") / "run" / "best"
    lc.save_lecl(LeCL(lc.lecl_config("tiny")), folder)
    return folder.parent


def test_lecl_vector_is_the_air_referenced_mean_of_slice_embeddings(lecl_dir):
    enc = VolumeEncoder.load(lecl_dir)
    hu = _phantom()
    out = enc.encode(Volume(hu, np.eye(4), ImageMeta(source_format="nifti")))
    model = lc.load_lecl(lecl_dir)
    emb = lc.embed_volume(model, torch.from_numpy(hu))  # (Z, E)
    air = lc.embed_volume(model, torch.full((1, 40, 40), -1024.0))[0]
    want = F.normalize((emb - air).mean(0), dim=0).numpy()
    np.testing.assert_allclose(out.vector, want, atol=1e-5)
    assert out.vector.dtype == np.float32 and abs(np.linalg.norm(out.vector) - 1) < 1e-5
    assert enc.dim == model.cfg.embed_dim == out.vector.shape[0]
    scores = 1 - F.cosine_similarity(emb - air, torch.from_numpy(want)[None], dim=1).numpy()
    np.testing.assert_allclose(out.slice_scores, scores, atol=1e-5)
    assert out.score_kind == SCORE_DISTINCT and out.slice_scores.shape == (hu.shape[0],)
    top = out.top_slices(3)
    assert [k for k, _ in top] == list(np.argsort(-scores)[:3])
    assert top[0][1] >= top[1][1] >= top[2][1]
    assert enc.name == "lecl" and enc.source == str(lecl_dir.resolve())


def test_identity_follows_weights_not_only_config(lecl_dir, tmp_path):
    a, b = VolumeEncoder.load(lecl_dir), VolumeEncoder.load(lecl_dir)
    assert a.config_hash == b.config_hash and len(a.config_hash) == 16
    torch.manual_seed(4)
    lc.save_lecl(LeCL(lc.lecl_config("tiny")), tmp_path / "other")
    assert VolumeEncoder.load(tmp_path / "other").config_hash != a.config_hash


def test_random_towers_are_seeded_and_named():
    hu = _phantom()
    a = VolumeEncoder.load("random:lecl-tiny")
    b = VolumeEncoder.load("random:lecl-tiny@0")
    c = VolumeEncoder.load("random:lecl-tiny@1")
    assert a.name == "lecl-tiny-random@0" and a.source == "random:lecl-tiny@0"
    assert a.config_hash == b.config_hash != c.config_hash
    np.testing.assert_array_equal(a.encode(hu).vector, b.encode(hu).vector)
    assert not np.allclose(a.encode(hu).vector, c.encode(hu).vector)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    VolumeEncoder.load("random:lecl-tiny@5")  # does not disturb the caller's RNG stream
    assert torch.equal(torch.rand(3), expected)
    for bad in ("random:lecl-huge", "random:vit-tiny", "random:lecl-tiny@x"):
        with pytest.raises(ConfigError, match="random"):
            VolumeEncoder.load(bad)


def test_drasclr_vector_is_the_mean_patch_feature(tmp_path):
    torch.manual_seed(0)
    cfg = dr.drasclr_config("tiny", lattice=(3, 3, 3))
    dr.save_drasclr(DrasCLR(cfg), tmp_path / "dras", (3, 3, 3))
    enc = VolumeEncoder.load(tmp_path / "dras")
    hu = _phantom((24, 40, 40))
    out = enc.encode(hu)
    model, lattice = dr.load_drasclr(tmp_path / "dras")
    feats, _ = dr.volume_patch_features(model, torch.from_numpy(hu), dr.real_ct_frame(hu),
                                        lattice)
    np.testing.assert_allclose(out.vector, F.normalize(feats.mean(0), dim=0).numpy(), atol=1e-5)
    assert enc.name == "drasclr" and enc.dim == cfg.repr_dim and enc.lattice == (3, 3, 3)
    assert out.slice_scores.shape == (24,) and (out.slice_scores >= 0).all()
    assert out.slice_scores.max() > 0 and out.score_kind == SCORE_DISTINCT
    with pytest.raises(ConfigError, match="CT volume"):
        enc.encode(np.full((24, 40, 40), -1000.0, np.float32))


def test_clear_abmil_gives_attention_slice_scores(lecl_dir, tmp_path):
    model = lc.load_lecl(lecl_dir)
    torch.manual_seed(0)
    mil = ClearMIL(ClearConfig(in_dim=model.cfg.embed_dim, top_k=3)).eval()
    path = save_clear_mil(mil, tmp_path / "mil")
    assert load_clear_mil(path).cfg == mil.cfg
    enc = VolumeEncoder.load(lecl_dir, attention=tmp_path / "mil")
    hu = _phantom()
    out = enc.encode(hu)
    with torch.no_grad():
        want = mil(lc.embed_volume(model, torch.from_numpy(hu))[None])
    np.testing.assert_allclose(out.slice_scores, want.attention[0].numpy(), atol=1e-5)
    assert out.score_kind == SCORE_ATTENTION and abs(out.slice_scores.sum() - 1) < 1e-4
    assert [k for k, _ in out.top_slices(3)] == want.top_slices[0].tolist()
    # the vector does not depend on the task head
    np.testing.assert_allclose(out.vector, VolumeEncoder.load(lecl_dir).encode(hu).vector,
                               atol=1e-6)
    # an ABMIL next to the LeCL weights is found on its own
    save_clear_mil(mil, lecl_dir / "best")
    try:
        assert VolumeEncoder.load(lecl_dir).score_kind == SCORE_ATTENTION
    finally:
        (lecl_dir / "best" / "clear_mil.pt").unlink()
    save_clear_mil(ClearMIL(ClearConfig(in_dim=7)), tmp_path / "wrong")
    with pytest.raises(ConfigError, match="7-d"):
        VolumeEncoder.load(lecl_dir, attention=tmp_path / "wrong")


def test_missing_or_wrong_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        VolumeEncoder.load(tmp_path)
    assert "train lecl" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="ABMIL"):
        load_clear_mil(tmp_path)
    with pytest.raises(ConfigError, match="random tower"):
        VolumeEncoder.load("random:lecl-tiny", attention=tmp_path)
    with pytest.raises(ConfigError, match=r"\(Z, Y, X\)"):
        VolumeEncoder.load("random:lecl-tiny").encode(np.zeros((4, 4), np.float32))
    with pytest.raises(RadLensError, match="empty air"):
        VolumeEncoder.load("random:lecl-tiny").encode(np.full((6, 20, 20), -1024, np.float32))


def test_abmil_is_taken_from_beside_the_encoder_it_was_trained_on(tmp_path):
    """A run has best/ and last/ encoders; an ABMIL in last/ must not pair with best/."""
    from vlm.train.lecl import lecl_config, save_lecl

    torch.manual_seed(0)
    run = tmp_path / "run"
    save_lecl(LeCL(lecl_config("tiny")), run / "best")
    save_lecl(LeCL(lecl_config("tiny")), run / "last")
    dim = lecl_config("tiny").embed_dim
    save_clear_mil(ClearMIL(ClearConfig(in_dim=dim)), run / "last")
    assert VolumeEncoder.load(run).attention is None  # best/ has no ABMIL of its own
    assert VolumeEncoder.load(run / "last").attention is not None
    save_clear_mil(ClearMIL(ClearConfig(in_dim=dim)), run)  # a run-level ABMIL applies
    assert VolumeEncoder.load(run).attention is not None


SHIPPED_VOLUME = Path(__file__).resolve().parents[2] / "checkpoints" / "lecl-small"


@pytest.mark.skipif(not (SHIPPED_VOLUME / "lecl.pt").is_file(),
                    reason="no shipped volume model in this checkout")
def test_shipped_volume_model_loads_matches_its_card_and_encodes():
    enc = VolumeEncoder.load(SHIPPED_VOLUME)
    card = (SHIPPED_VOLUME / "MODEL_CARD.md").read_text()
    assert enc.config_hash in card and "Not for clinical use" in card
    assert sum(f.stat().st_size for f in SHIPPED_VOLUME.iterdir()) < 10_000_000
    rng = np.random.default_rng(0)
    hu = np.full((24, 64, 64), -1024.0, np.float32)
    hu[:, 12:52, 10:54] = rng.normal(40.0, 20.0, (24, 40, 44))  # a soft-tissue block
    got = enc.encode(hu)
    assert got.vector.shape == (enc.dim,) and abs(float(np.linalg.norm(got.vector)) - 1) < 1e-5
    assert got.slice_scores.shape == (24,)
