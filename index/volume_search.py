"""Volume-to-volume similar-case search over the index's ``volume`` collection.

    vs = VolumeSearch.open("idx")                      # the volume model recorded in the index
    query = vs.query_path("new_ct.nii.gz")             # or a DICOM series folder
    hits = vs.search(query, k=10)                      # the query's own row is left out

An indexed volume is queried by its stored vector (:meth:`VolumeSearch.query_item`), so neither
the model nor the original file is needed; a new volume is read and encoded with the model that
filled the collection (another model is refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.catalog import CatalogItem
from index.folder import CollectionModel, Hit, IndexFolder
from index.volumes import (
    VOLUME,
    VolumeSource,
    content_hash,
    find_volumes,
    read_source,
    voxel_hash,
)
from vlm.errors import ConfigError, RadLensError
from vlm.io import Volume, is_nifti, readable
from vlm.volume_encoder import VolumeEncoder, VolumeEncoding

#: extra results asked for, so that rows with the query's voxels can be left out (ingest keeps
#: one row per voxel hash; more come only from indexes built before it recorded them)
TWIN_ROWS = 4


@dataclass
class VolumeQuery:
    """A query volume: its vector and, when it was encoded here, the volume and its scores."""

    vector: np.ndarray  # (D,) unit
    item: CatalogItem | None = None  # the indexed row it came from
    volume: Volume | None = None
    encoding: VolumeEncoding | None = None
    content_hash: str | None = None
    #: :func:`index.volumes.voxel_hash`: rows with the same voxels (its copy in another
    #: format) are left out of the results like its own row
    voxel_hash: str | None = None


def query_source(path: str | os.PathLike[str]) -> VolumeSource:
    """The one volume at ``path``: a NIfTI file or a folder holding exactly one DICOM series."""
    p = Path(path)
    if p.is_file() and is_nifti(p):
        return VolumeSource("nifti", p, [p])
    if not p.exists():
        raise RadLensError(f"{p}: no such file or folder")
    found = find_volumes(p) if p.is_dir() else []
    if len(found) != 1:
        raise RadLensError(f"{p} holds {len(found)} volumes: pass one NIfTI file (.nii, .nii.gz) "
                           "or a folder with one DICOM series")
    return found[0]


class VolumeSearch:
    """Search one index's ``volume`` collection.

    Args:
        index: the opened index (must have a ``volume`` collection).
        encoder: the volume model (default: loaded on first use from ``model`` or the source
            the collection recorded).
        model: checkpoint folder or ``random:`` name overriding the recorded source.
    """

    def __init__(self, index: IndexFolder, encoder: VolumeEncoder | None = None,
                 model: str | None = None) -> None:
        self.index = index
        self.model: CollectionModel = index.collection_model(VOLUME)
        self._source = model or self.model.source
        self._encoder: VolumeEncoder | None = None
        if encoder is not None:
            self._check(encoder)
            self._encoder = encoder

    @classmethod
    def open(cls, index_path: str | os.PathLike[str], model: str | None = None
             ) -> VolumeSearch:
        """Open an index read-only for volume search."""
        return cls(IndexFolder.open(index_path), model=model)

    def _check(self, encoder: VolumeEncoder) -> None:
        self.index.check_model(VOLUME, encoder.name, encoder.config_hash, encoder.dim)

    @property
    def encoder(self) -> VolumeEncoder:
        """The model of the collection (loaded once; another model is refused)."""
        if self._encoder is None:
            if not self._source:
                raise ConfigError(f"index {self.index.path} records no volume model: pass "
                                  "--volume-model")
            encoder = VolumeEncoder.load(self._source)
            self._check(encoder)
            self._encoder = encoder
        return self._encoder

    # ------------------------------------------------------------------ queries
    def query_item(self, item_id: int) -> VolumeQuery:
        """An indexed volume, by its stored vector."""
        coll = self.index.collection(VOLUME, create=False)
        if not coll.contains(int(item_id)):
            raise RadLensError(f"volume #{item_id} is not in the index")
        item = self.index.catalog.get(int(item_id))
        voxels = (item.extra or {}).get("voxel_hash") if item else None
        return VolumeQuery(coll.vectors([int(item_id)])[0], item=item,
                           content_hash=item.content_hash if item else None,
                           voxel_hash=voxels if isinstance(voxels, str) else None)

    def query_volume(self, volume: Volume, digest: str | None = None, name: str = "volume"
                     ) -> VolumeQuery:
        """A volume read elsewhere (e.g. an upload), encoded with the collection's model.

        Raises:
            ImageReadError: it is blank or too small to read (named ``name``).
        """
        readable(volume, name)
        enc = self.encoder.encode(volume)
        return VolumeQuery(enc.vector, volume=volume, encoding=enc, content_hash=digest,
                           voxel_hash=voxel_hash(volume))

    def query_path(self, path: str | os.PathLike[str]) -> VolumeQuery:
        """A NIfTI file or DICOM series folder, read and encoded."""
        src = query_source(path)
        return self.query_volume(read_source(src), content_hash(src), str(path))

    # ------------------------------------------------------------------ search
    def search(self, query: VolumeQuery, k: int = 10, **filters: Any) -> list[Hit]:
        """Top-``k`` similar volumes, best first, without the query's own row(s): the rows of
        its file content and those of its voxels (the same volume indexed from another format,
        which would otherwise be the top hit at a score of about 1)."""
        own = {query.item.id} if query.item is not None else set()
        if query.content_hash:
            own |= {it.id for it in self.index.catalog.find_by_hash(query.content_hash,
                                                                    collection=VOLUME)}
        encoded = query.item is None  # a stored vector needs no model check
        hits = self.index.search(
            VOLUME, query.vector[None], k=int(k) + len(own) + (TWIN_ROWS if query.voxel_hash
                                                                else 0),
            expect_model=self.model.model_name if encoded else None,
            expect_config_hash=self.model.config_hash if encoded else None, **filters)[0]
        return [h for h in hits if h.id not in own and not self._twin(h, query)][: int(k)]

    @staticmethod
    def _twin(hit: Hit, query: VolumeQuery) -> bool:
        return bool(query.voxel_hash and hit.item is not None
                    and (hit.item.extra or {}).get("voxel_hash") == query.voxel_hash)

    def close(self) -> None:
        self.index.close()
