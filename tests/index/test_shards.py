"""Sharded builds and merges (index/shard.py, index/merge.py, index/distributed.py): N shard
builds of one archive merged into one index hold exactly what one build of it holds; a merge
refuses other models and other site secrets, passes over a damaged shard, survives a SIGKILL
and adds nothing when rerun; engines (local threads, a Dask cluster) run the shard builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index.folder import IndexFolder
from index.merge import KILL_ENV, merge_indexes
from index.shard import Shard, shard_key
from tests.index.dicomweb_server import Archive, Server
from tests.tiny_cxr import make_tiny_cxr
from vlm.errors import ConfigError, RadLensError

N = 18  # good images
CLI = [sys.executable, "-c", "import sys; from ui.cli import main; sys.exit(main())"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _summary(proc: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = make_tiny_cxr(tmp_path_factory.mktemp("shard_archive"), n=N, size=48)
    good = sorted((root / "dicom").iterdir())
    (root / "dicom" / "truncated.dcm").write_bytes(good[0].read_bytes()[:600])
    (root / "dicom" / "sub").mkdir()
    shutil.copy(good[1], root / "dicom" / "sub" / "copy_of_s001.dcm")  # same bytes, other path
    (root / "manifest.jsonl").unlink()  # a plain folder: walk every file
    return root


def _build(model: Path, source: Path | str, out: Path, *extra: str,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return _cli("index", "build", "--model", str(model), "--source", str(source), "--out",
                str(out), "--no-progress", "--workers", "0", "--batch-size", "4", *extra,
                env=env)


@pytest.fixture(scope="module")
def whole(archive, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "idx"
    done = _build(tiny_model, archive, out)
    assert done.returncode == 3, done.stderr[-1500:]  # the truncated file
    return out


@pytest.fixture(scope="module")
def shards(archive, tiny_model, tmp_path_factory) -> list[Path]:
    work = tmp_path_factory.mktemp("shards")
    outs = []
    for i in range(3):
        out = work / f"s{i}"
        done = _build(tiny_model, archive, out, "--shard", f"{i}/3")
        assert done.returncode in (0, 3), done.stderr[-1500:]
        assert _summary(done)["shard"] == f"{i}/3"
        outs.append(out)
    return outs


def _by_hash(folder: Path, collection: str = "image") -> dict[str, tuple[object, np.ndarray]]:
    """content hash -> (catalog row, stored vector) of one collection."""
    ix = IndexFolder.open(folder)
    try:
        ids = ix.catalog.filter_ids(collection).tolist()
        coll = ix.collection(collection, create=False)
        vecs = coll.vectors(ids)
        return {it.content_hash: (it, v)
                for it, v in zip(ix.catalog.get_many(ids), vecs, strict=True)}
    finally:
        ix.close()


# ------------------------------------------------------------------ the split itself


def test_shard_spec_parses_and_parts_split_every_key_once() -> None:
    assert Shard.parse(" 2 / 5 ") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"
    for bad in ("5/5", "-1/3", "1", "a/b", "0/0"):
        with pytest.raises(RadLensError, match="shard"):
            Shard.parse(bad)
    keys = [f"dicom/p{i:04d}/s{i % 7}.dcm" for i in range(3000)]
    for n in (1, 2, 3, 7):
        owners = [[s for s in range(n) if Shard(s, n).holds(k)] for k in keys]
        assert all(len(o) == 1 for o in owners)  # disjoint, and together they cover
        sizes = np.bincount([o[0] for o in owners], minlength=n)
        assert sizes.min() > 0.8 * len(keys) / n  # and roughly even
    # the key is the path relative to the source: the same on any mount point
    assert shard_key("/mnt/a/archive/x/y.dcm", "/mnt/a/archive") == "x/y.dcm"
    assert shard_key("/data/archive/x/y.dcm", "/data/archive/") == "x/y.dcm"


def test_shards_are_disjoint_and_together_hold_the_archive(whole, shards) -> None:
    parts = [set(_by_hash(s)) for s in shards]
    assert sum(len(p) for p in parts) >= N  # the copy under sub/ may land in a second shard
    assert set().union(*parts) == set(_by_hash(whole))
    # the truncated file is read, and reported, by the one shard that holds it
    reports = [json.loads((s / "ingest_report.json").read_text()) for s in shards]
    named = [r["shard"] for r in reports
             if any(Path(f["path"]).name == "truncated.dcm" for f in r["failed"])]
    assert len(named) == 1
    assert Shard.parse(named[0]).holds("dicom/truncated.dcm")


# ------------------------------------------------------------------ merging


def test_merged_shards_equal_one_build_and_a_rerun_adds_nothing(whole, shards, tmp_path
                                                                 ) -> None:
    out = tmp_path / "merged"
    done = _cli("index", "merge", "--out", str(out), *map(str, shards), "--no-progress")
    assert done.returncode == 3, done.stderr[-1500:]  # the truncated file, listed once
    summary = _summary(done)
    assert summary["added"]["image"] == N and summary["failed"] == 1
    report = json.loads((out / "merge_report.json").read_text())
    assert [Path(f["path"]).name for f in report["failed"]] == ["truncated.dcm"]

    one, merged = _by_hash(whole), _by_hash(out)
    assert set(merged) == set(one) and len(merged) == N
    for digest, (item, vec) in merged.items():
        ref_item, ref_vec = one[digest]
        assert np.allclose(vec, ref_vec, atol=2e-3)
        assert (item.study, item.instance, item.source_uri) == (ref_item.study,
                                                                 ref_item.instance,
                                                                 ref_item.source_uri)
        assert item.thumbnail and (out / item.thumbnail).is_file()
    # regions follow their images, renumbered to the merged ids
    regions = _by_hash(out, "region")
    assert len(regions) == len(_by_hash(whole, "region")) > 0
    ix = IndexFolder.open(out)
    try:
        parents = {int(it.extra["parent"]) for it, _ in regions.values()}
        assert all(ix.catalog.get(p).collection == "image" for p in parents)  # type: ignore
        assert ix.manifest["pseudonym_key"].startswith("key-")
    finally:
        ix.close()

    # the same search over the merged index and the single build scores every image alike
    # (an untrained model leaves near-ties, whose order float16 rounding may flip)
    from index.engine import Engine

    a, b = Engine.open(str(whole)), Engine.open(str(out))
    try:
        scores = [{h.item.content_hash: h.score
                   for h in e.search_text("opacity in the left lung", k=N)} for e in (a, b)]
        assert scores[0].keys() == scores[1].keys() and len(scores[0]) == N
        assert all(abs(scores[0][k] - scores[1][k]) < 2e-3 for k in scores[0])
    finally:
        a.index.close()
        b.index.close()

    again = merge_indexes(shards, out)
    assert again.added == {"image": 0, "region": 0}
    assert again.duplicates["image"] == sum(len(_by_hash(s)) for s in shards)
    assert len(_by_hash(out)) == N


def test_merge_refuses_another_model_or_site_secret_and_leaves_the_target(
        archive, shards, tiny_model, tmp_path) -> None:
    from vlm.models import create_model, get_tokenizer, save_checkpoint

    out = tmp_path / "merged"
    merge_indexes(shards[:1], out)
    before = (out / "CURRENT").read_text()

    other_model = tmp_path / "other_model"
    import torch

    torch.manual_seed(7)
    save_checkpoint(create_model("lrclr-tiny"), other_model, get_tokenizer("lrclr-tiny"),
                    card="#")
    foreign = tmp_path / "foreign"
    assert _build(other_model, archive, foreign, "--shard", "1/3").returncode in (0, 3)
    done = _cli("index", "merge", "--out", str(out), str(shards[1]), str(foreign))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "only indexes of the same model" in done.stderr

    secret = tmp_path / "secret"
    other = {"RADLENS_SITE_SECRET": "another-site-secret-0123456789"}
    assert _build(tiny_model, archive, secret, "--shard", "2/3", env=other).returncode in (0, 3)
    with pytest.raises(ConfigError, match="another site secret"):
        merge_indexes([shards[1], secret], out)
    assert (out / "CURRENT").read_text() == before  # untouched by both refusals
    assert len(_by_hash(out)) == len(_by_hash(shards[0]))


def test_adding_under_another_site_secret_is_refused(archive, tiny_model, tmp_path) -> None:
    out = tmp_path / "idx"
    assert _build(tiny_model, archive, out, "--shard", "0/3").returncode in (0, 3)
    before = (out / "CURRENT").read_text()
    done = _build(tiny_model, archive, out, env={"RADLENS_SITE_SECRET": "x" * 32})
    assert done.returncode == 2 and "another site secret" in done.stderr
    assert done.stderr.count("\n") == 1
    assert (out / "CURRENT").read_text() == before


def test_a_damaged_shard_is_passed_over_and_listed(shards, tmp_path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(shards[1], damaged)
    gen = damaged / (damaged / "CURRENT").read_text().strip()
    vec = gen / "image.vectors.f16.npy"
    data = bytearray(vec.read_bytes())
    data[-8:] = b"\xff" * 8
    vec.write_bytes(bytes(data))
    not_an_index = tmp_path / "empty"
    not_an_index.mkdir()
    out = tmp_path / "merged"
    report = merge_indexes([shards[0], damaged, not_an_index, shards[2]], out)
    assert sorted(Path(b["path"]).name for b in report.bad_shards) == ["damaged", "empty"]
    assert any("checksum" in b["reason"] or "sha256" in b["reason"] for b in report.bad_shards)
    assert len(report.shards) == 2
    expect = set(_by_hash(shards[0])) | set(_by_hash(shards[2]))
    assert set(_by_hash(out)) == expect


def test_a_killed_merge_leaves_the_last_shard_saved_and_a_rerun_completes(
        whole, shards, tmp_path) -> None:
    out = tmp_path / "merged"
    killed = _cli("index", "merge", "--out", str(out), *map(str, shards), "--no-progress",
                  env={KILL_ENV: "2"})
    assert killed.returncode == -9
    part = set(_by_hash(out))
    assert part == set(_by_hash(shards[0])) | set(_by_hash(shards[1]))
    done = _cli("index", "merge", "--out", str(out), *map(str, shards), "--no-progress")
    assert done.returncode == 3, done.stderr[-1500:]
    assert set(_by_hash(out)) == set(_by_hash(whole)) and len(_by_hash(out)) == N


# ------------------------------------------------------------------ engines


def test_local_engine_builds_the_shards_and_merges_them(archive, whole, tiny_model, tmp_path
                                                         ) -> None:
    out, work = tmp_path / "idx", tmp_path / "work"
    done = _build(tiny_model, archive, out, "--shards", "3", "--engine", "local:2",
                  "--work-dir", str(work))
    assert done.returncode == 3, done.stderr[-1500:]  # the truncated file
    summary = _summary(done)
    assert summary["added"]["image"] == N and summary["unfinished"] == []
    assert sum("truncated.dcm" in line for line in done.stderr.splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == [f"shard-0000{i}-of-00003"
                                                      for i in range(3)]
    assert set(_by_hash(out)) == set(_by_hash(whole))
    rerun = _build(tiny_model, archive, out, "--shards", "3", "--engine", "local:2",
                   "--work-dir", str(work))
    assert _summary(rerun)["added"] == {"image": 0, "region": 0}


def test_an_unfinished_shard_is_reported_and_the_rest_merged(archive, tiny_model, tmp_path
                                                              ) -> None:
    from index.distributed import build_distributed, run_shard

    def flaky(fn, tasks):  # shard 1 fails as a worker whose source is not mounted would
        tasks = [dict(t, source="/nonexistent/archive") if t["shard"] == "1/3" else t
                 for t in tasks]
        return [fn(t) for t in tasks]

    report = build_distributed(archive, tmp_path / "idx", shards=3, work_dir=tmp_path / "w",
                               run=flaky, model=str(tiny_model), workers=0)
    assert report.unfinished == ["1/3"]
    failed = next(r for r in report.shards if r["shard"] == "1/3")
    assert failed["rc"] == 2 and "no such file or folder" in failed["stderr"]
    assert len(report.merge["shards"]) == 2
    assert run_shard  # the function every engine ships to its workers


def test_unknown_engines_are_one_line() -> None:
    from index.distributed import runner

    for bad, words in (("hadoop", "unknown --engine"), ("local:x", "local:P"),
                       ("dask", "needs the scheduler")):
        with pytest.raises(RadLensError, match=words):
            runner(bad)


def test_dask_engine_runs_the_shard_builds(archive, whole, tiny_model, tmp_path) -> None:
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    from index.distributed import build_distributed

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        engine = f"dask:{cluster.scheduler_address}"
        report = build_distributed(archive, tmp_path / "idx", shards=3,
                                   work_dir=tmp_path / "w", engine=engine,
                                   model=str(tiny_model), workers=0)
    assert report.unfinished == [] and report.merge["added"]["image"] == N
    assert len({r["shard"] for r in report.shards}) == 3
    assert set(_by_hash(tmp_path / "idx")) == set(_by_hash(whole))


# ------------------------------------------------------------------ DICOMweb and volumes


def test_dicomweb_shards_split_by_study(archive, tiny_model, tmp_path) -> None:
    from index.ingest import ingest
    from vlm.inference import Encoder

    files = sorted((archive / "dicom").glob("s*.dcm"))[:9]
    store = Archive()
    for f in files:
        store.add_file(f)
    encoder = Encoder(str(tiny_model))
    with Server(store) as url:
        outs = []
        for i in range(3):
            outs.append(tmp_path / f"w{i}")
            ingest(encoder, url, outs[-1], workers=0, progress=False, shard=Shard(i, 3))
    # each instance was fetched by exactly one shard, the one that holds its study
    assert sorted(store.fetched.values()) == [1] * 9
    report = merge_indexes(outs, tmp_path / "merged")
    assert report.added["image"] == 9
    studies = [{it.study for it, _ in _by_hash(o).values()} if (o / "CURRENT").exists()
               and "image" in IndexFolder.open(o).collections() else set() for o in outs]
    assert sum(len(s) for s in studies) == len(set().union(*studies)) == 9


def test_volume_shards_merge_with_their_previews(tmp_path) -> None:
    from vlm.data.phantom_ct import generate_phantom_ct

    pct = tmp_path / "pct"
    generate_phantom_ct(pct, n=6, shape=(32, 32, 32), seed=3, workers=1)
    whole = tmp_path / "whole"
    assert _cli("index", "build", "--source", str(pct), "--out", str(whole), "--volume-model",
                "random:lecl-tiny", "--no-progress").returncode == 0
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"v{i}")
        done = _cli("index", "build", "--source", str(pct), "--out", str(outs[-1]),
                    "--volume-model", "random:lecl-tiny", "--shard", f"{i}/2", "--no-progress")
        assert done.returncode == 0, done.stderr[-1500:]
    report = merge_indexes(outs, tmp_path / "merged")
    assert report.added == {"volume": 6} and report.missing_files == 0
    merged, one = _by_hash(tmp_path / "merged", "volume"), _by_hash(whole, "volume")
    assert set(merged) == set(one)
    for digest, (item, vec) in merged.items():
        assert np.allclose(vec, one[digest][1], atol=2e-3)
        assert item.extra["location_labels"] == one[digest][0].extra["location_labels"]
        for rel in [item.thumbnail, item.extra["stack"],
                    *(s["preview"] for s in item.extra["salient"])]:
            assert (tmp_path / "merged" / rel).is_file()


@pytest.mark.parametrize("engine", ["ray", "spark:local[2]"])
def test_ray_and_spark_engines_run_the_shard_builds(engine, archive, whole, tiny_model,
                                                    tmp_path) -> None:
    """Not installed by the project (large; see the README): run where they are."""
    pytest.importorskip("ray" if engine == "ray" else "pyspark")
    if engine.startswith("spark") and not shutil.which("java"):
        pytest.skip("PySpark needs a Java runtime")
    from index.distributed import build_distributed

    report = build_distributed(archive, tmp_path / "idx", shards=2, work_dir=tmp_path / "w",
                               engine=engine, model=str(tiny_model), workers=0)
    assert report.unfinished == [] and report.merge["added"]["image"] == N
    assert set(_by_hash(tmp_path / "idx")) == set(_by_hash(whole))


def test_a_fixed_factory_is_retrained_on_all_merged_rows(tmp_path) -> None:
    from tests.index.conftest import clustered

    x = clustered(4000, 16, seed=9)
    parts = []
    for p in range(2):
        parts.append(tmp_path / f"p{p}")
        ix = IndexFolder.create(parts[-1], model_name="m", config_hash="c" * 16, dim=16)
        ix.collection("image", factory="IVF32_HNSW32,PQ4x4fsr")
        rows = [{"content_hash": f"{p}-{i}"} for i in range(2000)]
        ix.add("image", x[p * 2000:(p + 1) * 2000], rows)
        ix.save()
        ix.close()
    merge_indexes(parts, tmp_path / "merged")
    ix = IndexFolder.open(tmp_path / "merged")
    try:
        coll = ix.collection("image", create=False)
        assert coll.factory == "IVF32_HNSW32,PQ4x4fsr" and not coll.auto
        assert coll.built_for == 4000 and coll.index.ntotal == 4000
        hits = ix.search("image", x[:5], k=1)
        found = [h[0].item.content_hash for h in hits]
        assert sum(f == f"0-{i}" for i, f in enumerate(found)) >= 4  # approximate search
    finally:
        ix.close()


def test_images_and_volumes_sharded_together(tiny_model, tmp_path) -> None:
    """One --shards build with both models: the merged index has the image, region and volume
    collections, each with its own model, and the Engine searches both."""
    from index.engine import Engine
    from vlm.data.phantom_ct import generate_phantom_ct

    root = tmp_path / "archive"
    generate_phantom_ct(root / "ct", n=4, shape=(32, 32, 32), seed=4, workers=1)
    make_tiny_cxr(root / "cxr", n=6, size=48)
    out = tmp_path / "idx"
    done = _build(tiny_model, root, out, "--volume-model", "random:lecl-tiny", "--shards", "2",
                  "--engine", "local:2", "--work-dir", str(tmp_path / "w"))
    assert done.returncode == 0, done.stderr[-1500:]
    added = _summary(done)["added"]
    assert added["image"] >= 6 and added["volume"] == 4 and added["region"] > 0
    ix = IndexFolder.open(out)
    try:
        assert ix.collection_model("volume").model_name != ix.collection_model("image").model_name
    finally:
        ix.close()
    engine = Engine.open(str(out))
    try:
        assert engine.volumes is not None
        assert len(engine.search_text("opacity in the left lung", k=3)) == 3
    finally:
        engine.index.close()


def test_the_local_engine_gives_each_concurrent_shard_its_own_cpus() -> None:
    from index.distributed import runner

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs CPU affinity and two CPUs")
    mine = sorted(os.sched_getaffinity(0))
    got = runner("local:2")(lambda t: {"cpus": t["cpus"]}, [{"shard": f"{i}/4"}
                                                          for i in range(4)])
    shares = {tuple(r["cpus"]) for r in got}
    assert len(shares) == 2  # two slots, reused as shards finish
    a, b = shares
    assert not set(a) & set(b) and sorted(a + b) == mine
    one = runner("local:1")(lambda t: {"cpus": t["cpus"]}, [{"shard": "0/1"}])
    assert one[0]["cpus"] == mine
