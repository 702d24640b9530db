"""The SQLite catalog beside the vectors: one row per indexed item, same 64-bit id.

The writer's working copy runs in WAL mode; each saved generation holds a self-contained
snapshot (rollback journal, opened ``immutable`` by readers). Study, series and instance
columns take pseudonyms only (see :mod:`vlm.io.deid`); a value that looks like a raw DICOM UID
is refused. Text filters compare case-insensitively.

Public API: :class:`CatalogItem` (one row), :class:`Catalog` with ``add``, ``upsert``,
``remove``, ``get``, ``get_many``, ``find_by_hash``, ``content_hashes``, ``find_by_instance``,
``filter_ids``, ``count``, ``counts``, ``next_id``, ``snapshot_to``, ``close``; for erasure
``ids_matching``, ``children``, ``erase``, ``withhold``, ``withheld``; for checks
``files_in_use``, ``orphans``; :func:`item_files`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm.errors import RadLensError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_RAW_UID = re.compile(r"^\d+(\.\d+){3,}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    source_uri TEXT,
    study TEXT, series TEXT, instance TEXT,
    modality TEXT COLLATE NOCASE, body_part TEXT COLLATE NOCASE, view TEXT COLLATE NOCASE,
    year INTEGER, rows INTEGER, cols INTEGER,
    x0 REAL, y0 REAL, x1 REAL, y1 REAL,
    thumbnail TEXT, ingested_at REAL NOT NULL, model TEXT, content_hash TEXT,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS items_hash ON items(content_hash);
CREATE INDEX IF NOT EXISTS items_instance ON items(instance);
CREATE INDEX IF NOT EXISTS items_filter ON items(collection, modality, body_part, view, year);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS withheld (
    kind TEXT NOT NULL, value TEXT NOT NULL, removed_at REAL NOT NULL,
    PRIMARY KEY (kind, value)
);
"""

#: what an erased item is withheld by, so that later builds do not add it back
WITHHELD_KINDS = ("hash", "instance", "series")
#: columns :meth:`Catalog.ids_matching` looks in ("patient": the pseudonym in ``extra``)
MATCH_COLUMNS = ("study", "series", "instance", "patient", "content_hash", "source_uri",
                 "thumbnail")


