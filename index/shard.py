"""Shards: split one archive's build over many processes or machines, then merge.

``radlens index build ... --shard I/N`` indexes only the items whose *shard key* hashes to
``I`` modulo ``N``, into its own index folder; :func:`index.merge.merge_indexes` (``radlens
index merge``) combines the N folders into one. The keys do not depend on the machine, so N
builds on N machines split an archive into disjoint parts that together cover it:

* a file under a folder source: its path relative to the source, ``/``-separated (the
  archive may be mounted at another place on each machine);
* a DICOMweb instance or series: its Study Instance UID, so that each study is listed and
  fetched by one shard only (and a study's series and images stay together);
* a volume under a folder source: the relative path of its NIfTI file or series folder.

Every shard still walks (or searches) the whole source: a walk costs one ``stat`` per file,
against a decode and an encode for each file the shard keeps.

Public API: :class:`Shard` (``parse``, ``holds``, ``whole``), :func:`shard_key`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vlm.errors import RadLensError

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
#: More shards than this is a typing error (and every shard walks the whole source).
MAX_SHARDS = 100_000


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based) of ``count`` parts."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise RadLensError(f"shard count must be 1 to {MAX_SHARDS}, not {self.count}")
        if not 0 <= self.index < self.count:
            raise RadLensError(f"shard {self.index}/{self.count}: the index must be 0 to "
                               f"{self.count - 1}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` (0-based, as in ``--shard 0/4`` ... ``--shard 3/4``)."""
        m = _SPEC.match(str(text))
        if not m:
            raise RadLensError(f"--shard takes I/N (e.g. 0/4 for the first of four parts), not "
                               f"{text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def whole(cls) -> Shard:
        """The one shard that holds everything (``0/1``)."""
        return cls(0, 1)

    def holds(self, key: str) -> bool:
        """Whether the item with shard key ``key`` belongs to this shard."""
        if self.count == 1:
            return True
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_key(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """The shard key of a file or folder under a folder source: its path relative to ``root``,
    ``/``-separated (``.`` for the root itself)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return Path(rel).as_posix()
