"""One walk over an archive folder, shared by image ingestion (:func:`index.ingest.walk`) and
volume ingestion (:func:`index.volumes.discover_volumes`), so both follow the same rules:

- folders and files in name order, depth first;
- symbolic links are followed, and each real folder (device, inode) is walked once, so a folder
  linked twice is read once and a link to a parent ends there;
- hidden entries (a leading ``.``) and RadLens' own side files (:data:`SKIP_NAMES`) are passed
  over in silence, as are RadLens index folders kept inside the archive (thumbnails and
  vectors, not archive images);
- what cannot be walked is reported through ``note(path, reason)``, never skipped silently: a
  folder that cannot be listed, an entry that cannot be examined, a broken link, a FIFO, socket
  or device (never opened: reading a FIFO would wait forever).

What counts as an image or a volume, and what a data set manifest means, is the caller's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from index.folder import is_index_folder

#: never archive content: DICOM directory files and RadLens' data set side files
SKIP_NAMES = frozenset({"DICOMDIR", "manifest.jsonl", "summary.json", "skipped.jsonl"})
MANIFEST = "manifest.jsonl"

Note = Callable[[str, str], None]


@dataclass
class Listing:
    """One folder of the walk. ``files``: its regular files (links to them included), name
    order; ``subfolders``: what the walk enters next, name order; clear it (``prune``) to keep
    the walk out of them, as for ``os.walk``'s ``dirs``."""

    path: str
    files: list[str] = field(default_factory=list)
    subfolders: list[str] = field(default_factory=list)
    has_manifest: bool = False

    @property
    def manifest(self) -> Path:
        return Path(self.path) / MANIFEST

    def prune(self) -> None:
        self.subfolders.clear()


def folders(source: str | os.PathLike[str], note: Note) -> Iterator[Listing]:
    """The folders under ``source`` (itself first), by the rules in the module docstring."""
    walked: set[tuple[int, int]] = set()
    stack = [os.fspath(source)]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in walked:  # linked twice, or a link to a parent
                continue
            walked.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            note(folder, f"unreadable folder ({e.strerror or e})")
            continue
        if is_index_folder(folder):
            continue
        here = Listing(folder, has_manifest=any(e.name == MANIFEST for e in entries))
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name in SKIP_NAMES:
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as e:
                note(entry.path, f"not read: {e.strerror or e}")
                continue
            if is_dir:
                here.subfolders.append(entry.path)
            elif is_file:
                here.files.append(entry.path)
            elif not os.path.exists(entry.path):
                note(entry.path, "broken symbolic link")
            else:
                note(entry.path, "not a regular file (a FIFO, socket or device): not read")
        yield here
        stack.extend(reversed(here.subfolders))
