"""Folder ingestion (bad files, reruns, kill and resume) and the Engine on a tiny archive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tiny_cxr import make_tiny_cxr
from vlm.models import create_model, get_tokenizer, save_checkpoint


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = make_tiny_cxr(tmp_path_factory.mktemp("archive"), n=24, size=64)
    good = next((root / "dicom").iterdir())
    (root / "dicom" / "truncated.dcm").write_bytes(good.read_bytes()[:600])
    (root / "dicom" / "notes.dcm").write_text("not an image\n" * 10)
    (root / "manifest.jsonl").unlink()  # a plain folder: walk every file
    return root


def _build(model: Path, source: Path, out: Path, env: dict[str, str] | None = None,
           *extra: str, session: bool = False) -> subprocess.CompletedProcess[str]:
    """``session``: in its own session and process group, as a terminal's foreground job."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from ui.cli import main; sys.exit(main())",
         "index", "build", "--model", str(model), "--source", str(source), "--out", str(out),
         "--no-progress", "--workers", "1", "--batch-size", "4", *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
        start_new_session=session)


def _one_row_per_image(out: Path, n: int = 24) -> bool:
    """Whether the index at ``out`` holds exactly one image row per good archive image."""
    from index.folder import IndexFolder

    ix = IndexFolder.open(out)
    try:
        hashes = [it.content_hash for it in ix.catalog.get_many(range(ix.catalog.next_id()))
                  if it is not None and it.collection == "image"]
    finally:
        ix.close()
    return len(hashes) == n == len(set(hashes))


