"""CT recipes end to end on tiny PhantomCT data: dataset cache, LeCL, CLEAR CV, DrasCLR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlm  # noqa: F401  (torchvision shim before open_clip/timm)
from vlm.data.ct_dataset import CTDataset
from vlm.data.phantom_ct import generate_phantom_ct
from vlm.models.clear import ClearConfig, LeCL
from vlm.models.drasclr import ConditionalConv3d
from vlm.train import drasclr as dr
from vlm.train import lecl as lc
from vlm.train.clear import inner_split, patient_folds, train_clear

N, SHAPE = 12, (32, 32, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> CTDataset:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pct")
    generate_phantom_ct(root, n=N, shape=SHAPE, seed=5, workers=1)
    return CTDataset(root)


@pytest.fixture(scope="module")
def lecl_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lecl")
    summary = lc.train_lecl(data, out, lc.lecl_config("tiny"), lesion_weight=10.0,
                            train=lc.default_train_config(epochs=1, batch_size=32))
    return out, summary


def test_dataset_cache_slices_and_endpoints(data):
    vol = data.volume(0)
    assert vol.shape == SHAPE and vol.dtype == np.int16
    cached = data.cache_dir / "volumes" / f"{data.volume_ids[0]}.npy"
    assert cached.is_file()
    fresh = CTDataset(data.root, cache=False)
    assert np.array_equal(np.asarray(fresh.volume(0)), np.asarray(vol))
    assert fresh.content_hash(0) == data.content_hash(0) != data.content_hash(1)
    assert len(data.slice_items()) == N * SHAPE[0]
    flagged = [(i, k) for i in range(N) for k in data.lesion_slices(i)]
    assert flagged, "the tiny set should hold lesion slices"
    i, k = flagged[0]
    assert data.slice_boxes(i, k) and data.slice_hu(i, k).shape == SHAPE[1:]
    ep = data.endpoints()
    assert ep.locations.shape == (N, 8) and ep.emphysema_class.max() < 4
    assert len(ep.subset([0, 2])) == 2 and ep.subset([2]).volume_ids == [data.volume_ids[2]]


def test_lecl_trains_and_slice_embedding_cache_hits(data, lecl_run, tmp_path):
    out, summary = lecl_run
    assert summary["steps"] >= 1 and np.isfinite(summary["best"])
    model = lc.load_lecl(out)
    assert not model.training and model.cfg.lesion_weight == 10.0
    cache = tmp_path / "emb"
    first = lc.extract_slice_embeddings(out / "last", data, cache)
    assert (first.hits, first.computed) == (0, N)
    assert first.bags[0].shape == (SHAPE[0], model.cfg.embed_dim)
    second = lc.extract_slice_embeddings(out / "last", data, cache)
    assert (second.hits, second.computed) == (N, 0) and second.model_key == first.model_key
    assert all(torch.equal(a, b) for a, b in zip(first.bags, second.bags, strict=True))
    torch.manual_seed(1)
    other = lc.extract_slice_embeddings(LeCL(model.cfg), data, cache)
    assert other.model_key != first.model_key and other.computed == N


def test_moco_baseline_is_w0(data, tmp_path):
    lc.train_lecl(data, tmp_path, lc.lecl_config("tiny"), lesion_weight=0.0,
                  train=lc.default_train_config(epochs=1, batch_size=64, max_steps=2))
    assert lc.load_lecl(tmp_path / "last").cfg.lesion_weight == 0.0


def test_a_ct_run_folder_is_not_resumed_with_another_loss_or_other_volumes(data, tmp_path):
    """A LeCL run folder reused with ``--lesion-weight 0`` (plain MoCo: the same parameter
    shapes) or with other volumes used to resume silently into a mix of two runs; both are
    one-line refusals now and the saved state stays as it was. The same command resumes."""
    from vlm.errors import ConfigError
    from vlm.train.loop import STATE_FILE

    def run(**kw):
        args = dict(lesion_weight=10.0, volumes=list(range(8)), val_volumes=[8, 9])
        args.update(kw)
        return lc.train_lecl(data, tmp_path, lc.lecl_config("tiny"),
                             train=lc.default_train_config(epochs=1, batch_size=32,
                                                           max_steps=2), **args)

    run()
    state = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(ConfigError) as moco:
        run(lesion_weight=0.0)
    assert "another model configuration (lesion_weight 10.0 there, 0.0 here)" in str(moco.value)
    assert "\n" not in str(moco.value)
    with pytest.raises(ConfigError, match="is the state of a run on other training data"):
        run(volumes=list(range(1, 9)))
    with pytest.raises(ConfigError, match="is the state of a run on other training data"):
        run(val_volumes=[9, 10])
    assert (tmp_path / STATE_FILE).read_bytes() == state
    assert run()["steps"] == 2  # the same run: resumed at its end, nothing more to do


def test_patient_folds_partition_by_patient():
    patients = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "f"]
    folds = patient_folds(patients, k=3, seed=1)
    allidx = np.sort(np.concatenate(folds))
    assert np.array_equal(allidx, np.arange(len(patients)))
    owner = {}
    for f, idx in enumerate(folds):
        for i in idx:
            assert owner.setdefault(patients[i], f) == f
    tr, va = inner_split(patients, np.arange(len(patients)), 0.3, seed=0)
    assert not {patients[i] for i in tr} & {patients[i] for i in va}


def test_train_clear_cross_validates_all_endpoints(data, lecl_run):
    out, _ = lecl_run
    bags = lc.extract_slice_embeddings(out / "last", data).bags
    ep = data.endpoints()
    cfg = ClearConfig(epochs=4, patience=2, batch_size=8, hidden_dim=16, attention_dim=16,
                      head_dim=16, max_slices=24)
    pred = train_clear(dict(zip(data.volume_ids, bags, strict=True)), ep, cfg, folds=3,
                       lesion_slices=[data.lesion_slices(i) for i in range(N)])
    assert np.array_equal(np.sort(np.concatenate(pred.folds)), np.arange(N))
    for arr in (pred.locations, pred.emphysema, pred.risk, pred.score):
        assert np.isfinite(arr).all()
    assert ((pred.locations >= 0) & (pred.locations <= 1)).all()
    assert len(pred.info["epochs_survival"]) == 3


def test_drasclr_conditional_and_plain(data, tmp_path):
    for cond in (True, False):
        out = tmp_path / str(cond)
        summary = dr.train_drasclr(data, out, dr.drasclr_config("tiny"), conditional=cond,
                                   train=dr.default_train_config(epochs=1, batch_size=32,
                                                                 max_steps=3))
        assert summary["steps"] == 3
        model, lattice = dr.load_drasclr(out)
        assert not model.training and lattice == dr.DEFAULT_LATTICE
        n_cond = sum(isinstance(m, ConditionalConv3d) for m in model.modules())
        assert (n_cond > 0) == cond
        emb = dr.drasclr_volume_embeddings(out / "last", data)
        assert emb.shape == (N, model.cfg.repr_dim) and np.isfinite(emb).all()


def test_real_ct_frame_ignores_detached_table():
    hu = np.full((20, 40, 40), -1000.0, dtype=np.float32)
    hu[4:16, 10:30, 8:32] = 40.0  # body
    hu[:, 36:38, :] = 100.0  # table: detached, spans every slice and column
    frame = dr.real_ct_frame(hu)
    assert frame["lo"] == [4.0, 10.0, 8.0] and frame["hi"] == [15.0, 29.0, 31.0]
    grid = dr.volume_grid(hu.shape, frame, (2, 2, 2), n_neighbours=2)
    assert len(grid) == 8 and (np.abs(grid.coords) == 0.5).all()


def test_train_clear_head_writes_an_abmil_the_volume_encoder_uses(data, lecl_run, tmp_path):
    from vlm.train.clear import train_clear_head
    from vlm.volume_encoder import SCORE_ATTENTION, VolumeEncoder

    out, _ = lecl_run
    cfg = ClearConfig(epochs=3, patience=2, batch_size=8, hidden_dim=16, attention_dim=16,
                      head_dim=16, max_slices=24)
    splits = [r["split"] for r in data.rows]
    summary = train_clear_head(data, out / "last", tmp_path, cfg)
    assert (tmp_path / "clear_mil.pt").is_file() and (tmp_path / "clear_mil.json").is_file()
    assert summary["train"] == splits.count("train") and summary["val"] == splits.count("val")
    assert 1 <= summary["epochs"] <= 3
    for auc in summary["test_auc"].values():
        assert auc is None or 0.0 <= auc <= 1.0
    enc = VolumeEncoder.load(out / "last", attention=tmp_path)
    assert enc.score_kind == SCORE_ATTENTION
    got = enc.encode(data.volume_tensor(0).numpy())
    assert got.slice_scores.shape == (SHAPE[0],)
    assert abs(float(got.slice_scores.sum()) - 1.0) < 1e-4  # ABMIL attention sums to 1


def test_export_volume_model_ships_the_encoder_in_float16(data, lecl_run, tmp_path):
    from vlm.volume_encoder import VolumeEncoder, export_volume_model

    out, _ = lecl_run
    dest = export_volume_model(out / "last", tmp_path / "ship",
                               commands=["radlens train lecl --data D --out R"])
    assert (dest / "lecl.pt").stat().st_size < (out / "last" / "lecl.pt").stat().st_size / 3
    card = (dest / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card and "radlens train lecl --data D --out R" in card
    hu = data.volume_tensor(1).numpy()
    full, slim = VolumeEncoder.load(out / "last"), VolumeEncoder.load(dest)
    assert slim.dim == full.dim and slim.config_hash in card
    a, b = full.encode(hu).vector, slim.encode(hu).vector
    assert float(np.dot(a, b)) > 0.999  # float16 weights, same vector up to rounding
    with pytest.raises(Exception, match=r"no lecl\.pt"):
        export_volume_model(tmp_path / "nothing", tmp_path / "x")


def test_r18_preset_is_a_resnet_slice_encoder():
    from vlm.models.clear import is_vit
    from vlm.train.lecl import embed_volume

    cfg = lc.lecl_config("r18")
    assert cfg.vision.backend == "timm" and cfg.vision.timm_model == "resnet18"
    assert not is_vit(cfg.vision)  # MoCo v3 gives CNNs the 2-layer projector
    model = LeCL(cfg).eval()
    emb = embed_volume(model, torch.full((2, 128, 128), -1000.0))
    assert emb.shape == (2, cfg.embed_dim)


def test_train_lecl_cli_trains_on_the_named_splits_with_the_recipe_lr(data, monkeypatch,
                                                                      capsys, tmp_path):
    from ui.cli import main

    seen: dict = {}

    def fake_train(ds, out, cfg, lesion_weight, train, volumes):
        seen.update(cfg=cfg, train=train, volumes=volumes)
        return {"steps": 0}

    monkeypatch.setattr(lc, "train_lecl", fake_train)
    args = ["train", "lecl", "--data", str(data.root), "--out", str(tmp_path / "run"),
            "--preset", "tiny"]
    assert main([*args, "--splits", "train"]) == 0
    splits = [r["split"] for r in data.rows]
    assert seen["volumes"] == [i for i, s in enumerate(splits) if s == "train"]
    assert seen["train"].lr == lc.default_train_config().lr
    assert seen["train"].weight_decay == lc.default_train_config().weight_decay
    assert main([*args, "--lr", "1e-3"]) == 0
    assert seen["train"].lr == 1e-3
    assert seen["volumes"] == [i for i, s in enumerate(splits) if s != "val"]
    capsys.readouterr()
    assert main([*args, "--splits", "val"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--splits" in err[0]


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04truncated zip"])
def test_a_damaged_training_state_is_one_line_not_an_abort(data, tmp_path, capsys, content):
    """An empty ``train_state.pt`` made ``torch.load`` raise EOFError, which click turned into
    "radlens: aborted" with exit 130, as if Ctrl-C had been pressed; other damage was an
    internal error. Now it is one line naming the file, exit 2, and the file is left alone."""
    from ui.cli import main
    from vlm.train.loop import STATE_FILE

    run = tmp_path / "run"
    run.mkdir()
    (run / STATE_FILE).write_bytes(content)
    args = ["train", "lecl", "--data", str(data.root), "--out", str(run), "--preset", "tiny",
            "--epochs", "1"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable or damaged training state" in err[0], err
    assert STATE_FILE in err[0] and "aborted" not in err[0]
    assert (run / STATE_FILE).read_bytes() == content


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    from vlm.errors import ConfigError

    (tmp_path / "lecl.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="unreadable or damaged checkpoint"):
        lc.load_lecl(tmp_path)


def test_bad_split_names_lesion_weights_and_manifest_lines_are_refused(data, tmp_path):
    """``--splits train,bogus`` trained on 'train' alone without a word; a negative or NaN
    lesion weight trained (NaN ended in an internal error after writing checkpoints); a bad
    manifest line was a bare ValueError in training and made ``index build`` drop the
    manifest silently and index the data set folder as a plain archive."""
    import shutil

    from index.volumes import _manifest_volume_rows
    from vlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown split\(s\) \['bogus'\]"):
        data.volumes_in(["train", "bogus"])
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="lesion weight w must be finite and >= 0"):
            lc.lecl_config("tiny", lesion_weight=w)
    broken = tmp_path / "broken"
    shutil.copytree(data.root, broken, ignore=shutil.ignore_patterns(".cache", "dicom"))
    with open(broken / "manifest.jsonl", "a") as fh:
        fh.write("{bad json\n")
    line = len((broken / "manifest.jsonl").read_text().splitlines())
    for load in (CTDataset, _manifest_volume_rows):
        with pytest.raises(ConfigError, match=rf"manifest.jsonl:{line}: not valid JSON"):
            load(broken)


@pytest.mark.parametrize("folds", [0, 1, -3, 100])
def test_eval_volumes_refuses_a_fold_count_before_pretraining(data, tmp_path, capsys, folds,
                                                              monkeypatch):
    """``--folds 0`` was a ZeroDivisionError and ``--folds 100`` a refusal, both only after
    the whole pre-training budget (20 minutes by default) had been spent."""
    from ui.cli import main

    def no_training(*_a, **_k):
        raise AssertionError("pre-training started before the folds were checked")

    monkeypatch.setattr(lc, "train_lecl", no_training)
    capsys.readouterr()
    assert main(["eval-volumes", "--data", str(data.root), "--out", str(tmp_path / "ev"),
                 "--folds", str(folds)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folds" in err[0], err


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--epochs", "-5"], ["--lr", "0"],
                                  ["--lr", "-1"], ["--batch-size", "0"],
                                  ["--batch-size", "1"]])
def test_train_clear_refuses_settings_no_head_can_train_on(data, lecl_run, args, capsys):
    """``--epochs 0`` wrote an untrained ABMIL over the trained one with exit 0 (the volume
    index then used its attention), and so did ``--batch-size 1`` (every one-bag batch was
    skipped); ``--lr -1`` and ``--batch-size 0`` were internal errors."""
    from ui.cli import main

    out, _ = lecl_run
    before = (out / "clear_mil.pt").read_bytes() if (out / "clear_mil.pt").is_file() else None
    capsys.readouterr()
    assert main(["train", "clear", "--data", str(data.root), "--slice-model", str(out),
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CLEAR training needs" in err[0], err
    after = (out / "clear_mil.pt").read_bytes() if (out / "clear_mil.pt").is_file() else None
    assert after == before


def test_export_volume_model_reads_the_benchmark_before_writing(lecl_run, tmp_path):
    """A mistyped ``--benchmark`` failed after the new weights had replaced the old export,
    beside the old model card; now nothing is written and the error is one line."""
    from vlm.errors import ConfigError
    from vlm.volume_encoder import export_volume_model

    out, _ = lecl_run
    dest = tmp_path / "exp"
    export_volume_model(out, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{oops")
    for bench, message in ((tmp_path / "typo.json", "cannot read the benchmark"),
                           (tmp_path / "bad.json", "not valid JSON"),
                           (tmp_path / "list.json", "must be a JSON object")):
        with pytest.raises(ConfigError, match=message):
            export_volume_model(out, dest, benchmark=bench)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


def test_export_volume_model_never_replaces_what_it_should_not(lecl_run, tmp_path):
    """``--out`` set to the run deleted its CLEAR head before copying it; a folder of
    something else got a LeCL config.json over its own; benchmark JSON of another shape was
    an internal error half-way through the export. Each is one line and nothing changes."""
    import shutil

    from vlm.errors import ConfigError
    from vlm.volume_encoder import _find, export_volume_model

    out, _ = lecl_run
    run = tmp_path / "run"
    shutil.copytree(out, run)

    def snapshot(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot(run)
    found = _find(run, "lecl.pt")
    assert found is not None
    for dest in {run, found.parent}:
        with pytest.raises(ConfigError, match="is, or holds, the model being exported"):
            export_volume_model(run, dest)
    other = tmp_path / "image_checkpoint"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"weights of another model")
    with pytest.raises(ConfigError, match="holds other files and is not a RadLens volume"):
        export_volume_model(run, other)
    assert snapshot(other) == {"model.safetensors": b"weights of another model"}
    for shape in ('{"representations": [1, 2]}', '{"representations": {"a": 3}}'):
        (tmp_path / "odd.json").write_text(shape)
        with pytest.raises(ConfigError, match="'representations' map names to objects"):
            export_volume_model(run, tmp_path / "fresh", benchmark=tmp_path / "odd.json")
    assert not (tmp_path / "fresh").exists()
    assert snapshot(run) == before
    dest = export_volume_model(run, tmp_path / "exp")
    (dest / "stale.txt").write_text("from the first export")
    export_volume_model(run, dest, with_head=False)  # an earlier export is replaced whole
    assert not (dest / "stale.txt").exists() and (dest / "MODEL_CARD.md").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary left"


def test_train_lecl_refuses_a_batch_of_one_slice_before_writing(data, tmp_path, capsys):
    """``--batch-size 1`` died in the projection MLP's BatchNorm1d ("Expected more than 1 value
    per channel") as an internal error; it is refused in one line before the run folder is
    made, and so is a tiny set whose only step would end in a batch of one slice."""
    from ui.cli import main
    from vlm.errors import ConfigError

    capsys.readouterr()
    assert main(["train", "lecl", "--data", str(data.root), "--out", str(tmp_path / "run"),
                 "--preset", "tiny", "--epochs", "1", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch normalisation" in err[0] and "batch size 1" in err[0], err
    assert not (tmp_path / "run").exists()
    # one volume = 32 slices; batches of 31, two per step: the second would hold one slice
    train = lc.default_train_config(epochs=1, batch_size=31, grad_accum=2)
    with pytest.raises(ConfigError, match="leave a batch of one slice"):
        lc.train_lecl(data, tmp_path / "run2", lc.lecl_config("tiny"), train=train,
                      volumes=[0])
    assert not (tmp_path / "run2").exists()
