"""Text-search quality on an index of a PhantomCXR archive: precision@10 against the base rate.

Usage: ``python benchmarks/search_precision.py --index INDEX [--k 10]``

The index is one built by ``radlens index build`` over a PhantomCXR folder (the catalog keeps
each study's labels and per-finding side/severity from the data set's manifest, which is what
makes relevance checkable). Each query is searched with ``Engine.text_query_vector``, the vector
``radlens search --text`` uses, twice: contrasted with a normal study (the default of
``Engine.search_text``) and raw (plain cosine, ``radlens search --raw``). A hit is relevant when
its study has the query's finding on the query's side (a bilateral finding counts for either
side); severity is reported separately ("strict") because the side and presence of a finding,
not its exact grade, is what a search must get right first. Scored over all indexed images and
over the test split alone (images the model never trained on); the base rate is the fraction of
relevant images in the same pool, i.e. the expected precision of a random ranking, and
``p_vs_random`` the chance that a random ranking puts at least as many relevant images in its
top k (hypergeometric, one-sided): "above the base rate" by more than luck when it is small.

Prints one JSON object; writes ``benchmarks/out/search_precision.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "out"

#: query -> (finding, side or None, severity or None)
QUERIES: dict[str, tuple[str, str | None, str | None]] = {
    "large right pleural effusion": ("pleural_effusion", "right", "large"),
    "left pleural effusion": ("pleural_effusion", "left", None),
    "pleural effusion": ("pleural_effusion", None, None),
    "cardiomegaly": ("cardiomegaly", None, None),
    "the heart is enlarged": ("cardiomegaly", None, None),
    "pulmonary edema": ("pulmonary_edema", None, None),
    "airspace opacity": ("lung_opacity", None, None),
    "emphysema": ("emphysema", None, None),
    "calcified granuloma": ("calcified_granuloma", None, None),
    "pulmonary nodule": ("nodule", None, None),
}


def relevant(extra: dict[str, Any], finding: str, side: str | None, severity: str | None,
             strict: bool = False) -> bool:
    for f in extra.get("findings") or []:
        if f.get("finding") != finding:
            continue
        if side is not None and f.get("side") not in (side, "bilateral"):
            continue
        if strict and severity is not None and f.get("severity") != severity:
            continue
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--model", default=None, help="override the index's recorded model path")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from scipy.stats import hypergeom

    import vlm  # noqa: F401  (torchvision CPU shim)
    from index.engine import Engine

    engine = Engine.open(args.index, model=args.model)
    catalog = engine.index.catalog
    ids = catalog.filter_ids("image")
    items = {it.id: it for it in catalog.get_many(ids.tolist()) if it is not None}
    pools = {"all": np.asarray(sorted(items), np.int64),
             "test": np.asarray(sorted(i for i, it in items.items()
                                       if (it.extra or {}).get("split") == "test"), np.int64)}
    result: dict[str, Any] = {"benchmark": "search_precision", "index": str(args.index),
                              "model": engine.encoder.name, "k": args.k,
                              "images": {p: len(v) for p, v in pools.items()},
                              "queries": {}}
    from index.engine import NORMAL_REFERENCE

    result["contrast"] = NORMAL_REFERENCE
    for text, (finding, side, severity) in QUERIES.items():
        row: dict[str, Any] = {}
        for mode, pool, allowed in [(m, p, a) for m in ("contrasted", "raw")
                                    for p, a in pools.items()]:
            if not len(allowed):
                continue
            vector = engine.text_query_vector(text, NORMAL_REFERENCE if mode == "contrasted"
                                              else None)
            hits = engine.index.search("image", vector[None], k=args.k, allow=allowed)[0]
            rel = [relevant(h.item.extra or {}, finding, side, severity) for h in hits if h.item]
            strict = [relevant(h.item.extra or {}, finding, side, severity, strict=True)
                      for h in hits if h.item]
            n_rel = sum(relevant(items[i].extra or {}, finding, side, severity)
                        for i in allowed.tolist())
            base = n_rel / len(allowed)
            base_strict = np.mean([relevant(items[i].extra or {}, finding, side, severity, True)
                                   for i in allowed.tolist()])
            p = float(np.mean(rel)) if rel else 0.0
            key = pool if mode == "contrasted" else f"{pool}_raw"
            # exact one-sided test against a random ranking: k draws without replacement
            # from the pool's N images, R of them relevant; P(at least this many hits)
            p_random = (float(hypergeom.sf(sum(rel) - 1, len(allowed), n_rel, len(rel)))
                        if rel else 1.0)
            row[key] = {"precision": round(p, 3), "base_rate": round(float(base), 4),
                         "lift": round(p / base, 2) if base else None,
                         "p_vs_random": round(p_random, 4),
                         "precision_strict": round(float(np.mean(strict)) if strict else 0.0, 3),
                         "base_rate_strict": round(float(base_strict), 4)}
        result["queries"][text] = row
    for pool in [*pools, *(f"{p}_raw" for p in pools)]:
        ps = [q[pool]["precision"] for q in result["queries"].values() if pool in q]
        bs = [q[pool]["base_rate"] for q in result["queries"].values() if pool in q]
        if ps:
            result[f"mean_precision_{pool}"] = round(float(np.mean(ps)), 3)
            result[f"mean_base_rate_{pool}"] = round(float(np.mean(bs)), 4)
    write_result(args.out, "search_precision", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
