from __future__ import annotations

import faiss
import numpy as np
import pytest

import index.factory as factory_mod
import index.store as store_mod
from index.errors import DimensionError
from index.factory import choose_factory, describe
from index.gpu import gpu_available
from index.store import VectorCollection
from tests.index.conftest import clustered, exact_topk, near, recall
from vlm.errors import RadLensError

IDS_OFFSET = 10**12  # 64-bit ids far from slot numbers


def _coll(x: np.ndarray, factory: str, **kw) -> VectorCollection:
    c = VectorCollection("image", x.shape[1], factory, **kw)
    c.add(np.arange(len(x), dtype=np.int64) * 7 + IDS_OFFSET, x)
    return c


def _rows(ids: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, (ids - IDS_OFFSET) // 7, -1)


def test_flat_matches_exact(data_64):
    x = data_64[:5000]
    q = near(x, 50)
    res = _coll(x, "Flat").search(q, 10)
    assert res.ids.shape == (50, 10) and res.scores.dtype == np.float32
    assert recall(_rows(res.ids), exact_topk(x, q, 10)) == 1.0
    assert np.all(np.diff(res.scores, axis=1) <= 1e-6)
    one = _coll(x, "Flat").search(q[0] * 3.0, 5)  # single query, not normalised
    assert one.ids.shape == (5,) and np.allclose(one.scores, res.scores[0, :5], atol=1e-5)


@pytest.mark.parametrize("factory, rerank, min_recall", [
    ("IVF128_HNSW32,PQ16x4fsr", 30, 0.95),  # these clusters are harder for PQ than archives
    ("IVF128_HNSW32,PQ16x4fsr", None, 0.80),  # default re-rank factor (10)
    ("IVF128,SQ8", None, 0.95),
    ("HNSW32,SQ8", None, 0.95),
    ("HNSW32", None, 0.95),
])
def test_approximate_recall_vs_exact(data_64, factory, rerank, min_recall):
    q = near(data_64, 100)
    c = _coll(data_64, factory, rerank=rerank)
    assert c.index.is_trained and c.index.ntotal == len(data_64)
    got = recall(_rows(c.search(q, 10).ids), exact_topk(data_64, q, 10))
    assert got >= min_recall, f"{factory}: recall@10 {got:.3f}"


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF64_HNSW32,PQ16x4fsr"])
def test_add_remove_readd_keeps_ids(factory):
    x = clustered(4000, 64, seed=3)
    c = _coll(x, factory)
    target = IDS_OFFSET + 7 * 11
    assert c.search(x[11], 1).ids[0] == target
    assert c.remove([target, 123]) == 1  # unknown ids are ignored
    assert not c.contains(target) and len(c) == 3999
    assert target not in c.search(x[11], 10).ids
    c.add([target], x[11])  # the same id comes back (HNSW: the old slot stays a tombstone)
    assert c.search(x[11], 1).ids[0] == target and len(c) == 4000
    moved = clustered(1, 64, seed=99)[0]
    c.remove([target])
    c.add([target], moved)  # re-add with a new vector
    assert c.search(moved, 1).ids[0] == target
    assert c.search(x[11], 10).ids[0] != target
    c.compact()
    assert c.dead == 0 and len(c) == 4000
    assert c.search(moved, 1).ids[0] == target
    assert sorted(c.ids().tolist()) == sorted(
        (np.arange(4000) * 7 + IDS_OFFSET).tolist())


def test_duplicate_and_wrong_dim_errors_are_one_line():
    c = VectorCollection("image", 16)
    c.add([1], np.ones(16))
    with pytest.raises(RadLensError, match="already in collection 'image'"):
        c.add([1], np.ones(16))
    for bad in (np.ones(15), np.ones((2, 32))):
        with pytest.raises(DimensionError) as err:
            c.search(bad, 3)
        assert "\n" not in str(err.value) and "16-dimensional" in str(err.value)
    with pytest.raises(DimensionError, match="all zeros"):
        c.add([2], np.zeros(16))


def test_auto_grows_into_ivf(monkeypatch):
    monkeypatch.setattr(factory_mod, "SMALL_MAX", 3000)
    x = clustered(6000, 64, seed=5)
    c = VectorCollection("image", 64)
    c.add(np.arange(2000) + IDS_OFFSET, x[:2000])
    assert c.factory == "Flat"
    c.remove([IDS_OFFSET + 5])
    c.add(np.arange(2000, 6000) + IDS_OFFSET, x[2000:])
    assert describe(c.factory).kind == "ivf" and c.factory == choose_factory(5999, 64)
    assert c.index.is_trained and c.index.ntotal == 5999 and c.dead == 0
    q = near(x, 50, seed=8)
    truth = exact_topk(x, q, 10)
    got = c.search(q, 10).ids - IDS_OFFSET
    truth = np.where(truth == 5, -2, truth)  # the removed row can't come back
    assert recall(got, truth) >= 0.9
    assert IDS_OFFSET + 5 not in got + IDS_OFFSET


def test_auto_stays_auto_and_grows_again(monkeypatch):
    """The first automatic rebuild used to turn the collection into a fixed-factory one, so a
    collection that crossed SMALL_MAX kept its first IVF list count forever."""
    monkeypatch.setattr(factory_mod, "SMALL_MAX", 3000)
    x = clustered(60_000, 16, seed=6)
    c = VectorCollection("image", 16)
    c.add(np.arange(4000), x[:4000])
    first = c.factory
    assert describe(first).kind == "ivf" and c.auto and c.built_for == 4000
    for at in range(4000, 60_000, 4000):
        c.add(np.arange(at, at + 4000), x[at:at + 4000])
    assert c.auto and c.built_for >= 4 * 4000
    assert describe(c.factory).nlist > describe(first).nlist
    assert c.index.ntotal == 60_000


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,SQ8", "IVF64_HNSW32,PQ16x4fsr"])
@pytest.mark.parametrize("exact_subset_max", [20_000, 0])
def test_filtered_search_returns_k(monkeypatch, data_64, factory, exact_subset_max):
    monkeypatch.setattr(store_mod, "EXACT_SUBSET_MAX", exact_subset_max)
    x = data_64[:8000]
    c = _coll(x, factory)
    rng = np.random.default_rng(4)
    allowed_rows = rng.choice(len(x), 40, replace=False)  # 0.5% of rows pass the filter
    allow = allowed_rows * 7 + IDS_OFFSET
    q = near(x, 20, seed=6)
    res = c.search(q, 10, allow=allow)
    assert (res.ids >= 0).all(), "filtered search returned fewer than k rows"
    assert np.isin(res.ids, allow).all()
    truth = exact_topk(x[allowed_rows], q, 10)
    # exact over the allowed rows when few; the forced faiss-selector path is approximate
    assert recall(_rows(res.ids), allowed_rows[truth]) >= (0.95 if exact_subset_max else 0.8)
    few = c.search(q[:2], 10, allow=allow[:3])  # fewer allowed rows than k
    assert ((few.ids >= 0).sum(axis=1) == 3).all() and np.isin(few.ids[few.ids >= 0],
                                                                allow[:3]).all()
    assert (c.search(q[:2], 5, allow=[]).ids == -1).all()


class _SelectorlessClone:
    """What a faiss-gpu clone offers the store: ``search(q, k)`` with k <= 2048, no
    ``IDSelector`` and an ``nprobe`` attribute; a CPU copy underneath."""

    def __init__(self, index):
        self.index, self.fetches = faiss.clone_index(index), []
        self._ivf = faiss.try_extract_index_ivf(self.index)
        if self._ivf is not None:
            self.nprobe = self._ivf.nprobe

    def search(self, q, k):
        assert k <= 2048
        if self._ivf is not None:
            self._ivf.nprobe = self.nprobe
        self.fetches.append(k)
        return self.index.search(q, k)


@pytest.mark.parametrize("factory", ["Flat", "IVF128,Flat"])
def test_gpu_branch_over_fetches_to_honour_filters_and_tombstones(data_64, monkeypatch,
                                                                  factory):
    """The store's GPU search path, run on the CPU: a clone that takes no id selector gets
    the filter and the removed rows applied by over-fetching; results match the CPU path."""
    import index.gpu as gpu_mod

    x = data_64[:6000]
    q = near(x, 40)
    c = _coll(x, factory)
    c.remove(np.arange(0, 6000, 4) * 7 + IDS_OFFSET)  # a quarter tombstoned
    wide = np.arange(1, 6000, 3) * 7 + IDS_OFFSET  # every third row
    narrow = np.arange(2, 6000, 400) * 7 + IDS_OFFSET  # 15 rows: deep over-fetch
    cpu = [c.search(q, 10), c.search(q, 10, allow=wide), c.search(q, 10, allow=narrow)]
    clones: list[_SelectorlessClone] = []
    monkeypatch.setattr(gpu_mod, "gpu_available", lambda: True)
    monkeypatch.setattr(gpu_mod, "to_gpu", lambda ix: clones.append(_SelectorlessClone(ix))
                        or clones[-1])
    got = [c.search(q, 10), c.search(q, 10, allow=wide), c.search(q, 10, allow=narrow)]
    assert len(clones) == 1 and max(clones[0].fetches) > 10  # cloned once, fetched deeper
    removed = set((np.arange(0, 6000, 4) * 7 + IDS_OFFSET).tolist())
    for allow, a, b in zip([None, wide, narrow], cpu, got, strict=True):
        assert (b.ids >= 0).all() and not removed & set(b.ids.ravel().tolist())
        if allow is not None:
            assert np.isin(b.ids, allow).all()
        if factory == "Flat":
            # a query the clone's deepest fetch cannot fill is answered from the float16 rows
            assert np.array_equal(a.ids, b.ids) and np.allclose(a.scores, b.scores, atol=1e-3)
        else:
            assert recall(_rows(b.ids), _rows(a.ids)) >= 0.95
    c.add(np.asarray([IDS_OFFSET - 7]), x[:1])  # a write drops the clone
    c.search(q, 10)
    assert len(clones) == 2


def test_ivf_training_uses_the_gpu_clustering_index_and_lets_it_go(data_64, monkeypatch):
    """k-means for IVF training runs on the index ``gpu_clustering_index`` hands out (here a
    CPU flat index standing in for the GPU one), which is detached after training."""
    import index.gpu as gpu_mod

    handed: list[faiss.Index] = []

    def clustering(dim):
        handed.append(faiss.IndexFlatIP(dim))
        return handed[-1]

    monkeypatch.setattr(gpu_mod, "gpu_clustering_index", clustering)
    c = _coll(data_64[:8000], "IVF64,Flat")
    assert len(handed) == 1 and handed[0].ntotal == 64  # k-means assigned against it
    ivf = faiss.extract_index_ivf(c.index)
    assert ivf.is_trained and ivf.clustering_index is None
    q = near(data_64[:8000], 20)
    assert recall(_rows(c.search(q, 10, nprobe=64).ids), exact_topk(data_64[:8000], q, 10)) \
        == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU and faiss-gpu")
def test_gpu_search_matches_cpu(data_64, monkeypatch):
    x = data_64
    q = near(x, 100)
    gpu_coll = _coll(x, "IVF128,SQ8")
    got = gpu_coll.search(q, 10, allow=np.arange(0, len(x), 3) * 7 + IDS_OFFSET)
    assert gpu_coll._gpu_index not in (None, False), "search did not run on the GPU"
    assert np.isin(_rows(got.ids), np.arange(0, len(x), 3)).all()
    monkeypatch.setenv("RADLENS_INDEX_GPU", "0")
    cpu = _coll(x, "IVF128,SQ8").search(q, 10)
    monkeypatch.delenv("RADLENS_INDEX_GPU")
    assert recall(_rows(gpu_coll.search(q, 10).ids), _rows(cpu.ids)) >= 0.95
