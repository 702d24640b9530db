"""Crash-safe generations of an index folder.

Layout::

    <folder>/CURRENT             name of the live generation, e.g. "gen-000007"
    <folder>/manifest.json       copy of the live generation's manifest (informational)
    <folder>/LOCK                writer lock (see index.lock)
    <folder>/catalog-work.sqlite the writer's working catalog (WAL mode; not read by readers)
    <folder>/gen-000007/         manifest.json, catalog.sqlite, <collection>.{faiss,ids.npy,
                                 vectors.f16.npy,alive.npy}

A save writes ``gen-N.tmp/`` (every file hashed while written and fsynced), renames it to
``gen-N/``, fsyncs the folder, then replaces ``CURRENT`` with ``os.replace``. A process killed
at any point leaves ``CURRENT`` naming the previous complete generation; the next writer
removes the leftovers. Generations are immutable once named, so readers need no lock.

Public API: :func:`write_generation`, :func:`read_current`, :func:`read_manifest`,
:func:`verify_files`, :func:`cleanup`, :func:`write_bytes`, :func:`write_array`,
:func:`read_array`, :func:`fsync_dir`, :data:`FORMAT_VERSION`, :data:`NPY_HEADER_LOCK`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from index.errors import IndexCorruptError, IndexFormatError

logger = logging.getLogger(__name__)

#: Held while numpy parses an ``.npy`` header. numpy parses it with ``ast.literal_eval``, and
#: CPython 3.11 keeps the AST constructor's recursion depth in interpreter-wide state: two
#: threads converting an AST at once (a reader reloading while another thread loads, e.g. a
#: finaliser switching threads mid-parse) fail with ``SystemError: AST constructor recursion
#: depth mismatch``. Seen once in CI on the concurrent-readers test.
NPY_HEADER_LOCK = threading.Lock()

FORMAT_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
KEEP_GENERATIONS = 2
#: Test hook: seconds to sleep after a generation is written and before it is switched in.
PAUSE_ENV = "RADLENS_INDEX_TEST_PAUSE_BEFORE_SWITCH"
_GEN = re.compile(r"^gen-(\d{6,})(\.tmp)?$")
_CHUNK = 1 << 22


def gen_name(number: int) -> str:
    """Folder name of generation ``number``."""
    return f"gen-{number:06d}"


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """File-like wrapper that hashes what it writes."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        return self.fh.write(view)

    def flush(self) -> None:
        self.fh.flush()


def write_bytes(path: Path, data: bytes | np.ndarray) -> dict[str, Any]:
    """Write, fsync and hash ``data``. Returns ``{"sha256", "bytes"}``."""
    with open(path, "xb") as fh:
        w = _HashingWriter(fh)
        raw: Any = np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data
        buf = memoryview(raw).cast("B")
        for start in range(0, len(buf), _CHUNK):
            w.write(buf[start:start + _CHUNK])
        fh.flush()
        os.fsync(fh.fileno())
    return {"sha256": w.sha.hexdigest(), "bytes": w.size}