def test_build_reports_bad_files_once_and_rerun_adds_nothing(archive, tiny_model, tmp_path):
    out = tmp_path / "idx"
    first = _build(tiny_model, archive, out)
    assert first.returncode == 3, first.stderr[-1500:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["added"] == 24 and summary["failed"] == 2
    report = json.loads((out / "ingest_report.json").read_text())
    assert sorted(Path(f["path"]).name for f in report["failed"]) == ["notes.dcm",
                                                                     "truncated.dcm"]
    assert sum("truncated.dcm" in line for line in first.stderr.splitlines()) == 1
    assert summary["images_per_s"] > 0 and summary["encoder_images_per_s"] > 0
    again = _build(tiny_model, archive, out)
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert rerun["added"] == 0 and rerun["already_indexed"] == 24

    from index.folder import IndexFolder

    ix = IndexFolder.open(out)
    assert ix.catalog.count("image") == 24
    item = ix.catalog.get(0)
    assert item is not None and item.source_uri.startswith("src-")  # no raw paths by default
    assert item.study and item.study.startswith("st-") and item.thumbnail
    ix.close()


def test_killed_build_resumes_with_one_row_per_image(archive, tiny_model, tmp_path):
    out = tmp_path / "idx"
    killed = _build(tiny_model, archive, out, {"RADLENS_TEST_KILL_AFTER_SAVES": "2"},
                    "--save-every", "4")
    assert killed.returncode in (-9, 137), killed.stderr[-1500:]
    from index.folder import IndexFolder

    ix = IndexFolder.open(out)
    partial = ix.catalog.count("image")
    ix.close()
    assert 0 < partial < 24
    done = _build(tiny_model, archive, out)
    assert done.returncode == 3
    assert _one_row_per_image(out)


@pytest.mark.parametrize(("signal_name", "code"), [("INT", 130), ("TERM", 143)])
def test_ctrl_c_or_sigterm_saves_what_was_encoded_and_a_rerun_completes(
        archive, tiny_model, tmp_path, signal_name, code):
    """Ctrl-C, or SIGTERM as a service manager sends it, reaches the whole process group (the
    build, its decode process and the fork server behind it, whose death breaks a lockstep
    pool: see test_a_dead_decode_pool_...); the build stops after its batch, saves, and says
    so in one line; nothing decoded is lost."""
    from index.folder import IndexFolder

    out = tmp_path / "idx"
    # no periodic save in 24 images: whatever the index holds afterwards, the stop saved
    stopped = _build(tiny_model, archive, out, {"RADLENS_TEST_INTERRUPT_AFTER_BATCHES": "2",
                                               "RADLENS_TEST_INTERRUPT_SIGNAL": signal_name},
                     session=True)
    assert stopped.returncode == code, stopped.stderr[-1500:]
    assert "Traceback" not in stopped.stderr and "internal error" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("radlens: interrupted: ") and "run the same command again" in last
    summary = json.loads(stopped.stdout.strip().splitlines()[-1])
    assert summary["interrupted"] is True
    assert 8 <= summary["added"] < 24 and summary["saved"] == summary["added"]
    assert summary["unread"] > 0
    ix = IndexFolder.open(out)
    assert ix.catalog.count("image") == summary["added"]
    ix.close()
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["interrupted"] is True and report["added"] == summary["added"]

    done = _build(tiny_model, archive, out)
    assert done.returncode == 3, done.stderr[-1500:]
    rest = json.loads(done.stdout.strip().splitlines()[-1])
    assert rest["interrupted"] is False and rest["added"] == 24 - summary["added"]
    assert _one_row_per_image(out)


def test_engine_search_filters_and_model_check(archive, tiny_model, tmp_path):
    from index.engine import Engine
    from vlm.errors import RadLensError
    from vlm.io import read_image

    out = tmp_path / "idx"
    assert _build(tiny_model, archive, out).returncode == 3
    engine = Engine.open(out)
    hits = engine.search_text("opacity in the left lung", k=5)
    assert len(hits) == 5 and all(h.item is not None for h in hits)
    assert hits[0].score >= hits[-1].score
    assert len(engine.search_text("left lung", k=5, modality="CT")) == 0
    assert len(engine.search_text("left lung", k=5, modality="DX")) == 5
    query = read_image(next((archive / "dicom").glob("s0*.dcm")))
    similar = engine.search_image(query, k=3)
    assert similar[0].score == pytest.approx(1.0, abs=1e-3)  # the image itself
    assert similar[0].regions and len(similar[0].regions[0]["box"]) == 4
    with pytest.raises(RadLensError, match="unknown filter"):
        engine.search_text("x", k=3, colour="red")
    # the default query is contrasted with a normal study: rank by cos(q) - cos(normal)
    import numpy as np

    from index.engine import NORMAL_REFERENCE

    text, n = "opacity in the left lung", len(engine.index.collection("image").ids())
    q, ref = engine.encoder.encode_text([text, NORMAL_REFERENCE])
    np.testing.assert_allclose(engine.text_query_vector(text),
                               (q - ref) / np.linalg.norm(q - ref), atol=1e-5)
    np.testing.assert_allclose(engine.text_query_vector(text, contrast=None), q, atol=1e-6)
    cos_q = {h.id: h.score for h in engine.search_text(text, k=n, contrast=None)}
    cos_n = {h.id: h.score for h in engine.search_text(NORMAL_REFERENCE, k=n, contrast=None)}
    want = sorted((cos_q[i] - cos_n[i] for i in cos_q), reverse=True)
    got = [cos_q[h.id] - cos_n[h.id] for h in engine.search_text(text, k=5)]
    assert min(got) >= want[4] - 2e-3  # float16 vectors: near-ties may swap
    other = tmp_path / "other"
    torch_model = create_model("lrclr-tiny")
    cfg = torch_model.config.replace(embed_dim=48)
    from vlm.models.factory import build_model

    save_checkpoint(build_model(cfg), other, get_tokenizer("lrclr-tiny"), card="#")
    with pytest.raises(RadLensError, match="was built with model"):
        Engine.open(out, model=str(other))
    # same config, other weights (a retrained model): refused too, in one line
    retrained = tmp_path / "retrained"
    save_checkpoint(create_model("lrclr-tiny"), retrained, get_tokenizer("lrclr-tiny"), card="#")
    with pytest.raises(RadLensError, match="was built with model lrclr-tiny") as err:
        Engine.open(out, model=str(retrained))
    assert "\n" not in str(err.value)
    assert engine.item_path(hits[0].item) is not None  # thumbnails live in the index


def test_plan_workers_splits_cpu_cores_and_leaves_gpu_threads(monkeypatch):
    import torch

    from index import ingest as ig
    from index.ingest import Plan

    monkeypatch.setattr(ig, "available_cpus", lambda: 8)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ig.plan_workers(None, cpu) == Plan(4, 4)  # half decode, the encoder gets the rest
    assert ig.plan_workers(0, cpu) == Plan(0, 8)  # decode in this process: all threads encode
    assert ig.plan_workers(0, cpu).schedule == "in-process"
    assert ig.plan_workers(6, cpu) == Plan(6, 2)
    assert ig.plan_workers(20, cpu) == Plan(20, 1)  # never fewer than one encoder thread
    plan = ig.plan_workers(None, gpu)
    assert plan == Plan(7, torch.get_num_threads()) and plan.schedule == "stream"
    monkeypatch.setattr(ig, "available_cpus", lambda: 1)
    assert ig.plan_workers(None, cpu) == Plan(1, 1)


def test_decode_processes_take_the_malloc_settings_and_the_ingesting_process_keeps_its_own(
        monkeypatch):
    """A fork server's worker starts without the CLI's malloc settings: its initializer applies
    them, and leaves Ctrl-C and SIGTERM to the ingesting process; in-process decoding (owner 0)
    leaves the process (its threads, its signal handlers) as it is."""
    import torch

    from index import ingest as ig

    calls: list[str] = []
    monkeypatch.setattr(ig, "tune_allocator", lambda: calls.append("malloc"))
    monkeypatch.setattr(ig, "_exit_with", lambda owner: calls.append(f"watch {owner}"))
    monkeypatch.setattr(ig, "ignore_stop_signals", lambda: calls.append("no signals"))
    threads = torch.get_num_threads()
    pre = {"image_size": 32, "mean": 0.5, "std": 0.25, "window": None, "channels": 3}
    try:
        ig._init_worker(ig.KnownHashes(), pre, owner=0)
        assert calls == [] and torch.get_num_threads() == threads
        ig._init_worker(ig.KnownHashes(), pre, owner=4242)
        assert calls == ["watch 4242", "no signals", "malloc"]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_plan_workers_chooses_by_measured_costs(monkeypatch):
    import torch

    from index import ingest as ig
    from index.ingest import Plan

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(ig, "available_cpus", lambda: 2)
    # encoding costs more than decoding (ResNet-18 on 2 cores): lockstep, both cores decode a
    # batch, then both encode it: 1 / (5.1 / 2 + 12.8) ms beats 1 / (5.1 + 12.8) in-process
    plan = ig.plan_workers(None, cpu, (5.1e-3, 12.8e-3))
    assert plan == Plan(2, 2, lockstep=True) and plan.schedule == "lockstep"
    assert ig.plan_workers(None, cpu, (4.9e-3, 3.6e-3)) == Plan(2, 2, lockstep=True)
    assert ig.plan_workers(1, cpu, (5.1e-3, 12.8e-3)) == Plan(1, 1)  # an explicit count wins
    monkeypatch.setattr(ig, "available_cpus", lambda: 16)
    # many cores and a cheap encoder: streaming decode processes keep up and the rest encode
    # (4 / 6.3 ms < 12 / (16 x 1.2 ms)); lockstep would wait for the last process each batch
    assert ig.plan_workers(None, cpu, (6.3e-3, 1.2e-3)) == Plan(4, 12)
    assert ig.plan_workers(None, gpu, (6.3e-3, 1.2e-3)).workers == 15  # costs: CPU plans only


def test_probe_costs_measures_decode_and_encode(archive, tiny_model):
    from index import ingest as ig
    from vlm.inference import Encoder

    enc = Encoder(str(tiny_model))
    paths = sorted(str(p) for p in (archive / "dicom").glob("s*.dcm"))[:ig.PROBE_FILES]
    decode, encode = ig.probe_costs(enc, paths, enc.model.config.preprocess)
    assert 0 < decode < 5 and 0 < encode < 5
    bad = [str(archive / "dicom" / "notes.dcm")] * 3
    assert ig.probe_costs(enc, bad, enc.model.config.preprocess) is None


def test_known_hashes_travel_as_prefixes_and_a_collision_is_decoded(archive, tiny_model,
                                                                      tmp_path, monkeypatch):
    import hashlib

    from index.ingest import KnownHashes, ingest
    from vlm.inference import Encoder

    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(100)]
    known = KnownHashes(digests[:50])
    assert all(d in known for d in digests[:50]) and not any(d in known for d in digests[50:])
    assert len(known) == 50 and known.prefixes.nbytes == 8 * 50
    assert "a non-hex id" in KnownHashes(["a non-hex id"]) and "other" not in known
    # every file looks known to the decoder, as a prefix collision would make a new file look:
    # the ingesting process checks the full digests and decodes the new files itself
    monkeypatch.setattr(KnownHashes, "__contains__", lambda self, digest: True)
    report = ingest(Encoder(str(tiny_model)), archive, tmp_path / "idx", workers=0,
                    progress=False, batch_size=4)
    assert report.added == 24 and report.already_indexed == 0
    assert sorted(Path(f["path"]).name for f in report.failed) == ["notes.dcm", "truncated.dcm"]


