"""A workaround for a race in Gradio's image cache (gradio 6.31).

Gradio writes every image a handler returns as an array or PIL image to
``<cache>/<hash of its bytes>/image.webp`` with ``Path.write_bytes``, also when that file is
already there: the same picture returned twice (the volume viewer's slice strip re-rendered,
a slider moved back) truncates and rewrites a file the browser may be downloading at that
moment. The server then sends more or fewer bytes than the ``Content-Length`` it declared
(``h11 LocalProtocolError: Too much data for declared Content-Length``) and the image breaks;
the headless-browser test of the Volumes tab hit it once in CI. Files handed over by path do
not have the problem: Gradio copies those under a temporary name and never rewrites them.

:func:`install` replaces ``gradio.processing_utils.save_pil_to_cache`` with the same
function written the way Gradio writes files: a file already in the cache has those exact
bytes (its folder is their hash), so it is left alone; a new one is written under a temporary
name and renamed into place. Idempotent; does nothing if Gradio's function is not there.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

_INSTALLED = "_radlens_atomic"


def save_pil_to_cache(img: Any, cache_dir: str, name: str = "image", format: str = "webp"
                      ) -> str:
    """Gradio's ``save_pil_to_cache``, without rewriting a cached file."""
    from gradio import processing_utils as pu

    data = pu.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / pu.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    if path.is_file() and path.stat().st_size == len(data):
        with contextlib.suppress(OSError):
            os.utime(path)  # Gradio's cache cleaner ages files by their time
        return str(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data):x}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return str(path)


def install() -> bool:
    """Put :func:`save_pil_to_cache` in place of Gradio's; returns whether it is in place."""
    from gradio import processing_utils as pu

    current = getattr(pu, "save_pil_to_cache", None)
    if current is None:
        return False
    if not getattr(current, _INSTALLED, False):
        setattr(save_pil_to_cache, _INSTALLED, True)
        pu.save_pil_to_cache = save_pil_to_cache
    return True
