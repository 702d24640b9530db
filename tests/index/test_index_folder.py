from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index import persist
from index.errors import IndexBusyError, IndexCorruptError, IndexFormatError
from index.folder import IndexFolder
from tests.index.conftest import clustered
from vlm.errors import ConfigError, RadLensError

DIM = 32
ROOT = Path(__file__).resolve().parents[2]


def _items(n: int, start: int = 0) -> list[dict]:
    return [{"modality": ["CR", "CT"][i % 2], "body_part": "CHEST", "year": 2000 + i % 10,
             "instance": f"im-{start + i:020x}", "content_hash": f"{start + i:064x}"}
            for i in range(n)]


def _new(path: Path, n: int = 200) -> IndexFolder:
    ix = IndexFolder.create(path, model_name="lrclr", config_hash="abc123", dim=DIM,
                            preprocessing={"size": 224})
    ix.add("image", clustered(n, DIM, seed=1), _items(n))
    ix.save()
    return ix


def test_roundtrip_info_and_hardlinks(tmp_path):
    ix = _new(tmp_path / "ix")
    region = ix.collection("region", factory="IVF16,SQ8")
    rx = clustered(600, DIM, seed=2)
    ids = ix.add("region", rx, [{**it, "box": (0, 0, 8, 8)} for it in _items(600, 200)])
    assert ids[0] == 200 and region.index.is_trained
    ix.remove([3, 4, 205])
    q = clustered(5, DIM, seed=3)
    before = [ix.search(c, q, 5) for c in ("image", "region")]
    gen = ix.save()
    ix.close()
    r = IndexFolder.open(tmp_path / "ix", expect_model="lrclr", expect_config_hash="abc123")
    assert r.generation == gen and r.collections() == ["image", "region"]
    after = [r.search(c, q, 5) for c in ("image", "region")]
    for b, a in zip(before, after, strict=True):
        assert [[(h.id, round(h.score, 5)) for h in row] for row in b] == \
               [[(h.id, round(h.score, 5)) for h in row] for row in a]
    assert r.search("region", q[0], 3)[0][0].item.box == (0, 0, 8, 8)
    info = r.info()
    json.dumps(info)
    assert info["model_name"] == "lrclr" and info["dim"] == DIM
    assert info["collections"]["image"]["count"] == 198
    assert info["collections"]["region"]["factory"] == "IVF16,SQ8"
    assert info["catalog_rows"] == 797 and info["preprocessing"] == {"size": 224}
    manifest = json.loads((tmp_path / "ix" / gen / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"catalog.sqlite", "image.faiss", "image.ids.npy"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    r.close()
    w = IndexFolder.open(tmp_path / "ix", mode="w")
    w.add("region", clustered(3, DIM, seed=4), _items(3, 900))
    gen2 = w.save()  # the unchanged "image" collection is hard-linked, not rewritten
    a, b = (tmp_path / "ix" / g / "image.vectors.f16.npy" for g in (gen, gen2))
    assert a.stat().st_ino == b.stat().st_ino
    assert w.search("region", q, 1)[0][0].id >= 0 and len(w.collection("region")) == 602
    w.close()


def test_wrong_model_refused_in_one_line(tmp_path):
    _new(tmp_path / "ix").close()
    with pytest.raises(ConfigError) as err:
        IndexFolder.open(tmp_path / "ix", expect_model="clear", expect_config_hash="def456")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"index {tmp_path / 'ix'} was built with model lrclr (config abc123); you "
                   "asked for model clear (def456): rebuild the index or pass the checkpoint "
                   "folder it was built with")  # the config name alone is no remedy
    with pytest.raises(ConfigError):
        IndexFolder.open(tmp_path / "ix", expect_config_hash="zzz")
    IndexFolder.open(tmp_path / "ix", expect_model="lrclr").close()


def test_not_an_index_and_wrong_dim(tmp_path):
    with pytest.raises(IndexFormatError, match="not a RadLens index"):
        IndexFolder.open(tmp_path)
    with pytest.raises(IndexFormatError, match="not a RadLens index"):
        IndexFolder.open(tmp_path, mode="w")  # a writer too, and it leaves no LOCK file behind
    assert not any(tmp_path.iterdir())
    ix = _new(tmp_path / "ix")
    with pytest.raises(RadLensError) as err:
        ix.search("image", np.ones(DIM + 1), 3)
    assert "32-dimensional" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RadLensError, match="already holds an index"):
        IndexFolder.create(tmp_path / "ix", model_name="m", config_hash="c", dim=DIM)