def test_lockstep_schedule_builds_the_same_index_as_in_process_decoding(archive, tiny_model,
                                                                        tmp_path, monkeypatch):
    """Lockstep (decode processes take turns with the encoder, one batch at a time, and the
    previous batch is recorded while they decode) must index exactly what in-process decoding
    does: every good image once with the same vectors and regions, each bad file reported."""
    from index import ingest as ig
    from index.folder import IndexFolder
    from vlm.inference import Encoder

    enc = Encoder(str(tiny_model))
    plain = ig.ingest(enc, archive, tmp_path / "plain", workers=0, progress=False,
                      batch_size=4)
    assert plain.schedule == "in-process"
    monkeypatch.setattr(ig, "plan_workers", lambda *a, **k: ig.Plan(2, 1, lockstep=True))
    # batches of 5 against 2 processes: uneven shares, and the two bad files fall inside batches
    turns = ig.ingest(enc, archive, tmp_path / "turns", progress=False, batch_size=5,
                      save_every=8)
    assert turns.schedule == "lockstep" and turns.plan == [2, 1]
    assert turns.added == plain.added == 24 and turns.regions == plain.regions > 0
    names = sorted(Path(f["path"]).name for f in turns.failed)
    assert names == sorted(Path(f["path"]).name for f in plain.failed) == ["notes.dcm",
                                                                           "truncated.dcm"]

    def by_hash(folder: Path) -> dict[str, np.ndarray]:
        ix = IndexFolder.open(folder)
        try:
            ids = ix.collection("image").ids()
            items = ix.catalog.get_many(ids.tolist())
            vectors = ix.collection("image").vectors(ids)
            return {it.content_hash: v for it, v in zip(items, vectors, strict=True)}
        finally:
            ix.close()

    a, b = by_hash(tmp_path / "plain"), by_hash(tmp_path / "turns")
    assert sorted(a) == sorted(b) and len(a) == 24
    for digest, vector in a.items():
        np.testing.assert_allclose(b[digest], vector, atol=2e-3)
    again = ig.ingest(enc, archive, tmp_path / "turns", progress=False, batch_size=5)
    assert again.added == 0 and again.already_indexed == 24


