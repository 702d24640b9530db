"""The real app in headless Chromium: search, zero-shot, grounding, similar cases, bad uploads,
two isolated sessions, and screenshots of every tab (``docs/img/app_<tab>.png``).

Needs Debian ``chromium`` and PyPI ``playwright`` (``playwright install`` is not used). The
app runs the shipped checkpoint ``checkpoints/lrclr-r18`` (or ``RADLENS_APP_MODEL``), and the
test checks that an effusion study scores a higher effusion probability than a normal one;
only without any trained checkpoint does it fall back to the tiny random model and check
rendering alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.ui.chromium import MARKS, ROOT, SHOTS, free_port, open_page
from tests.ui.conftest import build_index

SHIPPED = ROOT / "checkpoints" / "lrclr-r18"

pytestmark = MARKS

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # pragma: no cover - depends on the machine; MARKS skips the module
    PlaywrightTimeout = TimeoutError


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """PhantomCXR sample -> index -> app on 127.0.0.1:<free port> in a thread."""
    from index.engine import Engine
    from tests.tiny_cxr import make_tiny_cxr
    from ui.app import build_app
    from ui.serve import launch
    from vlm.data.phantom_cxr import generate_phantom_cxr

    trained = os.environ.get("RADLENS_APP_MODEL") or (
        str(SHIPPED) if (SHIPPED / "model.safetensors").is_file() else None)
    model = Path(trained) if trained else request.getfixturevalue("tiny_model")
    root = tmp_path_factory.mktemp("browser")
    data = root / "pcxr"
    generate_phantom_cxr(data, n=60, size=256 if trained else 128, workers=1)
    engine = Engine.open(build_index(model, data, root / "idx"))
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    effusion = [r for r in rows if "pleural_effusion" in r["labels"]]
    effusion.sort(key=lambda r: any(f.get("severity") == "borderline" for f in r["findings"]))
    normal = next(r for r in rows if r.get("mesh_major") == ["normal"])
    files = {"effusion": data / effusion[0]["file"], "normal": data / normal["file"]}
    bad = root / "bad"
    bad.mkdir()
    files["truncated"] = bad / "truncated.dcm"
    files["truncated"].write_bytes(files["normal"].read_bytes()[:600])
    files["text"] = bad / "notes.txt"
    files["text"].write_text("this is not an image\n" * 20)
    more = make_tiny_cxr(root / "more", n=4, size=64, seed=3)
    (more / "manifest.jsonl").unlink()  # a plain folder, with one broken file
    (more / "dicom" / "broken.dcm").write_bytes(b"not a dicom file" * 10)
    files["more"] = more

    app = build_app(engine, ingest_roots=[str(root)])
    port = free_port()
    launch(app, engine, port=port, prevent_thread_lock=True)
    yield {"url": f"http://127.0.0.1:{port}/", "files": files, "engine": engine,
           "trained": bool(trained)}
    app.close()


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _upload(page, path: Path) -> str:
    """Upload a file; returns the study status line once it changed."""
    return _change_study(page, lambda: page.set_input_files("#upload input[type=file]",
                                                            str(path)))


def _change_study(page, action) -> str:
    """Run ``action`` (an upload, "open as current study", ...) and wait until the new study
    is loaded *and* its refresh (zero-shot table, cleared heatmaps) has finished: acting on
    another tab before then races with that refresh, which clears the grounding image."""
    before = [page.inner_text("#study-status"), page.inner_text("#zs-table")]
    action()
    page.wait_for_function(
        "b => { const t = document.querySelector('#study-status').innerText.trim();"
        " const z = document.querySelector('#zs-table').innerText;"
        " return t && t !== b[0] && !t.startsWith('no study')"
        " && (t.startsWith('⚠') || (z !== b[1] && z.includes('probability'))); }", arg=before)
    return page.inner_text("#study-status").strip()


def _probability(page, finding: str, changed_from: float | None = None) -> float:
    """The finding's probability in the zero-shot table; with ``changed_from``, wait until the
    table shows another value (the table can still hold the previous study's numbers while
    the new study is being scored)."""
    page.wait_for_function(
        "a => [...document.querySelectorAll('#zs-table tr')].some(r => {"
        " const c = [...r.querySelectorAll('td')].map(x => x.innerText.trim());"
        " return c.length > 1 && c[0] === a[0] && (a[1] === null || Number(c[1]) !== a[1]); })",
        arg=[finding, changed_from])
    for row in page.query_selector_all("#zs-table tr"):
        cells = [c.inner_text().strip() for c in row.query_selector_all("td")]
        if cells and cells[0] == finding:
            return float(cells[1])
    raise AssertionError(f"{finding} not in the probability table")


def _shot(page, tab: str) -> None:
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    out = SHOTS / f"app_{tab}.png"
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    # IU report text is CC BY-NC-ND and read at run time, never copied into the repository:
    # blur the report quotes so the committed screenshots do not carry it
    page.add_style_tag(content="blockquote { filter: blur(6px); }")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out))
    if out.stat().st_size > 380_000:  # keep the repository light: 256-colour PNG
        Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)
    assert out.stat().st_size < 400_000


def _clear_upload(page) -> None:
    clear = page.locator("#upload button[aria-label='Clear']")
    if clear.count():
        clear.first.click()


def test_app_end_to_end(served, browser):
    t0 = time.time()
    files = served["files"]
    ctx, page = open_page(browser, served["url"])
    assert "RadLens" in page.title()

    # zero-shot: an effusion study and a normal study
    status = _upload(page, files["effusion"])
    assert "⚠" not in status, status
    p_eff = _probability(page, "pleural_effusion")
    page.wait_for_selector("#zs-chart img")
    _shot(page, "zeroshot")
    _clear_upload(page)
    status = _upload(page, files["normal"])
    assert "⚠" not in status, status
    p_norm = _probability(page, "pleural_effusion",
                          changed_from=p_eff if served["trained"] else None)
    assert 0.0 <= p_eff <= 1.0 and 0.0 <= p_norm <= 1.0
    print(f"pleural_effusion probability: effusion study {p_eff:.3f}, normal study "
          f"{p_norm:.3f}")  # shown with pytest -rP; quoted in the README
    if served["trained"]:
        assert p_eff > p_norm, (p_eff, p_norm)

    # search by report text: k thumbnails, then one result large with its heatmap
    _tab(page, "Search by report text")
    page.fill("#query textarea", "large right pleural effusion")
    page.click("#search-btn")
    page.wait_for_function("document.querySelectorAll('#search-gallery img').length >= 8")
    assert page.locator("#search-gallery img").count() == 8
    page.locator("#search-gallery img").first.click()
    page.wait_for_selector("#search-selected img")
    page.wait_for_function("document.querySelector('#search-card').innerText.includes('study')")
    _shot(page, "search")
    # a search hit becomes the current study
    assert _change_study(page, lambda: page.click("#open-selected")).startswith("✓")

    # grounding on the current (normal) study
    _tab(page, "Grounding")
    page.wait_for_selector("#ground-img", state="visible")  # the tab is mounted
    page.click("#ground-btn")
    try:
        page.wait_for_selector("#ground-img img", timeout=10_000)
    except PlaywrightTimeout:
        # Known, not yet explained: in about half of the runs on the 2-core machine the first
        # heatmap image after switching to this tab never renders, although the handler ran
        # (its legend is shown). A second click renders it; one retry, then a hard failure.
        assert "cardiomegaly" in page.inner_text("#ground-legend")
        page.click("#ground-btn")
        page.wait_for_selector("#ground-img img")
    page.wait_for_function("document.querySelector('#ground-legend').innerText.includes("
                           "'cardiomegaly')")
    _shot(page, "grounding")

    # similar cases
    _tab(page, "Similar cases")
    page.click("#similar-btn")
    page.wait_for_function("document.querySelectorAll('#similar-gallery img').length >= 6")
    page.wait_for_selector("#similar-query img")
    _shot(page, "similar")

    # index: extend from a folder under the ingest root, with progress and a failures table
    _tab(page, "Index")
    page.wait_for_function("document.querySelector('#index-stats').innerText.includes('| 60')"
                           " || document.querySelector('#index-stats').innerText.includes('60')")
    page.fill("#ingest-folder textarea", str(files["more"]))
    page.click("#build-btn")
    page.wait_for_function("document.querySelector('#build-status').innerText.includes('added')",
                           timeout=90_000)
    assert "added 4" in page.inner_text("#build-status")
    assert "broken.dcm" in page.inner_text("#failures")
    assert "64" in page.inner_text("#index-stats")
    _shot(page, "index")

    # window presets re-render the viewer
    _tab(page, "Zero-shot findings")
    before = page.get_attribute("#zs-viewer img", "src")
    page.click("#window-preset input")
    page.get_by_role("option", name="lung").click()
    page.wait_for_function("s => document.querySelector('#zs-viewer img').src !== s", arg=before)
    assert page.input_value("#w-centre input[type=number]") == "-600"

    # malformed uploads: one line each, and the app keeps serving
    _tab(page, "Zero-shot findings")
    for bad in ("truncated", "text"):
        _clear_upload(page)
        status = _upload(page, files[bad])
        assert status.startswith("⚠") and "\n" not in status, status
        assert "Traceback" not in page.content()
    _clear_upload(page)
    status = _upload(page, files["effusion"])
    assert "⚠" not in status
    assert 0.0 <= _probability(page, "pleural_effusion") <= 1.0
    ctx.close()
    assert time.time() - t0 < 150


def test_two_sessions_do_not_share_uploads(served, browser):
    from ui.handlers import load_upload

    files = served["files"]
    label = {k: load_upload(files[k], 2**30).label for k in ("effusion", "normal")}
    assert label["effusion"] != label["normal"]
    (ca, a), (cb, b) = open_page(browser, served["url"]), open_page(browser, served["url"])
    a.set_input_files("#upload input[type=file]", str(files["effusion"]))
    b.set_input_files("#upload input[type=file]", str(files["normal"]))
    for page, mine, other in ((a, "effusion", "normal"), (b, "normal", "effusion")):
        page.wait_for_function("t => document.querySelector('#study-status').innerText"
                               ".includes(t)", arg=label[mine])
        _probability(page, "pleural_effusion")
        assert label[other] not in page.inner_text("#study-status")
    # each session keeps its own study after the other one acted
    b.reload()
    b.wait_for_selector("#tabs")
    assert label["effusion"] not in b.inner_text("#study-status")
    assert label["normal"] not in a.inner_text("#study-status")
    assert label["effusion"] in a.inner_text("#study-status")
    _tab(b, "Grounding")
    b.click("#ground-btn")  # a fresh session has no study: a message, not someone else's image
    b.wait_for_function("document.querySelector('#ground-legend') !== null")
    b.wait_for_timeout(800)
    assert b.locator("#ground-img img").count() == 0
    ca.close()
    cb.close()
