"""What every benchmark script shares: the data check and where its JSON goes.

Scripts run as ``python benchmarks/<name>.py``, so this module is importable as ``_common``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def have_phantom_cxr(data: Path) -> bool:
    """Whether ``data`` holds a PhantomCXR folder; says how to make one when it does not."""
    if (data / "manifest.jsonl").is_file():
        return True
    print(f"{data}: no PhantomCXR here; run `radlens data phantom-cxr --out {data}` first",
          file=sys.stderr)
    return False


def plain_folder(data: Path, limit: int, folder: Path) -> list[Path]:
    """The first ``limit`` image files of the PhantomCXR folder ``data``, hard-linked into the
    new ``folder`` as ``000000.dcm``, ... (no manifest: a plain archive, as a PACS export is);
    returns the original files, in order."""
    from vlm.data.manifest import read_jsonl

    rows = [r for r in read_jsonl(data / "manifest.jsonl") if isinstance(r.get("file"), str)]
    files = [data / r["file"] for r in rows[:limit]]
    folder.mkdir(parents=True)
    for i, f in enumerate(files):
        os.link(f, folder / f"{i:06d}.dcm")
    return files


#: dimension of the synthetic rows below (a ViT-B-class embedding)
SYNTHETIC_DIM = 512


def synthetic_rows(start: int, n: int) -> list[dict[str, Any]]:
    """Catalog rows ``start .. start+n`` shaped like an image's (three images per study)."""
    return [{"source_uri": f"src-{i:020x}", "content_hash": f"{i:064x}",
             "study": f"st-{i // 3:020x}", "series": f"se-{i:020x}",
             "instance": f"im-{i:020x}", "modality": "CR", "body_part": "CHEST",
             "view": "PA", "year": 2000 + i % 20, "rows": 2048, "cols": 2048,
             "extra": {"labels": ["nodule"] if i % 7 == 0 else []}}
            for i in range(start, start + n)]


def synthetic_vectors(n: int, seed: int, dim: int = SYNTHETIC_DIM) -> Any:
    """``n`` random unit vectors (float32, seeded)."""
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_index(folder: Path, start: int, n: int, seed: int, chunk: int = 8192) -> float:
    """An index at ``folder`` holding :func:`synthetic_rows` ``start .. start+n`` with
    :func:`synthetic_vectors`; returns the seconds it took."""
    import time

    from index.folder import IndexFolder

    t = time.perf_counter()
    ix = IndexFolder.create(folder, model_name="synthetic", config_hash="0" * 16,
                            dim=SYNTHETIC_DIM)
    try:
        ix.bind_pseudonym_key("key-synthetic000000")
        x = synthetic_vectors(n, seed)
        for at in range(0, n, chunk):
            m = min(chunk, n - at)
            ix.add("image", x[at:at + m], synthetic_rows(start + at, m))
        ix.save()
    finally:
        ix.close()
    return time.perf_counter() - t


def write_result(out: Path, name: str, result: dict[str, Any]) -> None:
    """``out/<name>.json`` (indented) and the same object as one line on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result) + "\n")


def device_suffix(device: str) -> str:
    """File-name suffix that keeps a GPU run's results beside the CPU ones: '' or '_cuda0'."""
    return "" if device == "cpu" else "_" + device.replace(":", "")


def plot_medians(result: dict[str, Any], settings: tuple[str, ...], labels: list[str],
                 title: str, path: Path, keys: dict[str, str] | None = None) -> None:
    """One bar panel per measured quantity: ``result["median"][setting][key]`` for each of
    ``settings`` (named ``labels``; the first is the reference). ``keys`` maps the quantities
    to their panel titles (default: every key of the first setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or {k: k.replace("_", " ") for k in result["median"][settings[0]]}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 2.7), squeeze=False)
    for ax, (key, name) in zip(axes[0], keys.items(), strict=True):
        ax.bar(labels, [result["median"][s][key] for s in settings],
               color=["#888"] + ["#2a7"] * (len(settings) - 1))
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