@pytest.mark.parametrize("victim", ["image.vectors.f16.npy", "image.faiss", "catalog.sqlite"])
def test_corrupt_file_detected(tmp_path, victim):
    _new(tmp_path / "ix").close()
    path = tmp_path / "ix" / persist.read_current(tmp_path / "ix") / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError) as err:
        IndexFolder.open(tmp_path / "ix")
    assert victim in str(err.value) and "\n" not in str(err.value)
    path.unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        IndexFolder.open(tmp_path / "ix")


def test_unverified_open_of_truncated_index_is_one_line_error(tmp_path):
    _new(tmp_path / "ix").close()
    path = tmp_path / "ix" / persist.read_current(tmp_path / "ix") / "image.faiss"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(IndexCorruptError) as err:
        IndexFolder.open(tmp_path / "ix", verify=False)
    assert "could not be read" in str(err.value) and "\n" not in str(err.value)


def test_second_writer_refused_then_waits(tmp_path):
    ix = _new(tmp_path / "ix")
    t = time.monotonic()
    with pytest.raises(IndexBusyError) as err:
        IndexFolder.open(tmp_path / "ix", mode="w")
    assert time.monotonic() - t < 1 and "\n" not in str(err.value)
    assert f"pid {os.getpid()}" in str(err.value)
    reader = IndexFolder.open(tmp_path / "ix")  # readers are never blocked
    with pytest.raises(RadLensError, match="read-only"):
        reader.add("image", clustered(1, DIM), _items(1))
    threading.Timer(0.5, ix.close).start()
    w2 = IndexFolder.open(tmp_path / "ix", mode="w", lock_timeout=10)
    assert len(w2.collection("image")) == 200
    w2.close()
    reader.close()


CHILD = """
import sys, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from conftest import clustered
from index.folder import IndexFolder
path, rounds, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ix = IndexFolder.open(path, mode="w", lock_timeout=30)
for r in range(rounds):
    start = ix.catalog.next_id()
    items = [{{"instance": f"im-{{start + i:020x}}"}} for i in range(n)]
    ix.add("image", clustered(n, {dim}, seed=start), items)
    ix.save()
    print("saved", len(ix.collection("image")), flush=True)
"""


def _child(path: Path, rounds: int, n: int, **env: str) -> subprocess.Popen:
    code = CHILD.format(root=str(ROOT), tests=str(Path(__file__).parent), dim=DIM)
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(rounds), str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _consistent(path: Path) -> int:
    r = IndexFolder.open(path)  # verifies every checksum
    n = len(r.collection("image"))
    assert r.catalog.count() == n and r.info()["collections"]["image"]["count"] == n
    ids = r.collection("image").ids()
    assert sorted(ids.tolist()) == r.catalog.filter_ids("image").tolist()
    r.close()
    return n


def test_sigkill_between_write_and_switch_keeps_last_generation(tmp_path):
    _new(tmp_path / "ix").close()
    child = _child(tmp_path / "ix", 1, 500, **{persist.PAUSE_ENV: "60"})
    assert child.stderr is not None
    line = child.stderr.readline()
    assert "paused before switching" in line, line + child.stderr.read()
    assert any(p.name.endswith(".tmp") for p in (tmp_path / "ix").iterdir())
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert _consistent(tmp_path / "ix") == 200  # the previous complete generation
    w = IndexFolder.open(tmp_path / "ix", mode="w")  # the lock died with the process
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ix").iterdir())
    w.add("image", clustered(10, DIM, seed=9), _items(10, 5000))
    w.save()
    w.close()
    assert _consistent(tmp_path / "ix") == 210


def test_sigkill_at_random_moments_never_breaks_the_index(tmp_path):
    _new(tmp_path / "ix").close()
    rng = np.random.default_rng(0)
    for _ in range(3):
        child = _child(tmp_path / "ix", 200, 2000)
        assert child.stdout is not None
        first = child.stdout.readline()  # it is now adding and saving in a loop
        assert first.startswith("saved"), first + (child.stderr.read() if child.stderr else "")
        time.sleep(float(rng.uniform(0.0, 0.4)))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        printed = [int(line.split()[1]) for line in [first, *child.stdout.read().splitlines()]]
        n = _consistent(tmp_path / "ix")
        # the last save it reported is durable; a save it had no time to report may be too
        assert n in (printed[-1], printed[-1] + 2000), (n, printed)


