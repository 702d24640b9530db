"""``IndexFolder``: the vectors, catalog and manifest of one index on disk.

Typical use::

    ix = IndexFolder.create("idx", model_name="lrclr", config_hash="ab12", dim=512)
    ix.add("image", vectors, items)            # catalog rows + vectors, same ids
    ix.save()                                  # new generation, atomically switched in
    ix.close()

    ix = IndexFolder.open("idx", expect_model="lrclr", expect_config_hash="ab12")
    hits = ix.search("image", query, k=10, modality="CR", year_min=2010)

Readers (``mode="r"``, the default) load the generation named by ``CURRENT`` and never lock;
``reload()`` moves them to a newer one. One writer (``mode="w"``) holds ``LOCK``; it works on a
private copy of the catalog and in-memory collections until ``save()``.

A collection may come from another model than the folder's (a ``volume`` collection of CT
volume vectors beside the ``image`` collection of an image-text model): pass a
:class:`CollectionModel` when creating it. Its name, config hash and dimension are kept in the
manifest's ``collections`` entry; entries without them (older folders, and collections created
without a model) inherit the folder-level ``model_name``, ``config_hash`` and ``dim``. Adding to
or searching a collection with another model's identity is refused (:class:`ConfigError`).

Public API: :class:`IndexFolder` (``create``, ``open``, ``collection``, ``collections``,
``collection_model``, ``catalog``, ``add``, ``remove``, ``search``, ``save``, ``reload``,
``info``, ``close``), :class:`CollectionModel` and :class:`Hit`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import faiss
import numpy as np

from index import persist
from index.catalog import WITHHELD_KINDS, Catalog, CatalogItem
from index.errors import IndexCorruptError, IndexFormatError
from index.lock import WriterLock
from index.store import VectorCollection, collection_from_state, collection_state
from vlm.errors import ConfigError, RadLensError

logger = logging.getLogger(__name__)

WORK_CATALOG = "catalog-work.sqlite"
#: Saves compact a collection once this fraction of its slots is tombstoned.
COMPACT_FRACTION = 0.2
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class CollectionModel:
    """The model whose vectors fill one collection.

    ``model_name``, ``config_hash`` and ``dim`` are its identity; ``source`` (a checkpoint
    path or model name to load it from) is recorded for convenience and never compared.
    """

    model_name: str
    config_hash: str
    dim: int
    source: str | None = None


@dataclass
class Hit:
    """One search result with its catalog row (``item`` is None if the row is missing)."""

    id: int
    score: float
    item: CatalogItem | None



def is_index_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a RadLens index folder (its ``CURRENT`` pointer and manifest):
    folder walks skip these, so an index kept inside its archive is not indexed itself."""
    folder = Path(path)
    return (folder / persist.CURRENT).is_file() and (folder / persist.MANIFEST).is_file()


def bind_pseudonyms(ix: IndexFolder) -> None:
    """:meth:`IndexFolder.bind_pseudonym_key` with this process's site secret; closes the
    writer (releasing its lock, the index unchanged) when it is refused."""
    from vlm.io.deid import default_pseudonymizer

    try:
        ix.bind_pseudonym_key(default_pseudonymizer().key_id)
    except BaseException:
        ix.close()
        raise


#: the sub-folders of an index that hold the files catalog rows point at
FILE_FOLDERS = ("thumbs", "volumes")


