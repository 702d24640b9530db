"""RadLens vector index: faiss collections, the SQLite catalog and crash-safe index folders.

Modules: :mod:`index.folder` (``IndexFolder``, the entry point), :mod:`index.store`
(``VectorCollection``), :mod:`index.catalog` (``Catalog``, ``CatalogItem``),
:mod:`index.factory` (index choice), :mod:`index.persist` (generations, checksums),
:mod:`index.lock` (writer lock), :mod:`index.gpu` (faiss-gpu when available),
:mod:`index.search` (numpy helpers), :mod:`index.errors`, :mod:`index.ingest` (2-D images),
:mod:`index.volumes` (CT volumes), :mod:`index.volume_search`, :mod:`index.engine`.
"""
