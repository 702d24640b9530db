"""Read radiology files into physical units with de-identified metadata.

One API for every format a user owns::

    from vlm.io import read, read_image, read_volume, render

    image = read_image("chest.dcm")         # ImageData: float32 pixels + ImageMeta
    png = render(image)                     # uint8, file's VOI, MONOCHROME1 inverted
    ct = read_volume("series_folder/")      # Volume: (Z, Y, X) HU on the canonical LPS grid
    lung = render(ct.slice_image(40), window="lung")
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from vlm.errors import ImageReadError
from vlm.io.deid import Pseudonymizer, default_pseudonymizer
from vlm.io.dicom import read_dicom
from vlm.io.raster import RASTER_SUFFIXES, read_raster
from vlm.io.types import ImageData, ImageMeta, VOILut, VOIWindow, Volume
from vlm.io.volume import read_nifti, read_series
from vlm.io.windows import WINDOW_PRESETS, apply_voi, apply_window, parse_window, render

__all__ = [
    "WINDOW_PRESETS", "ImageData", "ImageMeta", "Pseudonymizer", "VOILut", "VOIWindow",
    "Volume", "apply_voi", "apply_window", "default_pseudonymizer", "is_nifti", "parse_window",
    "read", "read_dicom", "read_image", "read_nifti", "read_raster", "read_series",
    "read_volume", "readable", "render",
]

PathLike = str | os.PathLike[str]


def is_nifti(path: PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_image(path: PathLike, *, pseudonymizer: Pseudonymizer | None = None,
               keep_identifiers: bool = False, data: bytes | None = None) -> ImageData:
    """Read a 2-D image: DICOM (any suffix or none), PNG, JPEG, TIFF. ``data``: the file's
    bytes when the caller has already read them (a DICOM file is then not read again).

    Raises:
        ImageReadError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix.lower() in RASTER_SUFFIXES:
            return read_raster(path)
        if is_nifti(path):
            raise ImageReadError(path, "is a NIfTI volume: read it with read_volume")
        return read_dicom(path, pseudonymizer=pseudonymizer, keep_identifiers=keep_identifiers,
                          data=data)


def read_volume(source: PathLike | Iterable[PathLike], *,
                pseudonymizer: Pseudonymizer | None = None,
                keep_identifiers: bool = False) -> Volume:
    """Read a volume: a NIfTI file, a DICOM series folder, or a list of slice files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, str | os.PathLike) and is_nifti(source):
            return read_nifti(source)
        return read_series(source, pseudonymizer=pseudonymizer,
                           keep_identifiers=keep_identifiers)


def read(source: PathLike, **kwargs: object) -> ImageData | Volume:
    """Read whatever ``source`` is: a folder or NIfTI file -> Volume, a file -> ImageData."""
    if Path(source).is_dir() or is_nifti(source):
        return read_volume(source, **kwargs)  # type: ignore[arg-type]
    return read_image(source, **kwargs)  # type: ignore[arg-type]


_Readable = TypeVar("_Readable", ImageData, Volume)


def readable(data: _Readable, name: str = "image") -> _Readable:
    """``data``, if a model can read it (see :meth:`ImageData.content_problem` and
    :meth:`Volume.content_problem`).

    Raises:
        ImageReadError: it is blank or too small, named ``name`` (a path, where there is one).
    """
    problem = data.content_problem()
    if problem:
        raise ImageReadError(name, problem)
    return data
