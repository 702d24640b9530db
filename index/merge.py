"""Merge index folders into one: the shards of a distributed build (:mod:`index.shard`,
:mod:`index.distributed`), or any indexes filled by the same models.

``merge_indexes(shards, out)`` adds every row of every shard's collections to ``out`` (created
from the first shard's models if missing), with fresh ids:

* **Same models only.** Every shard, and ``out`` if it exists, must have the same folder model
  (name, config hash, dimension) and preprocessing (the recorded checkpoint paths may differ
  between machines), the same model for each collection they share, and the same site-secret
  key id (:attr:`vlm.io.deid.Pseudonymizer.key_id`): pseudonyms made under another secret do
  not match. Any difference refuses the whole merge before ``out`` is touched.
* **Idempotent.** A row whose content hash (a volume's also by its voxel hash) ``out`` already
  holds is counted as a duplicate and left out, so merging a shard twice, or a file that two
  shards both hold, adds it once. Region rows follow their parent image: remapped to its new
  id, left out with it.
* **Crash-safe.** Each shard is saved as one generation of ``out`` after all of its rows are
  added; a kill loses at most the shard in progress, and a rerun adds only what is missing.
* **Bad shards are reported, not fatal.** A shard that is not an index, or whose files fail
  their checksums, is listed in ``merge_report.json`` (in ``out``, mode 0600) and passed over;
  the others are merged. The report also carries each shard's failures reports (files that
  could not be read), once per distinct failure.
* **Fixed factories are retrained.** A collection whose faiss factory was chosen by hand (not
  ``auto``) and needs training (IVF, PQ, SQ) is trained on its first rows as they arrive; after
  the last shard it is rebuilt once on all of them.
* **Files.** Thumbnails, volume previews and viewer stacks that rows point at are copied into
  ``out`` (content-addressed, so a copy already there is kept); a missing one is counted, and
  its row still merged.

The merged vectors are the shards' stored float16 copies (what exact re-ranking uses), within
1e-3 of the originals.

Public API: :func:`merge_indexes`, :class:`MergeReport`, :data:`MERGE_REPORT`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from index import persist
from index.catalog import item_files
from index.errors import IndexCorruptError, IndexFormatError
from index.factory import describe
from index.folder import CollectionModel, IndexFolder, is_index_folder
from vlm.errors import ConfigError, RadLensError

logger = logging.getLogger(__name__)

MERGE_REPORT = "merge_report.json"
#: the shards' failures reports carried into the merge report
SHARD_REPORTS = ("ingest_report.json", "volume_ingest_report.json")
#: catalog rows read, and vectors added, at a time
ROW_CHUNK = 4096
#: tests: SIGKILL this process after this many shards are saved
KILL_ENV = "RADLENS_TEST_KILL_AFTER_MERGED_SHARDS"


@dataclass
class MergeReport:
    out: str
    #: per merged shard: path, generation, rows added and duplicates per collection
    shards: list[dict[str, Any]] = field(default_factory=list)
    added: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    #: shards passed over (not an index, damaged), with the reason
    bad_shards: list[dict[str, str]] = field(default_factory=list)
    #: the shards' failures-report rows, each once, with the shard that listed it first
    failed: list[dict[str, str]] = field(default_factory=list)
    #: thumbnails, previews or stacks that a merged row names and its shard lacks
    missing_files: int = 0
    #: rows left out because they were erased from ``out`` (``radlens index remove``)
    withheld: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Identity:
    """What must agree between the indexes being merged."""

    folder: CollectionModel
    preprocessing: dict[str, Any]
    collections: dict[str, CollectionModel]
    pseudonym_key: str | None

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> _Identity:
        folder = CollectionModel(str(manifest["model_name"]), str(manifest["config_hash"]),
                                 int(manifest["dim"]))
        colls = {}
        for name, meta in (manifest.get("collections") or {}).items():
            colls[name] = CollectionModel(str(meta.get("model_name", folder.model_name)),
                                          str(meta.get("config_hash", folder.config_hash)),
                                          int(meta.get("dim", folder.dim)),
                                          meta.get("model_source"))
        pre = {k: v for k, v in (manifest.get("preprocessing") or {}).items()
               if not k.endswith("model_path")}  # where the checkpoint was, on that machine
        return cls(folder, pre, colls, manifest.get("pseudonym_key"))

    def refuse_other(self, other: _Identity, mine: Path, theirs: Path) -> None:
        """Raise ConfigError naming the first thing in which ``other`` differs."""
        def same(a: CollectionModel, b: CollectionModel) -> bool:
            return (a.model_name, a.config_hash, a.dim) == (b.model_name, b.config_hash, b.dim)

        if not same(self.folder, other.folder):
            raise ConfigError(f"{theirs} was built with model {other.folder.model_name} (config "
                              f"{other.folder.config_hash}), {mine} with "
                              f"{self.folder.model_name} ({self.folder.config_hash}): only "
                              "indexes of the same model can be merged")
        if self.preprocessing != other.preprocessing:
            keys = sorted(k for k in {*self.preprocessing, *other.preprocessing}
                          if self.preprocessing.get(k) != other.preprocessing.get(k))
            raise ConfigError(f"{theirs} and {mine} preprocess images differently "
                              f"({', '.join(keys)}): only indexes of the same model can be "
                              "merged")
        for name in sorted(set(self.collections) & set(other.collections)):
            a, b = self.collections[name], other.collections[name]
            if not same(a, b):
                raise ConfigError(f"collection '{name}' of {theirs} holds vectors of model "
                                  f"{b.model_name} ({b.config_hash}), of {mine} "
                                  f"{a.model_name} ({a.config_hash}): only indexes of the same "
                                  "models can be merged")
        if (self.pseudonym_key and other.pseudonym_key
                and self.pseudonym_key != other.pseudonym_key):
            raise ConfigError(f"{theirs} was built under another site secret "
                              f"({other.pseudonym_key}) than {mine} ({self.pseudonym_key}): "
                              "their pseudonyms do not match; rebuild it with the same "
                              "RADLENS_SITE_SECRET")


def _manifest(folder: Path) -> dict[str, Any]:
    return persist.read_manifest(folder / persist.read_current(folder))


def _check_shards(shards: Sequence[Path], out: Path, report: MergeReport
                  ) -> tuple[list[Path], _Identity | None]:
    """The shards that can be read, with the identity they share (refusing a mismatch)."""
    if not shards:
        raise RadLensError("give at least one index folder to merge")
    seen: set[Path] = set()
    for s in shards:
        if s.resolve() == out.resolve():
            raise RadLensError(f"{s} is the output index: merge into another folder")
        if s.resolve() in seen:
            raise RadLensError(f"{s} is named twice: name each shard once")
        seen.add(s.resolve())
    readable: list[Path] = []
    ident: _Identity | None = None
    first: Path | None = None
    if is_index_folder(out):
        ident, first = _Identity.of(_manifest(out)), out
    for s in shards:
        if not is_index_folder(s):
            report.bad_shards.append({"path": str(s), "reason": "not a RadLens index (no "
                                      "CURRENT pointer and manifest): did its build finish?"})
            continue
        try:
            theirs = _Identity.of(_manifest(s))
        except (RadLensError, OSError, ValueError, KeyError) as exc:
            report.bad_shards.append({"path": str(s), "reason": f"unreadable manifest: {exc}"})
            continue
        if ident is None or first is None:
            ident, first = theirs, s
        else:
            ident.refuse_other(theirs, first, s)
            if ident.pseudonym_key is None and theirs.pseudonym_key is not None:
                ident = _Identity(ident.folder, ident.preprocessing, ident.collections,
                                  theirs.pseudonym_key)
            for name, model in theirs.collections.items():
                ident.collections.setdefault(name, model)
        readable.append(s)
    return readable, ident


def _copy(src_root: Path, dst_root: Path, rel: object) -> bool:
    """Copy the file ``rel`` (relative, inside ``src_root``) into ``dst_root`` unless there;
    False if the shard lacks it or ``rel`` points outside the shard."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute():
        return False
    root = src_root.resolve()
    src = (root / rel).resolve()
    if root not in src.parents or not src.is_file():
        return False
    dst = dst_root / rel
    if dst.is_file():
        return True
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def _shard_failures(shard: Path, report: MergeReport, seen: set[tuple[str, str, str]]) -> None:
    for name in SHARD_REPORTS:
        try:
            rows = json.loads((shard / name).read_text()).get("failed") or []
        except (OSError, ValueError, AttributeError):
            continue
        for row in rows:
            if not isinstance(row, Mapping):
                continue
            key = (name, str(row.get("path")), str(row.get("reason")))
            if key not in seen:
                seen.add(key)
                report.failed.append({"path": key[1], "reason": key[2], "report": name,
                                      "shard": str(shard)})


