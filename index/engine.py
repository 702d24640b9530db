"""``Engine``: the one object the CLI and the app talk to: model + vector store + catalog.

    engine = Engine.open("data/index")            # the model recorded in the index
    hits = engine.search_text("large right pleural effusion", k=10, view="PA")
    probs = engine.classify(read_image("study.dcm"))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.catalog import CatalogItem
from index.folder import IndexFolder
from index.ingest import IMAGE, REGION
from index.volume_search import VolumeSearch
from index.volumes import VOLUME
from vlm.errors import RadLensError
from vlm.grounding import Grounding
from vlm.inference import Encoder
from vlm.io import ImageData, read_image, readable
from vlm.zeroshot import PromptSet

FILTER_KEYS = ("modality", "body_part", "view", "year_min", "year_max")


def parse_filters(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``radlens search --filter``) -> search filters, checked before any
    model is loaded. ``year=2010`` and ``year=2005-2010`` stand for ``year_min``/``year_max``;
    ``view=PA,AP`` matches either value, and so does ``view=PA`` given with ``view=AP``.

    Raises:
        RadLensError: not KEY=VALUE, an unknown key, an empty value list, a year that is not a
            whole number from 1 to 9999, a year bound given twice, or a range that ends before
            it starts.
    """
    def year(key: str, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = 0
        if not 1 <= value <= 9999:  # sqlite's integers end at 2**63 (OverflowError past it)
            raise RadLensError(f"--filter {key} needs a year such as 2010, got '{text.strip()}'")
        return value

    out: dict[str, Any] = {}

    def set_year(key: str, option: str, value: int) -> None:
        if key in out and out[key] != value:
            raise RadLensError(f"--filter {option}: {key} is already {out[key]}; give each "
                               "year bound once")
        out[key] = value

    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise RadLensError(f"--filter needs KEY=VALUE, got '{item}'")
        if key == "year":
            lo, dash, hi = value.partition("-")
            set_year("year_min", key, year(key, lo))
            set_year("year_max", key, year(key, hi if dash else lo))
        elif key in ("year_min", "year_max"):
            set_year(key, key, year(key, value))
        elif key in FILTER_KEYS:
            values = [v.strip() for v in value.split(",") if v.strip()]
            if not values:  # "view=," used to drop the filter and search everything
                raise RadLensError(f"--filter {key} needs at least one value, got '{value}'")
            had = out.get(key, [])
            merged = list(dict.fromkeys([*([had] if isinstance(had, str) else had), *values]))
            out[key] = merged[0] if len(merged) == 1 else merged
        else:
            raise RadLensError(f"unknown filter '{key}': use {', '.join(FILTER_KEYS)} or year")
    if out.get("year_min", 0) > out.get("year_max", 9999):
        raise RadLensError(f"--filter year range {out['year_min']}-{out['year_max']} ends "
                           "before it starts")
    return out

#: What a text query is contrasted with by default: a normal study. Ranking by
#: ``cos(image, query) - cos(image, reference)`` asks for images more like the query than like a
#: normal radiograph (the search analogue of CheXzero's positive/negative prompt pairs). Raw
#: cosine ranks images by overall resemblance to the query text, which for a finding phrase is
#: dominated by whatever the model finds most "abnormal" (on PhantomCXR with lrclr-r18,
#: "pleural effusion" returned 0 effusions in the top 10 raw and 2 contrasted; see README).
#: It is the ``normal`` text of the packaged prompt file (``vlm/prompts/cxr_findings.json``), so
#: zero-shot negatives and search contrast stay one sentence.
NORMAL_REFERENCE: str = PromptSet.load().normal or ""


@dataclass
class Result:
    """One search hit: catalog row, score, and (image queries) the regions that matched."""

    id: int
    score: float
    item: CatalogItem | None
    regions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "score": round(self.score, 6),
                "item": self.item.to_dict() if self.item else None, "regions": self.regions}