def test_decoded_pixels_are_one_channel_and_the_model_input_repeats_it(archive, tiny_model):
    from index import ingest as ig
    from vlm.inference import Encoder

    enc = Encoder(str(tiny_model))
    pre = enc.model.config.preprocess
    path = str(sorted((archive / "dicom").glob("s*.dcm"))[0])
    out = ig.decode_file(path, "digest", pre)
    assert out["pixels"].shape == (1, pre.image_size, pre.image_size)
    assert out["pixels"].dtype == np.float16
    x = ig.model_input([out["pixels"], out["pixels"]], enc)
    assert x.shape == (2, pre.channels, pre.image_size, pre.image_size)
    assert x.dtype == enc.dtype and bool((x[:, 0] == x[:, -1]).all())


def test_a_bf16_build_stores_vectors_close_to_the_fp32_ones(archive, tiny_model, tmp_path,
                                                             capsys):
    """``radlens index build --amp bf16``: images encoded under bf16 autocast, recorded in the
    report; each vector within a small angle of the fp32 build's."""
    from index import ingest as ig
    from index.folder import IndexFolder
    from ui.cli import main
    from vlm.inference import Encoder

    plain = ig.ingest(Encoder(str(tiny_model)), archive, tmp_path / "fp32", workers=0,
                      progress=False, batch_size=4)
    assert plain.amp is None
    code = main(["index", "build", "--model", str(tiny_model), "--source", str(archive),
                 "--out", str(tmp_path / "bf16"), "--no-progress", "--workers", "0",
                 "--batch-size", "4", "--amp", "bf16"])
    assert code == 3  # the two bad files
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["amp"] == "bf16" and summary["added"] == 24

    def by_hash(folder: Path) -> dict[str, np.ndarray]:
        ix = IndexFolder.open(folder)
        try:
            ids = ix.collection("image").ids()
            items = ix.catalog.get_many(ids.tolist())
            return {it.content_hash: v for it, v in
                    zip(items, ix.collection("image").vectors(ids), strict=True)}
        finally:
            ix.close()

    a, b = by_hash(tmp_path / "fp32"), by_hash(tmp_path / "bf16")
    assert sorted(a) == sorted(b)
    cosines = [float(np.dot(a[h], b[h]) / np.linalg.norm(a[h]) / np.linalg.norm(b[h]))
               for h in a]
    assert min(cosines) > 0.995
    assert any(not np.array_equal(a[h], b[h]) for h in a)  # really encoded another way
    # unit before their float16 storage, whose rounding moves a norm by at most 2**-11 (a
    # vector normalised in bf16 is off by up to 3e-3)
    assert np.allclose([np.linalg.norm(v) for v in b.values()], 1.0, atol=2.0 ** -11)


