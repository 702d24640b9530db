"""Shared set-up of the headless-browser tests: Debian ``chromium`` driven by PyPI
``playwright`` (``playwright install`` is never used; CI installs both in ``.ci/run``).

``MARKS`` is the ``pytestmark`` of a browser test module: slow, browser, and a skip with the
reason when either piece is missing on this machine.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage"]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "test-artifacts"
#: Screenshots go to the test artifacts; RADLENS_UPDATE_SCREENSHOTS=1 refreshes the README's
#: committed ones instead (so an ordinary test run leaves the work tree as it found it).
SHOTS = (ROOT / "docs" / "img" if os.environ.get("RADLENS_UPDATE_SCREENSHOTS") == "1"
         else ARTIFACTS / "screenshots")
TIMEOUT = 30_000  # ms per wait

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

MARKS = [pytest.mark.slow, pytest.mark.browser]
if sync_playwright is None:
    MARKS.append(pytest.mark.skip(reason="PyPI playwright is not installed"))
elif not Path(CHROMIUM).is_file():
    MARKS.append(pytest.mark.skip(reason=f"{CHROMIUM} missing: apt-get install chromium"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium browser for the duration of the block."""
    assert sync_playwright is not None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str, height: int = 900) -> tuple[Any, Any]:
    """(context, page) of a fresh browser context showing the app at ``url``."""
    ctx = browser.new_context(viewport={"width": 1400, "height": height})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    page.wait_for_selector("#tabs")
    return ctx, page