@dataclass
class CatalogItem:
    """One catalog row. ``box`` is ``(x0, y0, x1, y1)`` in pixels for region rows, else None."""

    id: int
    collection: str
    source_uri: str | None = None
    study: str | None = None
    series: str | None = None
    instance: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    year: int | None = None
    rows: int | None = None
    cols: int | None = None
    box: tuple[float, float, float, float] | None = None
    thumbnail: str | None = None
    ingested_at: float = 0.0
    model: str | None = None
    content_hash: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the row."""
        out = dataclasses.asdict(self)
        out["box"] = list(self.box) if self.box is not None else None
        return out


_COLUMNS = ("id", "collection", "source_uri", "study", "series", "instance", "modality",
            "body_part", "view", "year", "rows", "cols", "x0", "y0", "x1", "y1", "thumbnail",
            "ingested_at", "model", "content_hash", "extra")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM items"


def _item_from_row(row: Sequence[Any]) -> CatalogItem:
    d = dict(zip(_COLUMNS, row, strict=True))
    box = None if d["x0"] is None else (d["x0"], d["y0"], d["x1"], d["y1"])
    return CatalogItem(
        id=d["id"], collection=d["collection"], source_uri=d["source_uri"], study=d["study"],
        series=d["series"], instance=d["instance"], modality=d["modality"],
        body_part=d["body_part"], view=d["view"], year=d["year"], rows=d["rows"],
        cols=d["cols"], box=box, thumbnail=d["thumbnail"], ingested_at=d["ingested_at"],
        model=d["model"], content_hash=d["content_hash"], extra=json.loads(d["extra"] or "{}"))


def item_files(thumbnail: object, extra: Mapping[str, Any] | None) -> list[str]:
    """The index-relative files a row points at: its thumbnail, and a volume's viewer stack
    and slice previews (in ``extra``)."""
    extra = extra or {}
    files = [thumbnail, extra.get("stack"),
             *(s.get("preview") for s in extra.get("salient") or [] if isinstance(s, Mapping))]
    return [f for f in files if isinstance(f, str) and f]


def _row_from_item(item: CatalogItem | Mapping[str, Any]) -> tuple[Any, ...]:
    it = item if isinstance(item, CatalogItem) else CatalogItem(**dict(item))
    for name in ("study", "series", "instance"):
        value = getattr(it, name)
        if value is not None and _RAW_UID.match(str(value)):
            raise RadLensError(f"catalog {name} '{value}' looks like a raw DICOM UID: store its "
                               "pseudonym instead (vlm.io.deid.default_pseudonymizer)")
    box = it.box if it.box is not None else (None, None, None, None)
    if len(box) != 4:
        raise RadLensError(f"catalog item {it.id}: box needs 4 numbers (x0, y0, x1, y1)")
    return (int(it.id), it.collection, it.source_uri, it.study, it.series, it.instance,
            it.modality, it.body_part, it.view, it.year, it.rows, it.cols, *box, it.thumbnail,
            it.ingested_at or time.time(), it.model, it.content_hash,
            json.dumps(it.extra or {}, sort_keys=True))


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


class Catalog:
    """SQLite catalog of indexed items (thread-safe; one connection guarded by a lock).

    Args:
        path: Database file.
        readonly: Open an immutable snapshot (no writes, no WAL files).
    """

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            uri = f"file:{self.path}?mode=ro&immutable=1"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
            self._db.commit()

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def _write(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        if self.readonly:
            raise RadLensError(f"catalog {self.path} is read-only: open the index with mode='w'")
        with self._lock, self._db:
            cur = self._db.executemany(sql, rows)
            return cur.rowcount

    def add(self, items: Iterable[CatalogItem | Mapping[str, Any]]) -> int:
        """Insert rows; an id already present is an error (use :meth:`upsert`)."""
        rows = [_row_from_item(it) for it in items]
        try:
            return self._write(f"INSERT INTO items VALUES ({', '.join('?' * len(_COLUMNS))})",
                               rows)
        except sqlite3.IntegrityError as exc:
            raise RadLensError(f"catalog {self.path}: an item id is already present ({exc}); "
                               "remove it first or use upsert") from None

    def upsert(self, items: Iterable[CatalogItem | Mapping[str, Any]]) -> int:
        """Insert or replace rows by id."""
        rows = [_row_from_item(it) for it in items]
        return self._write(
            f"INSERT OR REPLACE INTO items VALUES ({', '.join('?' * len(_COLUMNS))})", rows)

    def remove(self, ids: Iterable[int]) -> int:
        """Delete rows by id; returns how many existed."""
        return self._write("DELETE FROM items WHERE id = ?", [(int(i),) for i in ids])

    def erase(self, ids: Iterable[int]) -> int:
        """Delete rows so that nothing of them stays in the file: SQLite's secure delete
        zeroes their pages, ``VACUUM`` rebuilds the file without them and the WAL is emptied.
        Ids stay used (:meth:`next_id` never hands an erased id out again). Returns rows
        deleted."""
        wanted = sorted({int(i) for i in ids})
        if self.readonly:
            raise RadLensError(f"catalog {self.path} is read-only: open the index with mode='w'")
        with self._lock:
            high = self.next_id()
            self._db.execute("PRAGMA secure_delete=ON")
            with self._db:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('next_id', ?)",
                                 (str(high),))
                n = 0
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start:start + 500]
                    n += self._db.execute(
                        f"DELETE FROM items WHERE id IN ({', '.join('?' * len(chunk))})",
                        chunk).rowcount
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def ids_matching(self, column: str, values: Iterable[str]) -> list[int]:
        """Ids (any collection) whose ``column`` is one of ``values``; ``column`` is one of
        :data:`MATCH_COLUMNS`."""
        if column not in MATCH_COLUMNS:
            raise RadLensError(f"cannot match on '{column}': use one of "
                               f"{', '.join(MATCH_COLUMNS)}")
        expr = "json_extract(extra, '$.patient')" if column == "patient" else column
        vals, out = sorted(set(values)), []
        for start in range(0, len(vals), 500):
            chunk = vals[start:start + 500]
            out += [r[0] for r in self._query(
                f"SELECT id FROM items WHERE {expr} IN ({', '.join('?' * len(chunk))})", chunk)]
        return sorted(set(out))

    def children(self, parents: Iterable[int]) -> list[int]:
        """Ids of the rows (regions) whose ``extra.parent`` is one of ``parents``."""
        keys, out = sorted({int(p) for p in parents}), []
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            out += [r[0] for r in self._query(
                "SELECT id FROM items WHERE json_extract(extra, '$.parent') IN "
                f"({', '.join('?' * len(chunk))})", chunk)]
        return sorted(set(out))

    def files_in_use(self) -> set[str]:
        """Every index-relative file a row points at (:func:`item_files`), read in bulk: the
        thumbnail column, and ``extra`` only of the rows that name a stack or previews."""
        used = {str(r[0]) for r in self._query(
            "SELECT DISTINCT thumbnail FROM items WHERE thumbnail IS NOT NULL")}
        for thumb, extra in self._query("SELECT thumbnail, extra FROM items WHERE extra LIKE "
                                        "'%\"stack\"%' OR extra LIKE '%\"salient\"%'"):
            used.update(item_files(thumb, json.loads(extra or "{}")))
        return used

    def orphans(self, child: str = "region", parent: str = "image") -> list[int]:
        """Ids of ``child`` rows whose ``extra.parent`` is no ``parent`` row."""
        return [r[0] for r in self._query(
            "SELECT id FROM items WHERE collection = ? AND json_extract(extra, '$.parent') "
            "IS NOT NULL AND json_extract(extra, '$.parent') NOT IN "
            "(SELECT id FROM items WHERE collection = ?) ORDER BY id", (child, parent))]

    def withhold(self, kind: str, values: Iterable[str]) -> int:
        """Record content hashes, instance or series pseudonyms that later builds must not add
        back (an erasure); returns how many were new."""
        if kind not in WITHHELD_KINDS:
            raise RadLensError(f"cannot withhold '{kind}': use one of {', '.join(WITHHELD_KINDS)}")
        now = time.time()
        return self._write("INSERT OR IGNORE INTO withheld VALUES (?, ?, ?)",
                           [(kind, str(v), now) for v in sorted(set(values)) if v])

    def withheld(self, kind: str) -> set[str]:
        """What :meth:`withhold` recorded for ``kind`` (empty for a catalog from before it)."""
        try:
            return {str(r[0]) for r in self._query("SELECT value FROM withheld WHERE kind = ?",
                                                   (kind,))}
        except sqlite3.OperationalError:  # a snapshot saved before the table existed
            return set()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, item_id: int) -> CatalogItem | None:
        """The row with ``item_id``, or None."""
        rows = self._query(f"{_SELECT} WHERE id = ?", (int(item_id),))
        return _item_from_row(rows[0]) if rows else None

    def get_many(self, ids: Iterable[int]) -> list[CatalogItem | None]:
        """Rows for ``ids`` in the same order (None where missing); ``-1`` gives None."""
        wanted = [int(i) for i in ids]
        found: dict[int, CatalogItem] = {}
        keys = sorted({i for i in wanted if i >= 0})
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            for row in self._query(f"{_SELECT} WHERE id IN ({marks})", chunk):
                found[row[0]] = _item_from_row(row)
        return [found.get(i) for i in wanted]

    def find_by_hash(self, content_hash: str, model: str | None = None,
                     collection: str | None = None) -> list[CatalogItem]:
        """Rows with this content hash (dedupe), optionally for one model/collection."""
        sql, args = f"{_SELECT} WHERE content_hash = ?", [content_hash]
        if model is not None:
            sql, args = sql + " AND model = ?", [*args, model]
        if collection is not None:
            sql, args = sql + " AND collection = ?", [*args, collection]
        return [_item_from_row(r) for r in self._query(sql, args)]

    def _values(self, column: str, collection: str | None) -> set[str]:
        """Every non-null value of ``column`` (a fixed column name, never user text)."""
        sql, args = f"SELECT DISTINCT {column} FROM items WHERE {column} IS NOT NULL", []
        if collection is not None:
            sql, args = sql + " AND collection = ?", [collection]
        return {str(r[0]) for r in self._query(sql, args)}

    def content_hashes(self, collection: str | None = None) -> set[str]:
        """Every content hash present (one bulk read for dedupe during ingestion)."""
        return self._values("content_hash", collection)

    def pseudonyms(self, column: str, collection: str | None = None) -> set[str]:
        """Every study, series or instance pseudonym present (one bulk read: a DICOMweb source
        skips the instances and series an index holds before fetching them)."""
        if column not in ("study", "series", "instance"):
            raise RadLensError(f"no pseudonyms in column '{column}': use study, series or "
                               "instance")
        return self._values(column, collection)

    def distinct(self, column: str, collection: str | None = None) -> list[Any]:
        """Sorted distinct non-null values of a filter column (the app's filter choices)."""
        if column not in ("modality", "body_part", "view", "year"):
            raise RadLensError(f"no distinct values for column '{column}': use modality, "
                               "body_part, view or year")
        sql, args = f"SELECT DISTINCT {column} FROM items WHERE {column} IS NOT NULL", []
        if collection is not None:
            sql, args = sql + " AND collection = ?", [collection]
        return [r[0] for r in self._query(sql + f" ORDER BY {column}", args)]

    def find_by_instance(self, instance: str,
                         collection: str | None = None) -> list[CatalogItem]:
        """Rows of one instance pseudonym (dedupe by instance)."""
        sql, args = f"{_SELECT} WHERE instance = ?", [instance]
        if collection is not None:
            sql, args = sql + " AND collection = ?", [*args, collection]
        return [_item_from_row(r) for r in self._query(sql, args)]

    def filter_ids(self, collection: str | None = None, *,
                   modality: str | Iterable[str] | None = None,
                   body_part: str | Iterable[str] | None = None,
                   view: str | Iterable[str] | None = None, year_min: int | None = None,
                   year_max: int | None = None) -> np.ndarray:
        """Sorted int64 ids of the rows matching every given filter (None = any)."""
        where: list[str] = []
        args: list[Any] = []
        if collection is not None:
            where.append("collection = ?")
            args.append(collection)
        for col, value in (("modality", modality), ("body_part", body_part), ("view", view)):
            values = _as_list(value)
            if values is not None:
                where.append(f"{col} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        if year_min is not None:
            where.append("year >= ?")
            args.append(int(year_min))
        if year_max is not None:
            where.append("year <= ?")
            args.append(int(year_max))
        sql = "SELECT id FROM items" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = self._query(sql + " ORDER BY id", args)
        return np.fromiter((r[0] for r in rows), np.int64, count=len(rows))

    def count(self, collection: str | None = None) -> int:
        """Number of rows (in one collection or all)."""
        if collection is None:
            return int(self._query("SELECT COUNT(*) FROM items")[0][0])
        return int(self._query("SELECT COUNT(*) FROM items WHERE collection = ?",
                               (collection,))[0][0])

    def counts(self) -> dict[str, int]:
        """Rows per collection."""
        rows = self._query("SELECT collection, COUNT(*) FROM items GROUP BY collection")
        return {str(c): int(n) for c, n in rows}

    def next_id(self) -> int:
        """One more than the largest id in use or erased (0 for an empty catalog)."""
        top = self._query("SELECT MAX(id) FROM items")[0][0]
        mark = self._query("SELECT value FROM meta WHERE key = 'next_id'")
        return max(0 if top is None else int(top) + 1, int(mark[0][0]) if mark else 0)

    def snapshot_to(self, dest: str | Path) -> None:
        """Write a consistent, self-contained copy (rollback journal mode) to ``dest``."""
        dest = Path(dest)
        out = sqlite3.connect(dest)
        try:
            with self._lock:
                self._db.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")
            out.commit()
        finally:
            out.close()