def write_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` as ``.npy`` (fsynced, hashed while written, in chunks)."""
    with open(path, "xb") as fh:
        w = _HashingWriter(fh)
        arr = np.ascontiguousarray(array)  # the header must describe the C-order bytes below
        header = np.lib.format.header_data_from_array_1_0(arr)
        np.lib.format.write_array_header_1_0(w, header)
        rows = max(1, _CHUNK // max(1, arr.itemsize * int(np.prod(arr.shape[1:]) or 1)))
        for start in range(0, arr.shape[0] if arr.ndim else 1, rows):
            w.write(np.ascontiguousarray(arr[start:start + rows]).tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    return {"sha256": w.sha.hexdigest(), "bytes": w.size}


def read_array(path: Path, *, mmap: bool = False) -> np.ndarray:
    """Read an ``.npy`` file; only the header parse holds :data:`NPY_HEADER_LOCK`.

    Args:
        path: the file.
        mmap: map it read-only instead of reading it into memory.
    """
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        with NPY_HEADER_LOCK:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise IndexCorruptError(f"{path}: unsupported .npy version {version}")
        if dtype.hasobject:
            raise IndexCorruptError(f"{path}: object arrays are not index data")
        order: Literal["C", "F"] = "F" if fortran else "C"
        if mmap:
            return np.memmap(path, dtype=dtype, mode="r", shape=shape, order=order,
                             offset=fh.tell())
        count = int(np.prod(shape)) if shape else 1
        data = np.fromfile(fh, dtype=dtype, count=count)
        if data.size != count:
            raise IndexCorruptError(f"{path}: truncated ({data.size} of {count} values)")
        return data.reshape(tuple(shape), order=order)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def hash_existing(path: Path) -> dict[str, Any]:
    """fsync and hash a file something else wrote (e.g. SQLite)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def generations(folder: Path) -> list[tuple[int, bool, Path]]:
    """``(number, is_tmp, path)`` of every generation folder, oldest first."""
    out = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _GEN.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), bool(m.group(2)), p))
    return sorted(out)


def read_current(folder: Path) -> str:
    """Name of the live generation.

    Raises:
        IndexFormatError: ``folder`` is not an index folder.
    """
    try:
        name = (folder / CURRENT).read_text().strip()
    except FileNotFoundError:
        raise IndexFormatError(f"{folder} is not a RadLens index (no {CURRENT} file): create it "
                               "with 'radlens index build' or check the path") from None
    except NotADirectoryError:  # was an internal error
        raise IndexFormatError(f"{folder} is a file, not a RadLens index folder: check the "
                               "path") from None
    except UnicodeDecodeError:  # binary bytes in CURRENT: was an internal error
        raise IndexCorruptError(f"{folder / CURRENT} names no generation (not text): restore "
                                "the file or rebuild the index") from None
    if not _GEN.match(name) or name.endswith(".tmp"):
        raise IndexCorruptError(f"{folder / CURRENT} names no generation ({name!r}): restore "
                                "the file or rebuild the index")
    return name


def read_manifest(gen_dir: Path) -> dict[str, Any]:
    """Parsed ``manifest.json`` of a generation (format version checked)."""
    path = gen_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"{path} is unreadable ({exc}): restore it or rebuild the "
                                "index") from None
    if not isinstance(manifest, dict):
        raise IndexCorruptError(f"{path} is not an index manifest (a JSON object is expected): "
                                "restore it or rebuild the index")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{gen_dir.parent} has index format {version}; this RadLens "
                               f"reads format {FORMAT_VERSION}: rebuild the index")
    problem = _manifest_problem(manifest)
    if problem:  # a hand-edited or damaged manifest: was a KeyError or AttributeError
        raise IndexCorruptError(f"{path} is damaged ({problem}): restore it or rebuild the "
                                "index")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What a manifest of this format lacks, or None."""
    for key, kind in (("model_name", str), ("config_hash", str), ("dim", int),
                      ("files", dict), ("collections", dict)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            return f"'{key}' missing or not a {kind.__name__}"
    for rel, want in manifest["files"].items():
        if not (isinstance(want, dict) and isinstance(want.get("sha256"), str)
                and isinstance(want.get("bytes"), int)):
            return f"files entry '{rel}' has no sha256 and size"
    for name, meta in manifest["collections"].items():
        if not isinstance(meta, dict):
            return f"collection '{name}' is not an object"
    return None


def verify_files(gen_dir: Path, manifest: dict[str, Any]) -> None:
    """Check every data file's size and sha256 against the manifest.

    Raises:
        IndexCorruptError: Naming the first file that is missing or differs.
    """
    for rel, want in sorted(manifest["files"].items()):
        path = gen_dir / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if not gen_dir.exists():
                raise  # the generation was removed under us: the caller retries
            raise IndexCorruptError(f"index file {path} is missing: restore it or rebuild the "
                                    "index") from None
        if size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise IndexCorruptError(f"index file {path} is corrupt (checksum mismatch): restore "
                                    "it or rebuild the index")


def write_generation(folder: Path, fill: Callable[[Path], dict[str, Any]]) -> str:
    """Write a new generation and switch ``CURRENT`` to it atomically.

    Args:
        folder: The index folder (the caller holds the writer lock).
        fill: Writes the data files into the temporary folder and returns the manifest, whose
            ``files`` entry maps each file name to ``{"sha256", "bytes"}``.

    Returns:
        The new generation's name.
    """
    number = max((n for n, _, _ in generations(folder)), default=0) + 1
    name = gen_name(number)
    tmp = folder / f"{name}.tmp"
    tmp.mkdir()
    manifest = fill(tmp)
    manifest["generation"] = number
    write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    fsync_dir(tmp)
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if pause > 0:
        sys.stderr.write(f"radlens-index: paused before switching to {name}\n")
        sys.stderr.flush()
        time.sleep(pause)
    os.rename(tmp, folder / name)
    fsync_dir(folder)
    _replace_text(folder / CURRENT, name + "\n")
    try:
        _replace_text(folder / MANIFEST, (tmp.parent / name / MANIFEST).read_text())
    except OSError as exc:  # informational copy only
        logger.warning("could not update %s: %s", folder / MANIFEST, exc)
    logger.info("index %s: switched to %s", folder, name)
    return name


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def cleanup(folder: Path, keep: int = KEEP_GENERATIONS) -> None:
    """Remove unfinished ``*.tmp`` generations and all but the newest ``keep`` complete ones.

    Only the writer (holding the lock) calls this.
    """
    try:
        current = read_current(folder)
    except IndexFormatError:
        current = ""
    done = [(n, p) for n, is_tmp, p in generations(folder) if not is_tmp]
    old = {p.name for _, p in done[:-keep]} if keep > 0 else set()
    for _, is_tmp, p in generations(folder):
        if (is_tmp or p.name in old) and p.name != current:
            shutil.rmtree(p, ignore_errors=True)
            logger.debug("removed %s", p)