def _order(names: Iterable[str]) -> list[str]:
    """Collections whose rows can be parents (images) before those that point at them."""
    return sorted(names, key=lambda n: (n == "region", n))


def merge_indexes(shards: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                  progress: bool = False) -> MergeReport:
    """Merge the index folders ``shards`` into ``out`` (see the module docstring).

    Raises:
        ConfigError: the indexes were built with other models or another site secret.
        RadLensError: no shard given, a shard named twice or as ``out``, or no shard readable.
    """
    from tqdm import tqdm

    dest = Path(out)
    start = time.time()
    report = MergeReport(out=str(dest))
    paths, ident = _check_shards([Path(s) for s in shards], dest, report)
    if not paths or ident is None:
        first = report.bad_shards[0] if report.bad_shards else {"path": "", "reason": ""}
        raise RadLensError(f"no shard could be read, the first: {first['path']}: "
                           f"{first['reason']}")
    if is_index_folder(dest):
        ix = IndexFolder.open(dest, mode="w")
    else:
        m = _manifest(paths[0])
        ix = IndexFolder.create(dest, model_name=m["model_name"], config_hash=m["config_hash"],
                                dim=int(m["dim"]), preprocessing=m.get("preprocessing") or {})
    failures: set[tuple[str, str, str]] = set()
    merged = 0
    try:
        if ident.pseudonym_key:
            ix.bind_pseudonym_key(ident.pseudonym_key)
        known: dict[str, set[str]] = {}
        voxels: dict[str, set[str]] = {}
        withheld = ix.catalog.withheld("hash")  # erased from ``out``: never merged back
        for shard in tqdm(paths, unit="shard", disable=not progress):
            try:
                src = IndexFolder.open(shard)  # checksums verified
            except (IndexCorruptError, IndexFormatError, OSError) as exc:
                report.bad_shards.append({"path": str(shard), "reason": str(exc)})
                continue
            try:
                entry = _merge_one(src, ix, ident, known, voxels, report, withheld)
            finally:
                src.close()
            ix.save()
            entry["generation"] = ix.generation
            report.shards.append(entry)
            _shard_failures(shard, report, failures)
            merged += 1
            if merged == int(os.environ.get(KILL_ENV, "0") or 0):
                os.kill(os.getpid(), 9)
        if _retrain(ix, report):
            ix.save()
    finally:
        report.seconds = round(time.time() - start, 3)
        report_file = dest / MERGE_REPORT
        report_file.write_text(json.dumps(report.to_dict(), indent=1))
        report_file.chmod(0o600)
        ix.close()
    return report


