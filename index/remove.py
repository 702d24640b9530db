"""Erase patients, studies, series, instances or files from an index (``radlens index remove``).

A withdrawn consent, a study filed under the wrong patient, a file that should never have
been exported: what is erased must leave the index entirely, not only stop showing up.

* **What is found.** Identifiers are given as the pseudonyms RadLens shows (``st-…``,
  ``se-…``, ``im-…``, ``pt-…``) or as the raw DICOM values (a StudyInstanceUID, a PatientID),
  which are pseudonymised here with the site secret; a raw value is refused when the index's
  pseudonyms were made with another secret, since it could then match nothing. Files and
  folders are found by the content hash of each file under them and by the pseudonym of its
  path. Regions go with their image. Patients are found by the pseudonym that ingestion has
  recorded since session 22; an index built before that finds its studies by ``--study``.
* **What is erased.** Catalog rows (with SQLite's secure delete, then ``VACUUM``), vectors
  (the affected collections are compacted, so their arrays and faiss codes no longer hold
  them), thumbnails, volume previews and viewer stacks; then one generation is saved and the
  older generations, which still held the items, are deleted. Erased ids are never reused.
* **What stays out.** Unless ``withhold=False``, the erased items' content hashes and
  instance/series pseudonyms are recorded in the catalog, and later builds, DICOMweb pulls and
  merges into this index skip them (counted as ``withheld``), so a rerun over the same archive
  does not add them back.
* **Safety.** No row is changed when nothing matches, on a dry run, or on any error before
  the save; the save is the usual atomic switch of ``CURRENT``. Files are deleted after the
  save, and every run (dry runs excepted) also deletes the files under ``thumbs/`` and
  ``volumes/`` that no row points at, so rerunning after a run killed in between finishes it.

Public API: :func:`remove_items`, :class:`RemoveReport`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from index import persist
from index.folder import IndexFolder
from vlm.errors import RadLensError

logger = logging.getLogger(__name__)

#: option -> (catalog column, pseudonym kind)
TARGETS = {"patient": ("patient", "pt"), "study": ("study", "st"), "series": ("series", "se"),
           "instance": ("instance", "im")}
_PSEUDONYM = re.compile(r"^(pt|st|se|im)-[0-9a-f]{20}$")


@dataclass
class RemoveReport:
    index: str
    dry_run: bool = False
    #: rows found per collection
    matched: dict[str, int] = field(default_factory=dict)
    #: identifiers (by pseudonym) and files (by path) that matched nothing
    unmatched: list[str] = field(default_factory=list)
    removed: int = 0
    files_deleted: int = 0
    withheld: int = 0
    generation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pseudonyms(ix: IndexFolder, kind: str, values: Iterable[str]) -> list[str]:
    """The pseudonyms of the given values, in order. Raw values are pseudonymised with the
    site secret, which must be the one the index's pseudonyms were made with."""
    from vlm.io.deid import default_pseudonymizer

    out: list[str] = []
    for raw in values:
        text = str(raw).strip()
        if not text:
            raise RadLensError(f"an empty {kind} identifier")
        m = _PSEUDONYM.match(text)
        if m:
            if m.group(1) != kind:
                raise RadLensError(f"{text} is a {m.group(1)}- pseudonym, not a {kind}- one")
            out.append(text)
            continue
        pseudo = default_pseudonymizer()
        bound = ix.manifest.get("pseudonym_key")
        if bound and bound != pseudo.key_id:
            raise RadLensError(f"index {ix.path}: its pseudonyms were made with another site "
                               f"secret, so a raw {kind}- identifier cannot be matched: give "
                               "the pseudonym RadLens shows for it instead")  # never echoed
        out.append(pseudo(kind, text) or "")
    return out


