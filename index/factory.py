"""Which faiss index a collection uses, how it is built and how it is searched.

Collections add vectors in order, so faiss' own sequential ids are *slots* (row numbers of the
collection); :mod:`index.store` maps slots to the caller's stable 64-bit ids. That is why the
factory strings below need no ``IDMap2`` prefix.

* ``n < SMALL_MAX`` (50k): ``Flat`` - exact inner product.
* larger: ``IVF{nlist}_HNSW32,PQ{d/4}x4fsr`` - an inverted file (``nlist`` ~ 2 sqrt(n)) with
  an HNSW coarse quantiser and 4-bit fast-scan PQ codes (one bit a dimension: ``d/8`` bytes a
  vector), the best 10 x k candidates re-ranked exactly with the collection's float16 vectors
  (memory-mapped from disk after loading). ``PQ{d/8}x4fsr`` halves the codes (<= 64 bytes a
  vector with ids) and needs 30 x k candidates for the same recall; see
  ``benchmarks/index_search.py`` for the measurements behind these choices.

Public API: :func:`choose_factory`, :func:`default_rerank`, :func:`describe`, :func:`build_index`,
:func:`search_parameters`, :func:`train_sample_size`, :data:`SMALL_MAX`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import faiss

logger = logging.getLogger(__name__)

#: Collections below this many vectors use exact search.
SMALL_MAX = 50_000
#: Default search knobs for approximate indexes (measured by ``benchmarks/index_search.py``).
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 128
#: Candidates fetched per wanted result, for re-ranking, by code precision (see default_rerank).
RERANK_FINE, RERANK_COARSE, RERANK_SQ = 10, 30, 2


@dataclass(frozen=True)
class IndexInfo:
    """What a factory string means for the store.

    Attributes:
        kind: ``"flat"``, ``"hnsw"``, ``"ivf"`` or ``"other"``.
        trained: Whether the index must be trained before adding.
        lossy: Whether stored codes are compressed (results are re-ranked exactly).
        nlist: Number of inverted lists (IVF only).
    """

    kind: str
    trained: bool
    lossy: bool
    nlist: int = 0


def nlist_for(n: int) -> int:
    """Inverted lists for ``n`` vectors: a power of two near ``2*sqrt(n)``, in [256, 65536]."""
    target = 2.0 * math.sqrt(max(n, 1))
    return int(min(65536, max(256, 2 ** round(math.log2(target)))))


def choose_factory(n: int, dim: int) -> str:
    """The automatic factory string for a collection of ``n`` vectors of ``dim`` dimensions."""
    if n < SMALL_MAX:
        return "Flat"
    nlist = nlist_for(n)
    if dim % 4 == 0:
        return f"IVF{nlist}_HNSW32,PQ{dim // 4}x4fsr"
    return f"IVF{nlist}_HNSW32,SQ8"


def default_rerank(factory: str, dim: int) -> int:
    """Candidates per wanted result to re-rank exactly: more for coarser codes."""
    codes = _strip(factory).split(",")[-1]
    m = re.match(r"PQ(\d+)(x(\d+))?", codes)
    if m:
        bits = int(m.group(1)) * int(m.group(3) or 8)
        return RERANK_FINE if bits >= dim else RERANK_COARSE
    return RERANK_SQ if codes.startswith("SQ") else 1


def _strip(factory: str) -> str:
    body = factory.replace("IDMap2,", "").replace("IDMap,", "")
    return re.sub(r",?(RFlat|Refine\([^)]*\))$", "", body)


def describe(factory: str) -> IndexInfo:
    """Classify a factory string (see :class:`IndexInfo`)."""
    parts = _strip(factory).split(",")
    first = parts[0]
    codes = parts[1] if len(parts) > 1 else "Flat"
    if first.startswith("IVF"):
        m = re.match(r"IVF(\d+)", first)
        return IndexInfo("ivf", True, codes != "Flat", int(m.group(1)) if m else 0)
    if first.startswith("HNSW"):
        return IndexInfo("hnsw", codes != "Flat", codes != "Flat")
    if first == "Flat" and len(parts) == 1:
        return IndexInfo("flat", False, False)
    return IndexInfo("other", True, True)


def build_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product faiss index for ``factory`` (refine suffixes are handled by us)."""
    index = faiss.index_factory(dim, _strip(factory), faiss.METRIC_INNER_PRODUCT)
    info = describe(factory)
    if info.kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = DEFAULT_NPROBE
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(64, 2 * DEFAULT_NPROBE)
            quantizer.hnsw.efConstruction = 64
    elif info.kind == "hnsw":
        hnsw: Any = faiss.downcast_index(index)
        hnsw.hnsw.efConstruction = 64
        hnsw.hnsw.efSearch = DEFAULT_EF_SEARCH
    return index


def faiss_reason(exc: BaseException) -> str:
    """The part of a faiss error a person needs: ``could not parse index string X`` or
    ``Number of training points (50) should be ...``, without the C++ signature and file."""
    text = " ".join(str(exc).split())
    m = re.search(r" at \S+:\d+: (?:Error: '.*?' failed: )?(.*)$", text)
    return m.group(1) if m else text


def train_sample_size(factory: str, n: int) -> int:
    """How many vectors to train ``factory`` on (all of them for small collections)."""
    info = describe(factory)
    if info.kind == "ivf":
        return min(n, max(info.nlist * 40, 20_000))
    return min(n, 100_000)


def search_parameters(index: Any, sel: Any = None, nprobe: int | None = None,
                      ef_search: int | None = None) -> Any:
    """``SearchParameters`` for ``index`` with an optional ``IDSelector`` and knobs."""
    params: Any
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe or index.nprobe
        quantizer = faiss.downcast_index(index.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            qp: Any = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            qp.efSearch = max(quantizer.hnsw.efSearch, 2 * params.nprobe)
            params.quantizer_params = qp
            params._keep_qp = qp  # keep the Python object alive with params
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = ef_search or index.hnsw.efSearch
    else:
        params = faiss.SearchParameters()
    if sel is not None:
        params.sel = sel
        params._keep_sel = sel
    return params