def test_an_index_kept_inside_its_archive_is_not_indexed_itself(archive, tiny_model, tmp_path):
    """--out inside --source: a second build used to add the index's own JPEG thumbnails as
    new images, and every build listed its catalog and vector files as failures."""
    import shutil

    from index import ingest as ig
    from index.folder import IndexFolder
    from index.volumes import find_volumes
    from vlm.errors import RadLensError
    from vlm.inference import Encoder

    src = tmp_path / "archive"
    shutil.copytree(archive, src)
    enc = Encoder(str(tiny_model))
    first = ig.ingest(enc, src, src / "index", workers=0, progress=False, batch_size=4)
    again = ig.ingest(enc, src, src / "index", workers=0, progress=False, batch_size=4)
    assert first.added == 24 and (again.added, again.already_indexed) == (0, 24)
    for report in (first, again):
        assert sorted(Path(f["path"]).name for f in report.failed) == ["notes.dcm",
                                                                       "truncated.dcm"]
    ix = IndexFolder.open(src / "index")
    assert ix.catalog.count("image") == 24
    ix.close()
    assert not any("index" in s.path.parts for s in find_volumes(src))
    with pytest.raises(RadLensError, match="is a RadLens index, not an archive"):
        ig.ingest(enc, src / "index", tmp_path / "other", workers=0, progress=False)
    with pytest.raises(RadLensError, match="batch size and save interval must be at least 1"):
        ig.ingest(enc, src, tmp_path / "other", batch_size=0, progress=False)
    assert not (tmp_path / "other").exists()  # refused before anything was created


def test_a_dead_decode_pool_saves_what_was_decoded_and_says_so(archive, tiny_model, tmp_path,
                                                                monkeypatch):
    """The fork server behind the decode processes dies (SIGTERM to the process group kills it;
    so would the OOM killer): the lockstep build's next submit raised BrokenProcessPool, an
    internal error that dropped everything since the last save."""
    import signal
    from multiprocessing import forkserver

    from index import ingest as ig
    from index.folder import IndexFolder
    from vlm.errors import RadLensError
    from vlm.inference import Encoder

    def kill_the_fork_server() -> None:
        os.kill(forkserver._forkserver._forkserver_pid, signal.SIGKILL)

    monkeypatch.setattr(ig, "plan_workers", lambda *a, **k: ig.Plan(2, 1, lockstep=True))
    monkeypatch.setattr(ig, "interrupt_for_test", kill_the_fork_server)
    monkeypatch.setenv("RADLENS_TEST_INTERRUPT_AFTER_BATCHES", "2")
    enc = Encoder(str(tiny_model))
    with pytest.raises(RadLensError, match=r"a decode process died .*new images saved") as err:
        ig.ingest(enc, archive, tmp_path / "idx", batch_size=4, progress=False)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    report = json.loads((tmp_path / "idx" / "ingest_report.json").read_text())
    ix = IndexFolder.open(tmp_path / "idx")
    assert 8 <= ix.catalog.count("image") == report["added"] == report["saved"] < 24
    ix.close()
    monkeypatch.delenv("RADLENS_TEST_INTERRUPT_AFTER_BATCHES")
    rest = ig.ingest(enc, archive, tmp_path / "idx", batch_size=4, progress=False)
    assert rest.added == 24 - report["added"]  # a new fork server; nothing twice