def _retrain(ix: IndexFolder, report: MergeReport) -> bool:
    """Rebuild the trained collections of a fixed factory (an ``auto`` one retrains itself as
    it grows) that this merge added to: they were trained on the first rows added, one chunk
    of the first shard. Returns whether any was rebuilt."""
    rebuilt = False
    for name in ix.collections():
        coll = ix.collection(name, create=False)
        if report.added.get(name) and not coll.auto and describe(coll.factory).trained:
            logger.info("retraining '%s' (%s) on all %d merged rows", name, coll.factory,
                        len(coll))
            coll.rebuild()
            rebuilt = True
    return rebuilt


def _merge_one(src: IndexFolder, ix: IndexFolder, ident: _Identity,
               known: dict[str, set[str]], voxels: dict[str, set[str]],
               report: MergeReport, withheld: Set[str] = frozenset()) -> dict[str, Any]:
    """Add one shard's rows to ``ix`` (unsaved); returns its entry of the report."""
    entry: dict[str, Any] = {"path": str(src.path), "source_generation": src.generation,
                             "added": {}, "duplicates": {}}
    new_ids: dict[int, int] = {}  # the shard's image (parent) ids -> ids in ``ix``
    for name in _order(src.collections()):
        coll = src.collection(name, create=False)
        model = ident.collections.get(name) or src.collection_model(name)
        ix.collection(name, factory="auto" if coll.auto else coll.factory, model=model)
        if name not in known:
            known[name] = ix.catalog.content_hashes(name)
            voxels[name] = {str(it.extra["voxel_hash"])
                            for it in ix.catalog.get_many(ix.catalog.filter_ids(name).tolist())
                            if it is not None and isinstance((it.extra or {}).get("voxel_hash"),
                                                             str)}
        added = dupes = 0
        ids = src.catalog.filter_ids(name).tolist()
        for at in range(0, len(ids), ROW_CHUNK):
            chunk = [i for i in ids[at:at + ROW_CHUNK] if coll.contains(i)]
            if not chunk:
                continue
            vectors = coll.vectors(chunk)
            keep, rows, olds = [], [], []
            for j, item in enumerate(src.catalog.get_many(chunk)):
                if item is None:
                    continue
                row = item.to_dict()
                old = int(row.pop("id"))
                row.pop("collection")
                extra = dict(row.get("extra") or {})
                if "parent" in extra:  # a region: it goes (and is renumbered) with its image
                    parent = new_ids.get(int(extra["parent"]))
                    if parent is None:
                        dupes += 1
                        continue
                    extra["parent"] = parent
                    row["extra"] = extra
                else:
                    digest, vox = row.get("content_hash"), extra.get("voxel_hash")
                    if digest is not None and digest in withheld:
                        report.withheld += 1  # its regions are then left out with it
                        continue
                    if (digest is not None and digest in known[name]) or (
                            isinstance(vox, str) and vox in voxels[name]):
                        dupes += 1
                        continue
                    if digest is not None:
                        known[name].add(digest)
                    if isinstance(vox, str):
                        voxels[name].add(vox)
                for rel in item_files(row.get("thumbnail"), row.get("extra")):
                    if not _copy(src.path, ix.path, rel):
                        report.missing_files += 1
                keep.append(j)
                rows.append(row)
                olds.append(old)
            if rows:
                got = ix.add(name, vectors[keep], rows)
                new_ids.update(zip(olds, got.tolist(), strict=True))
                added += len(rows)
        entry["added"][name], entry["duplicates"][name] = added, dupes
        report.added[name] = report.added.get(name, 0) + added
        report.duplicates[name] = report.duplicates.get(name, 0) + dupes
    return entry