class IndexFolder:
    """An index folder opened for reading or writing. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], mode: str,
                 lock: WriterLock | None) -> None:
        self.path = path
        self.mode = mode
        self.manifest = manifest
        self._lock = lock
        self._collections: dict[str, VectorCollection] = {}
        self._models: dict[str, CollectionModel] = {}
        self._catalog: Catalog | None = None
        self.generation = ""
        # held while a reload swaps in a generation and while a search takes its collection
        # and catalog, so a search never pairs one generation's vectors with another's rows
        self._swap = threading.RLock()
        self._reloading = threading.Lock()  # one reload at a time (the watcher, a handler)
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | os.PathLike[str], *, model_name: str, config_hash: str,
               dim: int, preprocessing: Mapping[str, Any] | None = None,
               lock_timeout: float = 0.0) -> IndexFolder:
        """Create an empty index folder (saved as generation 1) and open it for writing.

        Raises:
            RadLensError: ``path`` already holds an index or is a non-empty folder.
        """
        folder = Path(path)
        if folder.exists() and not folder.is_dir():  # was NotADirectoryError, internal
            raise RadLensError(f"{folder} is a file, not a folder: choose a new or empty "
                               "folder for the index")
        if (folder / persist.CURRENT).exists():
            raise RadLensError(f"{folder} already holds an index: open it, or delete the "
                               "folder to start again")
        if folder.exists() and any(folder.iterdir()):
            raise RadLensError(f"{folder} is not empty: choose a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(folder).acquire(lock_timeout)
        now = time.time()
        manifest = {"format_version": persist.FORMAT_VERSION, "model_name": model_name,
                    "config_hash": config_hash, "dim": int(dim), "metric": "cosine",
                    "preprocessing": dict(preprocessing or {}), "created": now,
                    "updated": now, "collections": {}, "files": {}}
        self = cls(folder, manifest, "w", lock)
        self._catalog = Catalog(folder / WORK_CATALOG)
        self.save()
        return self

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, expect_model: str | None = None,
             expect_config_hash: str | None = None, mode: str = "r", lock_timeout: float = 0.0,
             verify: bool = True, mmap: bool = True) -> IndexFolder:
        """Open an existing index folder.

        Args:
            path: The folder.
            expect_model, expect_config_hash: Refuse an index built with another model.
            mode: ``"r"`` (any number of readers) or ``"w"`` (one writer, takes ``LOCK``).
            lock_timeout: Seconds a writer waits for the lock before giving up.
            verify: Check sha256 checksums of every data file.
            mmap: Memory-map the float16 re-rank vectors instead of reading them.

        Raises:
            ConfigError: Built with another model or config. IndexBusyError: another writer.
            IndexCorruptError / IndexFormatError: damaged or not an index.
        """
        if mode not in ("r", "w"):
            raise RadLensError(f"index mode must be 'r' or 'w', not {mode!r}")
        folder = Path(path)
        if mode == "w":
            persist.read_current(folder)  # not an index: said before a LOCK file is left there
        lock = WriterLock(folder).acquire(lock_timeout) if mode == "w" else None
        try:
            if lock is not None:
                persist.cleanup(folder)
            self = cls(folder, {}, mode, lock)
            self._load(verify=verify, mmap=mmap)
            self._check_model(expect_model, expect_config_hash)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return self

    def _check_model(self, model: str | None, config_hash: str | None) -> None:
        have_m, have_c = self.manifest["model_name"], self.manifest["config_hash"]
        if (model is None or model == have_m) and (config_hash is None or config_hash == have_c):
            return
        # the config name alone is no remedy: another training of it makes other vectors
        built_with = self.manifest.get("preprocessing", {}).get("model_path")
        remedy = (f"pass --model {built_with}" if built_with
                  else "pass the checkpoint folder it was built with")
        raise ConfigError(
            f"index {self.path} was built with model {have_m} (config {have_c}); you asked for "
            f"model {model or have_m} ({config_hash or have_c}): rebuild the index or {remedy}")

    def _load(self, verify: bool, mmap: bool, attempts: int = 5) -> None:
        for attempt in range(attempts):
            name = persist.read_current(self.path)
            gen_dir = self.path / name
            try:
                self._load_generation(gen_dir, verify, mmap)
                return
            except (FileNotFoundError, RuntimeError, sqlite3.Error) as exc:
                if persist.read_current(self.path) == name and not gen_dir.is_dir():
                    # not replaced by a writer (that switches CURRENT first): simply missing
                    raise IndexCorruptError(f"index {self.path}: {persist.CURRENT} names "
                                            f"generation {name}, which is missing: restore it "
                                            "or rebuild the index") from None
                if gen_dir.is_dir() and persist.read_current(self.path) == name:
                    if isinstance(exc, FileNotFoundError):
                        raise IndexCorruptError(f"index file {exc.filename} is missing: "
                                                "restore it or rebuild the index") from None
                    first = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
                    raise IndexCorruptError(f"index {gen_dir} could not be read ({first[0]}): "
                                            "restore it or rebuild the index") from None
                if attempt == attempts - 1:
                    raise IndexFormatError(f"index {self.path}: generations kept changing "
                                           "while loading: retry") from None
                logger.info("generation %s was replaced while loading; retrying", name)

    def _load_generation(self, gen_dir: Path, verify: bool, mmap: bool) -> None:
        manifest = persist.read_manifest(gen_dir)
        if verify:
            persist.verify_files(gen_dir, manifest)
        collections = {}
        for name, meta in manifest["collections"].items():
            arrays = {key: persist.read_array(gen_dir / f"{name}.{suffix}",
                                              mmap=mmap and key == "vectors")
                      for key, suffix in (("ids", "ids.npy"), ("vectors", "vectors.f16.npy"),
                                          ("alive", "alive.npy"))}
            index = faiss.read_index(str(gen_dir / f"{name}.faiss"))
            collections[name] = collection_from_state(name, meta, arrays, index)
        models = {name: _model_from_meta(meta, manifest)
                  for name, meta in manifest["collections"].items()}
        if self.mode == "w":
            work = self.path / WORK_CATALOG
            for suffix in ("", "-wal", "-shm"):
                Path(f"{work}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(gen_dir / "catalog.sqlite", work)
            catalog = Catalog(work)
        else:
            catalog = Catalog(gen_dir / "catalog.sqlite", readonly=True)
        # the previous catalog is not closed: searches still running on it (reload() in a
        # server thread) finish on the old generation; the garbage collector closes it
        with self._swap:
            self.manifest, self._collections, self._catalog = manifest, collections, catalog
            self._models, self.generation = models, gen_dir.name

    def reload(self, verify: bool = True, mmap: bool = True) -> bool:
        """Readers: move to the newest generation. Returns True if it changed."""
        if self.mode != "r":
            raise RadLensError("reload() is for readers; a writer already has the newest state")
        with self._reloading:
            if persist.read_current(self.path) == self.generation:
                return False
            self._load(verify=verify, mmap=mmap)
            return True

    def watch(self, interval: float = 2.0) -> None:
        """Readers: follow the index as other processes write it (``index add``, ``index
        remove``, a build from another app). A daemon thread reads ``CURRENT`` every
        ``interval`` seconds and loads a new generation, checksums verified, off the request
        path; searches use the previous one until the switch. A generation that cannot be
        loaded is logged and the previous one kept. Idempotent; :meth:`close` stops it."""
        if self.mode != "r":
            raise RadLensError("watch() is for readers; a writer already has the newest state")
        if self._watcher is not None:
            return

        def follow() -> None:
            while not self._stop_watching.wait(interval):
                try:
                    if self.reload():
                        logger.info("index %s: now at %s", self.path, self.generation)
                except Exception as exc:  # a broken generation must not stop the searches
                    logger.warning("index %s: a new generation was not loaded: %s", self.path,
                                   str(exc).splitlines()[0] if str(exc) else exc)

        self._watcher = threading.Thread(target=follow, name="radlens-index-watch",
                                         daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ access
    @property
    def catalog(self) -> Catalog:
        """The catalog (read-only snapshot for readers, working copy for the writer)."""
        assert self._catalog is not None, "index folder is closed"
        return self._catalog

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.manifest["dim"])

    def collections(self) -> list[str]:
        """Names of the collections."""
        return sorted(self._collections)

    def collection(self, name: str, *, create: bool = True, factory: str = "auto",
                   model: CollectionModel | None = None, **knobs: Any) -> VectorCollection:
        """The collection ``name``; a writer creates it if missing (``factory``, knobs).

        Args:
            model: The model of the collection's vectors. A new collection records it (None:
                the folder's model); an existing one must have been filled by the same model.

        Raises:
            ConfigError: ``model`` differs from the model that filled the collection.
        """
        if name in self._collections:
            if model is not None:
                self.check_model(name, model.model_name, model.config_hash, model.dim)
            return self._collections[name]
        if self.mode != "w" or not create:
            if not self.collections():
                raise RadLensError(f"index {self.path} holds no vectors yet (a build may still "
                                   "be running: it saves every few hundred images)")
            raise RadLensError(f"index {self.path} has no collection '{name}' (it has: "
                               f"{', '.join(self.collections())})")
        if not _NAME.match(name):
            raise RadLensError(f"collection name {name!r} must be lowercase letters, digits, "
                               "'-' or '_'")
        ident = model or self._folder_model()
        coll = VectorCollection(name, int(ident.dim), factory, **knobs)
        self._collections[name] = coll
        self._models[name] = ident
        return coll

    def _folder_model(self) -> CollectionModel:
        m = self.manifest
        return CollectionModel(str(m["model_name"]), str(m["config_hash"]), int(m["dim"]))

    def collection_model(self, name: str) -> CollectionModel:
        """The model that fills collection ``name`` (the folder's unless it recorded its own)."""
        self.collection(name, create=False)
        return self._models.get(name) or self._folder_model()

    def check_model(self, name: str, model_name: str | None = None,
                    config_hash: str | None = None, dim: int | None = None) -> None:
        """Refuse a model other than the one that filled collection ``name``.

        Raises:
            ConfigError: One line naming both models.
        """
        have = self.collection_model(name)
        if ((model_name is None or model_name == have.model_name)
                and (config_hash is None or config_hash == have.config_hash)
                and (dim is None or int(dim) == have.dim)):
            return
        raise ConfigError(
            f"collection '{name}' of index {self.path} holds vectors of model {have.model_name} "
            f"(config {have.config_hash}, {have.dim}-d); you gave model "
            f"{model_name or have.model_name} (config {config_hash or have.config_hash}, "
            f"{dim or have.dim}-d): use the collection's model or rebuild it")

    def bind_pseudonym_key(self, key_id: str) -> None:
        """Record which site secret made the catalog's pseudonyms (its
        :attr:`vlm.io.deid.Pseudonymizer.key_id`; saved with the next generation), or refuse a
        writer using another one: its study, series and instance pseudonyms would not match
        the rows already there, so neither resuming nor finding a patient's studies would work.

        Raises:
            ConfigError: the index records another key id.
        """
        self._writer()
        have = self.manifest.get("pseudonym_key")
        if have is None:
            self.manifest["pseudonym_key"] = key_id
        elif have != key_id:
            raise ConfigError(
                f"index {self.path} was built under another site secret ({have}, this process "
                f"has {key_id}): its pseudonyms would not match; set RADLENS_SITE_SECRET (or "
                "RADLENS_HOME) to the secret it was built with")

    def _writer(self) -> None:
        if self.mode != "w" or self._lock is None or not self._lock.held:
            raise RadLensError(f"index {self.path} is open read-only: open it with mode='w'")

    def add(self, collection: str, vectors: np.ndarray,
            items: Sequence[CatalogItem | Mapping[str, Any]], *,
            model: CollectionModel | None = None) -> np.ndarray:
        """Add vectors with their catalog rows; rows without ``id`` get fresh ids.

        Args:
            model: The model that made ``vectors``: creates the collection with it, or is
                checked against the collection's (None: no check, the folder's for a new one).

        Returns:
            The int64 ids used, in order.
        """
        self._writer()
        coll = self.collection(collection, model=model)
        model_name = self.collection_model(collection).model_name
        rows = [dict(it.to_dict()) if isinstance(it, CatalogItem) else dict(it) for it in items]
        if len(rows) != len(np.atleast_2d(vectors)):
            raise RadLensError(f"got {len(rows)} catalog items for {len(np.atleast_2d(vectors))} "
                               "vectors: pass one item per vector")
        next_id = self.catalog.next_id()
        for row in rows:
            if row.get("id") is None:
                row["id"], next_id = next_id, next_id + 1
            row["collection"] = collection
            row.setdefault("model", model_name)
            if row.get("box") is not None:
                row["box"] = tuple(row["box"])
        ids = np.asarray([r["id"] for r in rows], np.int64)
        coll.add(ids, vectors)
        try:
            self.catalog.add(rows)
        except BaseException:
            coll.remove(ids)
            raise
        return ids

    def remove(self, ids: Iterable[int]) -> int:
        """Remove items (catalog rows and vectors, any collection). Returns rows removed."""
        self._writer()
        id_list = [int(i) for i in ids]
        for coll in self._collections.values():
            coll.remove(id_list)
        return self.catalog.remove(id_list)

    def search(self, collection: str, queries: np.ndarray, k: int = 10, *,
               modality: str | Iterable[str] | None = None,
               body_part: str | Iterable[str] | None = None,
               view: str | Iterable[str] | None = None, year_min: int | None = None,
               year_max: int | None = None, allow: Iterable[int] | None = None,
               expect_model: str | None = None, expect_config_hash: str | None = None,
               **knobs: Any) -> list[list[Hit]]:
        """Filtered top-``k`` search with catalog rows; one list of hits per query.

        ``expect_model`` / ``expect_config_hash``: the model that made ``queries``; a
        collection filled by another model is refused (:class:`ConfigError`).
        """
        with self._swap:  # this generation's vectors with this generation's rows
            coll, catalog = self.collection(collection, create=False), self.catalog
            if expect_model is not None or expect_config_hash is not None:
                self.check_model(collection, expect_model, expect_config_hash)
        filters = (modality, body_part, view, year_min, year_max)
        if any(f is not None for f in filters):
            allowed = catalog.filter_ids(collection, modality=modality, body_part=body_part,
                                         view=view, year_min=year_min, year_max=year_max)
            if allow is not None:
                allowed = np.intersect1d(allowed, np.fromiter(allow, np.int64))
            allow = allowed
        # no more result slots than rows: -k 1000000 on a small index used to allocate and
        # look up a million empty slots per query
        k = max(1, min(int(k), len(coll)))
        res = coll.search(np.atleast_2d(queries), k, allow=allow, **knobs)
        found = res.ids[res.ids >= 0]
        items = dict(zip(found.tolist(), catalog.get_many(found.tolist()), strict=True))
        return [[Hit(i, float(s), items[i])
                 for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True) if i >= 0]
                for row_ids, row_scores in zip(res.ids, res.scores, strict=True)]

    def rebuild(self, names: Sequence[str] | None = None, factory: str | None = None
                ) -> dict[str, dict[str, Any]]:
        """Rebuild collections' faiss indexes from their stored vectors (unsaved): retrained
        on every current row, tombstones dropped, as ``factory`` if given (``"auto"``: chosen
        by size again, and again as it grows). ``names``: default every collection.

        Returns, per collection, the factory before and after, whether it is automatic now,
        its rows, the tombstones dropped, whether its index is trained (a factory that needs
        more rows than it has is searched exactly until it has them) and the seconds taken.

        Raises:
            RadLensError: an unknown collection (before any is rebuilt), or a factory faiss
                cannot build or train on a collection's rows (that collection is left as it
                was; nothing is saved here, so the index on disk is too).
        """
        self._writer()
        colls = [self.collection(n, create=False) for n in (names or self.collections())]
        out: dict[str, dict[str, Any]] = {}
        for coll in colls:
            start, before, dead = time.perf_counter(), coll.factory, coll.dead
            coll.rebuild(factory)
            out[coll.name] = {"from": before, "to": coll.factory, "auto": coll.auto,
                              "rows": len(coll), "dropped": dead,
                              # False: too few rows to train yet, searched exactly until then
                              "trained": bool(coll.index.is_trained),
                              "seconds": round(time.perf_counter() - start, 3)}
        return out

    def unreferenced_files(self, used: set[str] | None = None) -> list[Path]:
        """Files under :data:`FILE_FOLDERS` that no row points at (``used``: the catalog's
        :meth:`~index.catalog.Catalog.files_in_use`, if already read): left by a killed build
        (written before its rows were saved) or a killed ``index remove``."""
        used = self.catalog.files_in_use() if used is None else used
        return [p for folder in FILE_FOLDERS for p in sorted((self.path / folder).rglob("*"))
                if p.is_file() and str(p.relative_to(self.path)) not in used]

    # ------------------------------------------------------------------ saving
    def save(self) -> str:
        """Write a new generation and switch to it atomically. Returns its name."""
        self._writer()
        prev_dir = self.path / self.generation if self.generation else None
        prev_files = self.manifest.get("files", {})
        for coll in self._collections.values():
            if coll.dead and coll.dead >= COMPACT_FRACTION * (coll.dead + len(coll)):
                logger.info("compacting '%s' (%d dead rows)", coll.name, coll.dead)
                coll.compact()

        def fill(tmp: Path) -> dict[str, Any]:
            files: dict[str, Any] = {}
            metas: dict[str, Any] = {}
            for name, coll in sorted(self._collections.items()):
                meta, arrays = collection_state(coll)
                names = {f"{name}.ids.npy": arrays["ids"],
                         f"{name}.vectors.f16.npy": arrays["vectors"],
                         f"{name}.alive.npy": arrays["alive"], f"{name}.faiss": None}
                reuse = (not coll.dirty and prev_dir is not None
                         and all(f in prev_files for f in names))
                for fname, arr in names.items():
                    if reuse:
                        assert prev_dir is not None
                        os.link(prev_dir / fname, tmp / fname)
                        files[fname] = prev_files[fname]
                    elif arr is None:
                        files[fname] = persist.write_bytes(
                            tmp / fname, faiss.serialize_index(coll.index))
                    else:
                        files[fname] = persist.write_array(tmp / fname, arr)
                ident = self._models.get(name) or self._folder_model()
                metas[name] = {**meta, "model_name": ident.model_name,
                               "config_hash": ident.config_hash}
                if ident.source is not None:
                    metas[name]["model_source"] = ident.source
            self.catalog.snapshot_to(tmp / "catalog.sqlite")
            files["catalog.sqlite"] = persist.hash_existing(tmp / "catalog.sqlite")
            manifest = dict(self.manifest)
            manifest.update(collections=metas, files=files, updated=time.time(),
                            catalog_rows=self.catalog.count(), faiss_version=faiss.__version__)
            return manifest

        name = persist.write_generation(self.path, fill)
        self.manifest = persist.read_manifest(self.path / name)
        self.generation = name
        for coll in self._collections.values():
            coll.dirty = False
        persist.cleanup(self.path)
        return name

    # ------------------------------------------------------------------ info / closing
    def info(self) -> dict[str, Any]:
        """A JSON-friendly summary for ``radlens index info``."""
        m = self.manifest
        gen_dir = self.path / self.generation
        colls = {}
        for name, coll in sorted(self._collections.items()):
            ident = self._models.get(name) or self._folder_model()
            colls[name] = {"factory": coll.factory, "auto": coll.auto, "count": len(coll),
                           "dead": coll.dead, "dim": coll.dim, "nprobe": coll.nprobe,
                           "rerank": coll.rerank_factor, "catalog_rows": self.catalog.count(name),
                           "model_name": ident.model_name, "config_hash": ident.config_hash}
        disk = sum(int(f["bytes"]) for f in m.get("files", {}).values())
        return {"path": str(self.path), "generation": self.generation, "mode": self.mode,
                "format_version": m["format_version"], "model_name": m["model_name"],
                "config_hash": m["config_hash"], "dim": m["dim"], "metric": m["metric"],
                "preprocessing": m.get("preprocessing", {}), "created": m.get("created"),
                "updated": m.get("updated"), "collections": colls,
                "catalog_rows": self.catalog.count(), "bytes_on_disk": disk,
                # what `radlens index remove` erased and later builds leave out, by kind
                "withheld": {k: len(self.catalog.withheld(k)) for k in WITHHELD_KINDS},
                "generation_dir": str(gen_dir), "faiss_version": faiss.__version__}

    def close(self) -> None:
        """Stop :meth:`watch`, close the catalog and release the writer lock (unsaved changes
        are dropped)."""
        if self._watcher is not None:
            self._stop_watching.set()
            self._watcher.join(timeout=60)
            self._watcher = None
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> IndexFolder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_collection_model(path: str | os.PathLike[str], name: str) -> CollectionModel | None:
    """The model that filled collection ``name`` of the index folder at ``path``, read from the
    live generation's manifest alone (no vectors, faiss indexes or catalog are opened); None
    when the folder has no such collection."""
    folder = Path(path)
    manifest = persist.read_manifest(folder / persist.read_current(folder))
    meta = manifest["collections"].get(name)
    return None if meta is None else _model_from_meta(meta, manifest)


def _model_from_meta(meta: Mapping[str, Any], manifest: Mapping[str, Any]) -> CollectionModel:
    """A collection's model from its manifest entry; missing fields inherit the folder's."""
    source = meta.get("model_source")
    return CollectionModel(str(meta.get("model_name", manifest["model_name"])),
                           str(meta.get("config_hash", manifest["config_hash"])),
                           int(meta.get("dim", manifest["dim"])),
                           str(source) if source is not None else None)
