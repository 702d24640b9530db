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


def test_a_refused_client_value_is_one_log_line_not_a_traceback(tiny_engine, capfd, caplog
                                                               ) -> None:
    """A slider value beyond its range is refused by Gradio's own check before the handler
    runs: the client gets Gradio's message, the server log one line and no traceback."""
    import logging

    import pytest
    from gradio_client import Client

    from tests.ui.chromium import free_port
    from ui.app import build_app
    from ui.serve import launch

    port = free_port()
    app = build_app(tiny_engine)
    launch(app, tiny_engine, port=port, prevent_thread_lock=True)
    assert tiny_engine.index._watcher is not None  # the app follows other writers
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        capfd.readouterr()
        with caplog.at_level(logging.WARNING, logger="ui.gradio_fixes"), \
                pytest.raises(Exception, match="greater than maximum value 48"):
            client.predict("cardiomegaly", 999, "any", "any", "any", "any", True,
                           api_name="/on_search")
        ok = client.predict("cardiomegaly", 3, "any", "any", "any", "any", True,
                            api_name="/on_search")  # the app goes on
        assert "3 studies" in str(ok)
    finally:
        app.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "raise_if_out_of_bounds" not in err
    lines = [r.getMessage() for r in caplog.records if r.name == "ui.gradio_fixes"]
    assert lines == ["app: refused a client value for on_search: Value 999 is greater than "
                     "maximum value 48."]
