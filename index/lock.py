"""One writer per index folder: an exclusive ``fcntl.flock`` on ``<folder>/LOCK``.

The lock belongs to the open file, so it disappears when the holder exits or is killed; a
stale ``LOCK`` file never blocks anyone. Readers take no lock (they read the immutable
generation named by ``CURRENT``).

Public API: :class:`WriterLock` (``acquire(timeout=0.0)``, ``release()``, context manager).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from index.errors import IndexBusyError

logger = logging.getLogger(__name__)

LOCK_NAME = "LOCK"


class WriterLock:
    """Exclusive writer lock of an index folder.

    Args:
        folder: The index folder (``LOCK`` is created inside it).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self, timeout: float = 0.0, poll: float = 0.05) -> WriterLock:
        """Take the lock, waiting up to ``timeout`` seconds.

        Raises:
            IndexBusyError: Another writer still holds it after ``timeout`` seconds.
        """
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    who = f" (pid {holder})" if holder else ""
                    waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
                    raise IndexBusyError(
                        f"index {self.folder} is being written by another process{who}{waited}: "
                        "run this again when it has finished (searches can read the index "
                        "meanwhile)"
                    ) from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        logger.debug("writer lock taken on %s", self.folder)
        return self

    def release(self) -> None:
        """Release the lock (no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
