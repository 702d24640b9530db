"""A named vector collection: cosine search over L2-normalised vectors with stable 64-bit ids.

Rows live in *slots* (0, 1, 2, ... in insertion order). faiss stores slot numbers as its ids,
``ids[slot]`` gives the caller's 64-bit id and a float16 copy of every vector (``vectors``,
memory-mapped after loading) serves exact re-ranking, rebuilds and compaction. Removing a row
tombstones its slot (every index type, HNSW included, so ids can be re-added at once); searches
skip tombstones with a faiss ``IDSelectorBitmap``; :meth:`VectorCollection.compact` (run by
saves once enough rows are dead) drops them. With ``factory="auto"`` the collection starts exact
(``Flat``) and is rebuilt into the compressed IVF index (trained on a sample) when it grows past
:data:`index.factory.SMALL_MAX`, and again each time it grows 4x.

Public API: ``VectorCollection(name, dim, factory="auto")``, ``.add(ids, vectors)``,
``.remove(ids)``, ``.contains(id)``, ``.ids()``, ``.search(queries, k, allow=None) ->
SearchResult(ids, scores)``, ``.compact()``, ``.rebuild(factory=None)``, ``len()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import faiss
import numpy as np

from index import gpu
from index.errors import DimensionError, IndexCorruptError
from index.factory import (
    DEFAULT_EF_SEARCH,
    DEFAULT_NPROBE,
    build_index,
    choose_factory,
    default_rerank,
    describe,
    faiss_reason,
    search_parameters,
    train_sample_size,
)
from index.search import exact_search, normalise, rerank
from vlm.errors import RadLensError

logger = logging.getLogger(__name__)

#: Filtered searches over at most this many allowed rows are answered exactly from ``vectors``.
EXACT_SUBSET_MAX = 20_000
#: Rows converted to float32 and added to faiss at a time by rebuilds.
ADD_CHUNK = 65_536
#: Growth factor after which an automatic IVF collection is rebuilt with more lists.
REBUILD_GROWTH = 4


class SearchResult(NamedTuple):
    """Search hits, best first; missing hits have id ``-1`` and score ``-inf``.

    ``ids`` and ``scores`` are ``(nq, k)`` for a batch of queries, ``(k,)`` for one query.
    """

    ids: np.ndarray
    scores: np.ndarray


class VectorCollection:
    """One named collection (e.g. ``"image"``) of unit vectors with stable ids.

    Args:
        name: Collection name (used in messages and file names).
        dim: Embedding dimension.
        factory: A faiss factory string, or ``"auto"`` to choose by size.
        nprobe: IVF lists visited per query (default :data:`DEFAULT_NPROBE`).
        ef_search: HNSW beam width (default :data:`DEFAULT_EF_SEARCH`).
        rerank: Candidates fetched per result for exact re-ranking of compressed codes
            (default: :func:`index.factory.default_rerank` of the factory).
    """

    def __init__(self, name: str, dim: int, factory: str = "auto", *, nprobe: int | None = None,
                 ef_search: int | None = None, rerank: int | None = None) -> None:
        if dim <= 0:
            raise DimensionError(f"collection '{name}': dimension must be positive, got {dim}")
        self.name = name
        self.dim = int(dim)
        self.auto = factory == "auto"
        self.factory = choose_factory(0, dim) if self.auto else factory
        self.nprobe = nprobe or DEFAULT_NPROBE
        self.ef_search = ef_search or DEFAULT_EF_SEARCH
        self.rerank = max(1, int(rerank)) if rerank else None
        self.dirty = True
        self.built_for = 0
        self._ids = np.empty(0, np.int64)
        self._vecs: np.ndarray = np.empty((0, dim), np.float16)
        self._alive = np.empty(0, bool)
        self._n = 0
        self._slot: dict[int, int] = {}
        self._index: faiss.Index = build_index(self.factory, dim)
        self._n_indexed = 0  # slots [0, _n_indexed) are in the faiss index
        self._bitmap: np.ndarray | None = None
        self._gpu_index: Any = None

    # ------------------------------------------------------------------ state
    def __len__(self) -> int:
        return len(self._slot)

    def __repr__(self) -> str:
        return (f"VectorCollection({self.name!r}, dim={self.dim}, factory={self.factory!r}, "
                f"count={len(self)}, dead={self.dead})")

    @property
    def rerank_factor(self) -> int:
        """Candidates fetched per result for re-ranking (explicit, or by factory)."""
        return self.rerank or default_rerank(self.factory, self.dim)

    @property
    def indexed(self) -> int:
        """Slots (live or tombstoned) added to the faiss index so far."""
        return self._n_indexed

    @property
    def dead(self) -> int:
        """Tombstoned slots not yet compacted away."""
        return self._n - len(self._slot)

    @property
    def index(self) -> faiss.Index:
        """The underlying faiss index (ids are slots)."""
        return self._index

    def contains(self, item_id: int) -> bool:
        """Whether ``item_id`` is in the collection."""
        return int(item_id) in self._slot

    def ids(self) -> np.ndarray:
        """All live ids, in slot order."""
        return self._ids[: self._n][self._alive[: self._n]].copy()

    def vectors(self, ids: Iterable[int]) -> np.ndarray:
        """The stored (float16-rounded, unit) vectors of ``ids`` as float32."""
        slots = self._slots_of(ids, strict=True)
        return np.asarray(self._vecs[slots], np.float32)

    def _slots_of(self, ids: Iterable[int], strict: bool = False) -> np.ndarray:
        out = []
        for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).ravel():
            s = self._slot.get(int(i))
            if s is not None:
                out.append(s)
            elif strict:
                raise RadLensError(f"id {int(i)} is not in collection '{self.name}'")
        return np.asarray(out, np.int64)

    def _touch(self) -> None:
        self.dirty = True
        self._bitmap = None
        self._gpu_index = None

    # ------------------------------------------------------------------ mutation
    def add(self, ids: Iterable[int] | np.ndarray, vectors: np.ndarray) -> None:
        """Add rows; vectors are L2-normalised here.

        Raises:
            DimensionError: Wrong shape, non-finite or zero vectors.
            RadLensError: An id is already present (remove it first) or repeated.
        """
        vecs = normalise(vectors, self.dim, what=f"collection '{self.name}'")
        id_arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
        if id_arr.shape != (vecs.shape[0],):
            raise DimensionError(f"collection '{self.name}': got {id_arr.size} ids for "
                                 f"{vecs.shape[0]} vectors; pass one id per vector")
        if len(np.unique(id_arr)) != len(id_arr):
            raise RadLensError(f"collection '{self.name}': repeated ids in one add; "
                               "pass each id once")
        for i in id_arr.tolist():
            if i in self._slot:
                raise RadLensError(f"id {i} is already in collection '{self.name}': "
                                   "remove it first to replace its vector")
        m = len(id_arr)
        if m == 0:
            return
        self._reserve(self._n + m)
        start = self._n
        self._ids[start:start + m] = id_arr
        self._vecs[start:start + m] = vecs
        self._alive[start:start + m] = True
        self._n += m
        self._slot.update(zip(id_arr.tolist(), range(start, start + m), strict=True))
        self._touch()
        if not self._maybe_grow():
            self._sync_index(new=vecs if self._n_indexed == start else None)

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Tombstone rows; unknown ids are ignored. Returns how many were removed."""
        slots = [self._slot.pop(int(i)) for i in np.asarray(list(ids) if not isinstance(
            ids, np.ndarray) else ids).ravel() if int(i) in self._slot]
        if slots:
            self._alive[np.asarray(slots)] = False
            self._touch()
        return len(slots)

    def _reserve(self, n: int) -> None:
        cap = self._ids.shape[0]
        if n <= cap and self._vecs.flags.writeable:
            return
        new_cap = max(n, 2 * cap, 1024)
        ids = np.empty(new_cap, np.int64)
        vecs = np.empty((new_cap, self.dim), np.float16)
        alive = np.zeros(new_cap, bool)
        ids[: self._n] = self._ids[: self._n]
        vecs[: self._n] = self._vecs[: self._n]
        alive[: self._n] = self._alive[: self._n]
        self._ids, self._vecs, self._alive = ids, vecs, alive

    def _sync_index(self, new: np.ndarray | None = None) -> None:
        """Train when possible, then add slots ``[_n_indexed, _n)`` to faiss."""
        if not self._index.is_trained:
            need = _min_train(self.factory)
            if self._n < need:
                return  # searched exactly from ``vectors`` until enough rows to train
            self._train()
            new = None
        if new is not None and self._n_indexed + len(new) == self._n:
            self._index.add(new)
            self._n_indexed = self._n
        while self._n_indexed < self._n:  # from the float16 copy, in bounded chunks
            stop = min(self._n, self._n_indexed + ADD_CHUNK)
            self._index.add(np.asarray(self._vecs[self._n_indexed:stop], np.float32))
            self._n_indexed = stop

    def _train(self, index: faiss.Index | None = None, factory: str | None = None) -> None:
        """Train ``index`` (default: this collection's) as ``factory`` on a seeded sample of
        the live rows."""
        index = self._index if index is None else index
        factory = factory or self.factory
        n_sample = train_sample_size(factory, self._n)
        rng = np.random.default_rng(1234)
        live = np.flatnonzero(self._alive[: self._n])
        pick = np.sort(rng.choice(live, size=min(n_sample, len(live)), replace=False))
        sample = np.asarray(self._vecs[pick], np.float32)
        ivf: Any = faiss.try_extract_index_ivf(index)
        clus = gpu.gpu_clustering_index(self.dim) if ivf is not None else None
        if ivf is not None and clus is not None:
            ivf.clustering_index = clus
        logger.info("training %s on %d vectors of '%s'", factory, len(sample), self.name)
        index.train(sample)
        if ivf is not None and clus is not None:
            ivf.clustering_index = None

    def _maybe_grow(self) -> bool:
        if not self.auto:
            return False
        target = choose_factory(len(self), self.dim)
        if target == self.factory:
            return False
        if describe(self.factory).kind != "flat" and len(self) < REBUILD_GROWTH * self.built_for:
            return False
        logger.info("collection '%s' has %d rows: rebuilding %s -> %s", self.name, len(self),
                    self.factory, target)
        self.rebuild(target)
        self.auto = True  # still chosen by size: rebuilt again when it has grown REBUILD_GROWTH x
        return True

    def rebuild(self, factory: str | None = None) -> None:
        """Rebuild the faiss index (optionally as another ``factory``; ``"auto"``: chosen by
        size again), dropping tombstones.

        Raises:
            RadLensError: faiss cannot build ``factory`` or train it on these rows (an IVF
                with more lists than rows, say); the collection is left as it was.
        """
        auto = self.auto if factory is None else factory == "auto"
        target = (self.factory if factory is None
                  else choose_factory(len(self), self.dim) if auto else factory)
        try:
            fresh = build_index(target, self.dim)
        except RuntimeError as exc:
            raise RadLensError(f"collection '{self.name}': {target!r} is not a faiss factory "
                               f"for {self.dim}-d vectors: {faiss_reason(exc)}") from None
        if not fresh.is_trained and len(self) >= _min_train(target):
            try:  # trained before anything of this collection changes
                self._train(fresh, target)
            except RuntimeError as exc:
                raise RadLensError(f"collection '{self.name}' ({len(self)} rows) cannot be "
                                   f"built as {target!r}: {faiss_reason(exc)}") from None
        self.auto, self.factory = auto, target
        self._compact_arrays()
        self._index, self._n_indexed, self.built_for = fresh, 0, self._n
        self._touch()
        self._sync_index()

    def compact(self) -> int:
        """Drop tombstoned rows from the arrays and the faiss index. Returns rows dropped."""
        dead = self.dead
        if dead == 0:
            return 0
        kind = describe(self.factory).kind
        if kind == "flat" and self._n_indexed == self._n:
            keep = self._alive[: self._n]
            self._index.remove_ids(faiss.IDSelectorBatch(np.flatnonzero(~keep).astype(np.int64)))
            self._compact_arrays()
            self._n_indexed = self._n
            self._touch()
        elif kind == "ivf" and self._index.is_trained:
            self._compact_arrays()
            self._index.reset()  # keeps the trained quantizer and codebooks
            self._n_indexed = 0
            self._touch()
            self._sync_index()
        else:
            self.rebuild()
        return dead

    def _compact_arrays(self) -> None:
        keep = np.flatnonzero(self._alive[: self._n])
        self._ids = self._ids[keep].copy()
        self._vecs = np.ascontiguousarray(self._vecs[keep], np.float16)
        self._alive = np.ones(len(keep), bool)
        self._n = len(keep)
        self._slot = dict(zip(self._ids.tolist(), range(self._n), strict=True))

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int = 10, allow: Iterable[int] | None = None, *,
               nprobe: int | None = None, ef_search: int | None = None,
               rerank: int | None = None) -> SearchResult:
        """Top-``k`` cosine search for one query ``(dim,)`` or a batch ``(nq, dim)``.

        Args:
            queries: Query vectors (normalised here).
            k: Results per query.
            allow: Optional ids to restrict the search to (e.g. from
                :meth:`index.catalog.Catalog.filter_ids`); the search still returns ``k``
                rows when at least ``k`` allowed rows exist.
            nprobe, ef_search, rerank: Override the collection's search knobs.
        """
        single = np.ndim(queries) == 1
        q = normalise(queries, self.dim, what=f"query for '{self.name}'")
        nq, k = q.shape[0], int(k)
        ids = np.full((nq, max(k, 0)), -1, np.int64)
        scores = np.full((nq, max(k, 0)), -np.inf, np.float32)
        if k > 0 and len(self) > 0:
            mask = None if allow is None else self._allow_mask(allow)
            n_allowed = len(self) if mask is None else int(mask.sum())
            if n_allowed > 0:
                slots, sc = self._search_slots(q, k, mask, n_allowed, nprobe or self.nprobe,
                                               ef_search or self.ef_search,
                                               rerank or self.rerank_factor)
                if slots.shape[1] < k:  # fewer slots than k: pad to k columns
                    pad = ((0, 0), (0, k - slots.shape[1]))
                    slots = np.pad(slots, pad, constant_values=-1)
                    sc = np.pad(sc, pad, constant_values=-np.inf)
                ok = slots >= 0
                ids[ok] = self._ids[slots[ok]]
                scores[ok] = sc[ok]
        return SearchResult(ids[0], scores[0]) if single else SearchResult(ids, scores)

    def _allow_mask(self, allow: Iterable[int]) -> np.ndarray:
        mask = np.zeros(self._n, bool)
        slots = self._slots_of(allow)
        if len(slots):
            mask[slots] = True
        return mask

    def _live_bitmap(self) -> np.ndarray | None:
        if self.dead == 0:
            return None
        if self._bitmap is None:
            self._bitmap = np.packbits(self._alive[: self._n], bitorder="little")
        return self._bitmap

    def _search_slots(self, q: np.ndarray, k: int, mask: np.ndarray | None, n_allowed: int,
                      nprobe: int, ef: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
        info = describe(self.factory)
        live = self._alive[: self._n]
        full = mask & live if mask is not None else None
        if self._n_indexed < self._n or (info.kind != "flat" and full is not None
                                          and n_allowed <= EXACT_SUBSET_MAX):
            subset = np.flatnonzero(full if full is not None else live)
            return exact_search(q, self._vecs, subset, k)
        bitmap = (np.packbits(full, bitorder="little") if full is not None
                  else self._live_bitmap())
        mask_bool = full if full is not None else (live if self.dead else None)
        kf = min(k * factor, self._n) if info.lossy else min(k, self._n)
        kf = max(kf, min(k, self._n))
        while True:
            d, i = self._faiss_search(q, kf, bitmap, mask_bool, nprobe, ef)
            found = (i >= 0).sum(axis=1)
            want = min(k, n_allowed)
            if found.min() >= want or not self._can_widen(info, nprobe, ef, kf):
                break
            nprobe, ef, kf = 2 * nprobe, 2 * ef, min(2 * kf, self._n)
        if found.min() < min(k, n_allowed):  # exhausted: answer the short rows exactly
            short = np.flatnonzero(found < min(k, n_allowed))
            subset = np.flatnonzero(full if full is not None else live)
            s_i, s_d = exact_search(q[short], self._vecs, subset, kf)
            i[short], d[short] = s_i, s_d
        if info.lossy:
            return rerank(q, self._vecs, i, k)
        return i[:, :k], d[:, :k]

    def _can_widen(self, info: Any, nprobe: int, ef: int, kf: int) -> bool:
        if info.kind == "ivf":
            return nprobe < info.nlist or kf < self._n
        if info.kind == "hnsw":
            return ef < 4096 or kf < self._n
        return kf < self._n

    def _faiss_search(self, q: np.ndarray, kf: int, bitmap: np.ndarray | None,
                      mask: np.ndarray | None, nprobe: int,
                      ef: int) -> tuple[np.ndarray, np.ndarray]:
        if gpu.gpu_available():
            if self._gpu_index is None:
                self._gpu_index = gpu.to_gpu(self._index) or False
            if self._gpu_index is not False:
                return gpu.search_filtered(self._gpu_index, q, kf, mask, nprobe, self._n)
        sel = None
        if bitmap is not None:
            sel = faiss.IDSelectorBitmap(self._n, faiss.swig_ptr(bitmap))
        params = search_parameters(self._index, sel, nprobe=nprobe, ef_search=ef)
        return self._index.search(q, kf, params=params)


def _min_train(factory: str) -> int:
    info = describe(factory)
    if info.kind == "ivf":
        return max(info.nlist, 256)
    return 256 if info.trained else 0


def collection_state(coll: VectorCollection) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(meta, arrays)`` describing ``coll`` for saving; arrays cover used slots only."""
    n = coll._n
    meta = {"factory": coll.factory, "auto": coll.auto, "dim": coll.dim, "count": len(coll),
            "slots": n, "dead": coll.dead, "indexed": coll._n_indexed,
            "built_for": coll.built_for, "nprobe": coll.nprobe, "ef_search": coll.ef_search,
            "rerank": coll.rerank}
    arrays = {"ids": coll._ids[:n], "vectors": coll._vecs[:n], "alive": coll._alive[:n]}
    return meta, arrays


def collection_from_state(name: str, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                          index: faiss.Index) -> VectorCollection:
    """Rebuild a collection saved by :func:`collection_state` (vectors may be a memmap)."""
    coll = VectorCollection(name, int(meta["dim"]), meta["factory"], nprobe=meta["nprobe"],
                            ef_search=meta["ef_search"], rerank=meta["rerank"])
    coll.auto = bool(meta["auto"])
    ids, alive = np.asarray(arrays["ids"], np.int64), np.asarray(arrays["alive"], bool)
    coll._ids, coll._vecs, coll._alive = ids.copy(), arrays["vectors"], alive.copy()
    coll._n = len(ids)
    live = np.flatnonzero(alive)
    coll._slot = dict(zip(ids[live].tolist(), live.tolist(), strict=True))
    coll._index = index
    coll._n_indexed = int(meta["indexed"])
    coll.built_for = int(meta["built_for"])
    if coll._index.ntotal != coll._n_indexed:
        raise IndexCorruptError(f"collection '{name}': faiss index holds {index.ntotal} rows, "
                                f"the manifest says {coll._n_indexed}: restore or rebuild it")
    coll.dirty = False
    return coll
