"""Two workarounds for Gradio 6.31: a race in its image cache, and tracebacks for refused values.

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
name and renamed into place.

It also makes a client value that a component refuses (a slider beyond its range, a dropdown
value outside its choices: Gradio's own checks, before any RadLens handler runs) one warning
line in the server log instead of Gradio's full traceback; the client gets Gradio's message
as before. Both are idempotent and do nothing where Gradio's function is not there.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any

_INSTALLED = "_radlens_atomic"
_QUIET = "_radlens_quiet"
#: longest refusal message logged (a dropdown's lists every choice)
MESSAGE_CHARS = 200

logger = logging.getLogger(__name__)


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


def _one_line(text: object) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


def quiet_refusals(preprocess_data: Any) -> Any:
    """Wrap ``Blocks.preprocess_data`` so that a ``gradio.Error`` raised there (a component's
    check of the client's value) is logged as one line and not printed with its traceback."""
    from gradio.exceptions import Error

    @functools.wraps(preprocess_data)
    async def wrapped(self: Any, block_fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await preprocess_data(self, block_fn, *args, **kwargs)
        except Error as exc:
            if exc.print_exception:
                exc.print_exception = False
                logger.warning("app: refused a client value for %s: %s",
                               getattr(block_fn, "name", "an event"), _one_line(exc.message))
            raise

    setattr(wrapped, _QUIET, True)
    return wrapped


def install() -> bool:
    """Put :func:`save_pil_to_cache` in place of Gradio's and wrap ``preprocess_data`` with
    :func:`quiet_refusals`; returns whether both are in place."""
    from gradio import processing_utils as pu
    from gradio.blocks import Blocks

    current = getattr(pu, "save_pil_to_cache", None)
    if current is not None and not getattr(current, _INSTALLED, False):
        setattr(save_pil_to_cache, _INSTALLED, True)
        pu.save_pil_to_cache = save_pil_to_cache
    pre = getattr(Blocks, "preprocess_data", None)
    if pre is not None and not getattr(pre, _QUIET, False):
        Blocks.preprocess_data = quiet_refusals(pre)  # type: ignore[method-assign]
    return current is not None and pre is not None
