"""The few exception types a user can cause. Each message is one line naming the thing and why.

The CLI prints ``str(error)`` and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RadLensError(Exception):
    """Base class for errors a user can cause and fix."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own reduce calls ``cls(*self.args)``: a subclass whose constructor takes
        # other arguments (ImageReadError(path, reason)) then failed to unpickle in the parent
        # of a worker process, which broke the whole process pool. Rebuild without __init__.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type[RadLensError], args: tuple[Any, ...], state: dict[str, Any]
             ) -> RadLensError:
    """Unpickle a :class:`RadLensError` (any subclass) with its message and attributes."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class ImageReadError(RadLensError):
    """A file could not be read as an image (corrupt, unsupported, no pixel data, ...)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.path}: {self.reason}")


class SeriesError(ImageReadError):
    """Files do not form one consistent volume (mixed series, gaps, orientations)."""


class ConfigError(RadLensError):
    """A configuration, model or index does not match what was asked for."""


class ManifestError(ConfigError, ValueError):
    """A data set's ``manifest.jsonl`` cannot be read (also a ValueError, as before)."""


class MissingDependencyError(RadLensError):
    """An optional package is needed for this feature."""

    def __init__(self, package: str, feature: str, extra: str | None = None) -> None:
        fix = f"pip install 'radlens[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the package '{package}': {fix}")


class Interrupted(RadLensError):
    """A long run was stopped by Ctrl-C or SIGTERM after saving its work; rerunning the same
    command continues it. ``exit_code`` is 128 + the signal (130 for Ctrl-C); ``report`` is the
    run's report (what was saved) where it has one."""

    def __init__(self, message: str, exit_code: int = 130, report: Any = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.report = report
