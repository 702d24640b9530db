"""ui/gradio_fixes.py: an image Gradio already cached is not rewritten while it may be served
(a rewrite sent more bytes than the declared Content-Length and broke the picture)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ui import gradio_fixes


def test_a_cached_image_is_never_rewritten_and_a_new_one_lands_whole(tmp_path, monkeypatch
                                                                     ) -> None:
    from gradio import processing_utils as pu

    assert gradio_fixes.install() and gradio_fixes.install()  # idempotent
    assert pu.save_pil_to_cache is gradio_fixes.save_pil_to_cache
    img = Image.fromarray((np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    first = pu.save_img_array_to_cache(np.asarray(img), str(tmp_path))  # Gradio's own path
    whole = Path(first).read_bytes()
    before = os.stat(first)
    written: list[str] = []
    write_bytes = Path.write_bytes

    def spy(self: Path, data: bytes) -> int:
        written.append(self.name)
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", spy)
    with open(first, "rb") as served:  # a download in progress
        head = served.read(10)
        again = pu.save_pil_to_cache(img, str(tmp_path))
        assert written == []  # Gradio's own function truncated and rewrote it here
        after = os.stat(first)
        assert again == first and after.st_ino == before.st_ino
        assert after.st_size == before.st_size and head + served.read() == whole
    other = pu.save_pil_to_cache(img.rotate(90), str(tmp_path))
    assert other != first and Image.open(other).size == (64, 64)
    assert len(written) == 1 and written[0].endswith(".tmp")  # then renamed into place
    assert not list(tmp_path.rglob("*.tmp"))