class Engine:
    """Image model + index; ``volumes`` searches the index's volume collection when it has one
    (its model is loaded only when a new volume must be encoded)."""

    def __init__(self, encoder: Encoder, index: IndexFolder,
                 volume_model: str | None = None) -> None:
        if index.manifest["config_hash"] != encoder.config_hash:
            raise RadLensError(
                f"index {index.path} was built with model {index.manifest['model_name']} "
                f"(fingerprint {index.manifest['config_hash']}); the loaded model is "
                f"{encoder.name} ({encoder.config_hash}): rebuild the index or load its model")
        self.encoder, self.index = encoder, index
        self._contrast_vectors: dict[str, np.ndarray] = {}
        self.volumes: VolumeSearch | None = (VolumeSearch(index, model=volume_model)
                                             if VOLUME in index.collections() else None)

    @classmethod
    def open(cls, index_path: str | os.PathLike[str], model: str | None = None,
             device: str = "cpu", volume_model: str | None = None) -> Engine:
        """Open an index read-only with its model (``model`` overrides the recorded path;
        ``volume_model`` the recorded volume model)."""
        ix = IndexFolder.open(index_path)
        path = model or ix.manifest.get("preprocessing", {}).get("model_path")
        if not path:
            raise RadLensError(f"index {index_path} records no model path: pass --model")
        return cls(Encoder(path, device=device), ix, volume_model=volume_model)

    def info(self) -> dict[str, Any]:
        return {**self.index.info(), "model_loaded": self.encoder.name}

    def _filters(self, filters: dict[str, Any]) -> dict[str, Any]:
        unknown = set(filters) - set(FILTER_KEYS)
        if unknown:
            raise RadLensError(f"unknown filter(s) {sorted(unknown)}: use {', '.join(FILTER_KEYS)}")
        return {k: v for k, v in filters.items() if v not in (None, "", [])}

    def _search(self, vector: np.ndarray, k: int, filters: dict[str, Any]) -> list[Result]:
        hits = self.index.search(IMAGE, vector[None], k=k, **self._filters(filters))[0]
        return [Result(h.id, h.score, h.item) for h in hits]

    def search_text(self, text: str, k: int = 10, contrast: str | None = NORMAL_REFERENCE,
                    **filters: Any) -> list[Result]:
        """Report or phrase -> top-k studies.

        With ``contrast`` (default: :data:`NORMAL_REFERENCE`) images are ranked by their
        similarity to the query minus their similarity to the contrast text, searched as one
        inner product with the normalised difference of the two text vectors; the score is
        that difference divided by its norm. ``contrast=None`` ranks by plain cosine.
        """
        return self._search(self.text_query_vector(text, contrast), k, filters)

    def text_query_vector(self, text: str, contrast: str | None = NORMAL_REFERENCE
                          ) -> np.ndarray:
        """The unit vector :meth:`search_text` searches with (see there)."""
        if not text.strip():
            raise RadLensError("empty query: type a finding or a report sentence")
        query = self.encoder.encode_text([text])[0]
        if not contrast or not contrast.strip() or contrast.strip() == text.strip():
            return query
        if contrast not in self._contrast_vectors:
            self._contrast_vectors[contrast] = self.encoder.encode_text([contrast])[0]
        direction = query - self._contrast_vectors[contrast]
        norm = float(np.linalg.norm(direction))
        if norm < 1e-6:  # the two texts embed alike: nothing to contrast
            return query
        return (direction / norm).astype(np.float32)

    def search_image(self, image: ImageData | str | os.PathLike[str], k: int = 10,
                     regions: bool = True, **filters: Any) -> list[Result]:
        """Image -> top-k similar studies, with the indexed regions that matched best."""
        img = image if isinstance(image, ImageData) else readable(read_image(image), str(image))
        (enc,) = self.encoder.encode_images([img])
        results = self._search(enc.vector, k, filters)
        if regions and len(enc.region_vectors) and REGION in self.index.collections():
            self._attach_regions(results, enc.region_vectors, enc.region_boxes)
        return results

    def _attach_regions(self, results: list[Result], query_regions: np.ndarray,
                        query_boxes: np.ndarray, per_result: int = 3) -> None:
        wanted = {r.id for r in results}
        hits = self.index.search(REGION, query_regions, k=50)
        best: dict[int, list[dict[str, Any]]] = {}
        for q, row in enumerate(hits):
            for h in row:
                parent = (h.item.extra or {}).get("parent") if h.item else None
                if parent in wanted and h.item is not None and h.item.box is not None:
                    best.setdefault(int(parent), []).append({
                        "score": round(h.score, 6), "box": list(h.item.box),
                        "query_box": [float(v) for v in query_boxes[q]]})
        for r in results:
            r.regions = sorted(best.get(r.id, []), key=lambda d: -d["score"])[:per_result]

    def classify(self, image: ImageData, prompts: PromptSet | None = None) -> dict[str, float]:
        return self.encoder.classify(image, prompts)

    def ground(self, image: ImageData, phrases: Sequence[str], method: str = "gradient"
               ) -> list[Grounding]:
        """Heatmap and box per phrase (``method``: see :meth:`vlm.inference.Encoder.ground`)."""
        return self.encoder.ground(image, phrases, method)

    def item_path(self, item: CatalogItem) -> Path | None:
        """The thumbnail file of an item, only if it lies inside the index folder."""
        if not item.thumbnail:
            return None
        path = (self.index.path / item.thumbnail).resolve()
        root = self.index.path.resolve()
        return path if root in path.parents and path.is_file() else None