def _under(given: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(content hashes of the files, absolute paths of the files and folders) under ``given``,
    itself included: a DICOM series is indexed by its folder's path."""
    from index.ingest import file_hash  # the content hash ingestion records

    p = Path(given)
    if not p.exists():
        raise RadLensError(f"{p}: no such file or folder (give an indexed study's pseudonym "
                           "instead)")
    entries = [p, *sorted(p.rglob("*"))] if p.is_dir() else [p]
    return ([file_hash(f) for f in entries if f.is_file()],
            [os.path.abspath(f) for f in entries])


def sweep_unreferenced(ix: IndexFolder) -> int:
    """Delete the files no catalog row points at (:meth:`IndexFolder.unreferenced_files`):
    those of items just erased, or left by a run killed before it deleted them. Returns how
    many. The caller holds the writer lock."""
    files = ix.unreferenced_files()
    for p in files:
        p.unlink(missing_ok=True)
    return len(files)


def _erase(ix: IndexFolder, items: list[Any], withhold: bool, report: RemoveReport) -> None:
    """Withhold, remove and compact ``items``, erase their rows, save, drop older generations."""
    cat = ix.catalog
    if withhold:
        top = [it for it in items if "#" not in (it.content_hash or "")]  # regions: "hash#r"
        report.withheld = (
            cat.withhold("hash", [it.content_hash for it in top if it.content_hash])
            + cat.withhold("instance", [it.instance for it in top
                                        if it.instance and it.collection == "image"])
            + cat.withhold("series", [it.series for it in top
                                      if it.series and it.collection == "volume"]))
    for name in {it.collection for it in items}:
        coll = ix.collection(name, create=False)
        coll.remove([it.id for it in items if it.collection == name])
        coll.compact()  # the vectors leave the arrays and the faiss index
    report.removed = cat.erase(it.id for it in items)
    report.generation = ix.save()
    persist.cleanup(ix.path, keep=1)  # the older generations still hold the items


def remove_items(index: str | os.PathLike[str], *, patients: Iterable[str] = (),
                 studies: Iterable[str] = (), series: Iterable[str] = (),
                 instances: Iterable[str] = (), files: Iterable[str | os.PathLike[str]] = (),
                 withhold: bool = True, dry_run: bool = False) -> RemoveReport:
    """Erase what the identifiers and files name from the index at ``index`` (see the module
    docstring); ``dry_run`` only counts it.

    Raises:
        RadLensError: nothing to look for, a malformed identifier, a raw value under another
            site secret, a missing file, or an index that cannot be opened for writing.
    """
    given = {"patient": list(patients), "study": list(studies), "series": list(series),
             "instance": list(instances)}
    paths = list(files)
    if not paths and not any(given.values()):
        raise RadLensError("nothing to remove: give --patient, --study, --series, --instance "
                           "or --file")
    from vlm.io.deid import default_pseudonymizer

    report = RemoveReport(index=str(index), dry_run=dry_run)
    with IndexFolder.open(index, mode="w") as ix:
        cat = ix.catalog
        ids: set[int] = set()
        for option, values in given.items():
            column, kind = TARGETS[option]
            for pseudonym in _pseudonyms(ix, kind, values):
                hit = cat.ids_matching(column, [pseudonym])
                ids.update(hit)
                if not hit:  # by pseudonym: a raw PatientID is not echoed anywhere
                    report.unmatched.append(f"{option} {pseudonym}")
        pseudo = default_pseudonymizer()
        for path in paths:
            digests, names = _under(path)
            uris = {*names, *(pseudo("src", n) or "" for n in names)}  # without --keep-paths
            by_path = {*cat.ids_matching("content_hash", digests),
                       *cat.ids_matching("source_uri", uris - {""})}
            ids.update(by_path)
            if not by_path:
                report.unmatched.append(f"file {path}")
        ids.update(cat.children(ids))  # an image's regions go with it
        items = [it for it in cat.get_many(sorted(ids)) if it is not None]
        for it in items:
            report.matched[it.collection] = report.matched.get(it.collection, 0) + 1
        if dry_run:
            return report
        if items:
            _erase(ix, items, withhold, report)
        # after the save (a failed save leaves every row its files): the erased items' files,
        # and any that a killed run left behind
        report.files_deleted = sweep_unreferenced(ix)
    logger.info("removed %d rows from %s", report.removed, index)
    return report
