"""Check an index end to end (``radlens index verify``): after a full disk, a copy between
machines or a restore from backup, is every row still whole?

Opening the index already verifies the sha256 checksum of every file of the live generation
(a mismatch is an :class:`~index.errors.IndexCorruptError`). On top of that, :func:`verify`
checks what checksums cannot see, because each file can be intact and the set still wrong:

* every catalog row has a live vector in its collection, and every live vector a row;
* each collection's faiss index holds the rows it should (``ntotal`` against the indexed slots);
* every region's parent image is there;
* every file a row points at (thumbnail, volume stack, slice previews) exists in the folder.

Files under ``thumbs/`` and ``volumes/`` that no row points at are counted, not failed: a
killed build leaves them, and ``radlens index remove`` deletes them. Read-only: it takes no lock
and changes nothing.

Public API: :func:`verify`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from index.folder import IndexFolder

#: problems listed by name in the report (counts are always complete)
EXAMPLES = 5


def verify(index: str | os.PathLike[str]) -> dict[str, Any]:
    """The report of :mod:`index.verify`'s checks; ``ok`` is False when any check failed.

    Raises:
        IndexCorruptError / IndexFormatError: a file fails its checksum, or no index is there.
    """
    problems: list[str] = []
    out: dict[str, Any] = {"index": str(index), "collections": {}}
    with IndexFolder.open(index) as ix:  # checksums of every file verified here
        out["generation"] = ix.generation
        cat = ix.catalog
        for name in ix.collections():
            coll = ix.collection(name, create=False)
            rows = cat.filter_ids(name)
            vectors = np.sort(coll.ids())
            no_vector = np.setdiff1d(rows, vectors)
            no_row = np.setdiff1d(vectors, rows)
            ntotal, indexed = int(coll.index.ntotal), int(coll.indexed)
            out["collections"][name] = {"rows": len(rows), "vectors": len(vectors),
                                        "rows_without_vector": len(no_vector),
                                        "vectors_without_row": len(no_row),
                                        "faiss_rows": ntotal, "indexed_slots": indexed}
            if len(no_vector):
                problems.append(f"{name}: {len(no_vector)} catalog rows have no vector "
                                f"(ids {no_vector[:EXAMPLES].tolist()})")
            if len(no_row):
                problems.append(f"{name}: {len(no_row)} vectors have no catalog row "
                                f"(ids {no_row[:EXAMPLES].tolist()})")
            if ntotal != indexed:
                problems.append(f"{name}: the faiss index holds {ntotal} rows, the collection "
                                f"says {indexed} are indexed")
        orphans = cat.orphans("region", "image") if "region" in ix.collections() else []
        used = cat.files_in_use()
        missing = sorted(rel for rel in used if not (ix.path / rel).is_file())
        if orphans:
            problems.append(f"region: {len(orphans)} regions have no parent image "
                            f"(ids {orphans[:EXAMPLES]})")
        if missing:
            problems.append(f"{len(missing)} files that rows point at are missing "
                            f"({', '.join(missing[:EXAMPLES])})")
        unreferenced = len(ix.unreferenced_files(used))
    out.update(orphan_regions=len(orphans), missing_files=len(missing),
               unreferenced_files=unreferenced, problems=problems, ok=not problems)
    return out