def test_readers_see_complete_generations_during_writes(tmp_path):
    ix = _new(tmp_path / "ix", n=100)
    errors: list[BaseException] = []
    stop = threading.Event()
    old_reader = IndexFolder.open(tmp_path / "ix")

    def read() -> None:
        try:
            r = IndexFolder.open(tmp_path / "ix")
            while not stop.is_set():
                n = len(r.collection("image"))
                assert n % 100 == 0 and r.catalog.count() == n
                hits = r.search("image", clustered(3, DIM, seed=n), 5, modality="CT")
                assert all(h.item is not None and h.item.modality == "CT"
                           for row in hits for h in row)
                assert all(len(row) == 5 for row in hits)
                r.reload()
            r.close()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for round_ in range(1, 10):
        ix.add("image", clustered(100, DIM, seed=round_), _items(100, 1000 * round_))
        ix.save()
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert len(old_reader.collection("image")) == 100  # its generation was deleted meanwhile
    assert old_reader.catalog.count() == 100
    assert len(old_reader.search("image", clustered(1, DIM), 5)[0]) == 5
    assert not (tmp_path / "ix" / old_reader.generation).exists()
    old_reader.close()
    ix.close()


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("array", [np.arange(12, dtype=np.int64).reshape(3, 4),
                                   np.ones((5, 3), np.float16), np.array([True, False]),
                                   np.asfortranarray(np.arange(6.0).reshape(2, 3))])
def test_read_array_reads_what_write_array_and_numpy_write(tmp_path, array, mmap):
    persist.write_array(tmp_path / "a.npy", array)
    np.save(tmp_path / "b.npy", array)
    for name in ("a.npy", "b.npy"):
        got = persist.read_array(tmp_path / name, mmap=mmap)
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)


def test_read_array_refuses_a_truncated_file(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(100, dtype=np.int64))
    data = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(data[:-8])
    with pytest.raises(IndexCorruptError, match="truncated"):
        persist.read_array(tmp_path / "a.npy")


def test_an_index_with_no_vectors_yet_says_so(tmp_path):
    """A reader that opens an index whose build has not saved its first images yet."""
    writer = IndexFolder.create(tmp_path / "ix", model_name="m", config_hash="c", dim=DIM)
    reader = IndexFolder.open(tmp_path / "ix")
    try:
        with pytest.raises(RadLensError, match=r"holds no vectors yet \(a build may still be "
                                               r"running"):
            reader.collection("image")
    finally:
        reader.close()
    writer.add("image", clustered(4, DIM, seed=1), _items(4))
    writer.save()
    writer.close()
    reader = IndexFolder.open(tmp_path / "ix")
    with pytest.raises(RadLensError, match=r"has no collection 'region' \(it has: image\)"):
        reader.collection("region")
    reader.close()


def test_a_watching_reader_follows_other_writers_and_keeps_a_good_generation(tmp_path,
                                                                            caplog,
                                                                            monkeypatch):
    """``watch()``: a reader (the app) picks up rows another process added and drops rows it
    erased, without a restart; a damaged new generation is logged and the last good one kept
    for searching."""
    ix = _new(tmp_path / "ix")
    ix.close()
    reader = IndexFolder.open(tmp_path / "ix")
    reader.watch(interval=0.02)
    reader.watch(interval=0.02)  # idempotent
    q = clustered(1, DIM, seed=7)[0]

    def until(check, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, "the reader did not follow"
            time.sleep(0.02)

    try:
        with IndexFolder.open(tmp_path / "ix", mode="w") as w:
            new = w.add("image", q[None], _items(1, 500))
            w.save()
        until(lambda: reader.catalog.count("image") == 201)
        assert reader.search("image", q, 1)[0][0].id == int(new[0])
        with IndexFolder.open(tmp_path / "ix", mode="w") as w:
            w.remove(new)
            w.save()
        until(lambda: reader.catalog.count("image") == 200)
        assert all(h.id != int(new[0]) for h in reader.search("image", q, 5)[0])
        good, verify_files = reader.generation, persist.verify_files

        def damaged_if_new(gen_dir, manifest):  # the next generation fails its checksums
            if gen_dir.name != good:
                raise IndexCorruptError(f"{gen_dir}/image.ids.npy: checksum mismatch")
            return verify_files(gen_dir, manifest)

        monkeypatch.setattr(persist, "verify_files", damaged_if_new)
        with caplog.at_level("WARNING", logger="index.folder"):
            with IndexFolder.open(tmp_path / "ix", mode="w", verify=False) as w:
                w.add("image", q[None], _items(1, 600))
                w.save()
            until(lambda: any("was not loaded" in r.getMessage() for r in caplog.records))
        assert reader.generation == good and len(reader.search("image", q, 3)[0]) == 3
    finally:
        reader.close()
    assert reader._watcher is None  # close() stopped it
