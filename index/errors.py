"""Index-specific errors. All are :class:`vlm.errors.RadLensError`: one line, naming the fix."""

from __future__ import annotations

from vlm.errors import RadLensError


class IndexBusyError(RadLensError):
    """Another process holds the index folder's writer lock."""


class IndexCorruptError(RadLensError):
    """A file of an index generation is missing, truncated or fails its checksum."""


class IndexFormatError(RadLensError):
    """A folder is not an index, or was written by an incompatible version."""


class DimensionError(RadLensError):
    """Vectors of the wrong shape or dimension were given to a collection."""
