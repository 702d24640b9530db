"""The Volumes tab in headless Chromium: pick an indexed PhantomCT volume with a liver lesion,
scroll its slices, change the window, see the attention-slice strip and k similar volumes,
reject a malformed upload in one line; screenshot ``docs/img/app_volumes.png``.

Same machinery as ``test_browser.py`` (Debian ``chromium`` + PyPI ``playwright``). The index
holds the tiny archive's images and the demo's 24 full-size PhantomCT volumes (seed 1, unseen
in training) encoded by the shipped supervised lesion model ``checkpoints/lesion-seg``
(``RADLENS_VOLUME_MODEL`` names another volume model). The share of liver-lesion volumes among
the similar volumes of a liver-lesion query is read from the rendered captions and asserted
above the base rate (the measurement goes to ``build/test-artifacts/volume_browser.json``).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.ui.chromium import ARTIFACTS, MARKS, SHOTS, free_port, open_page

K = 6  # the tab's default number of similar volumes

pytestmark = MARKS


@pytest.fixture(scope="module")
def served(tiny_model, tiny_archive, lesion_ct, tmp_path_factory):
    """Images + PhantomCT volumes -> index -> app on 127.0.0.1:<free port> in a thread."""
    from index.engine import Engine
    from index.volumes import ingest_volumes
    from tests.conftest import SHIPPED_LESION_MODEL
    from tests.ui.conftest import build_index
    from ui.app import build_app
    from ui.serve import launch
    from vlm.volume_encoder import VolumeEncoder

    root = tmp_path_factory.mktemp("browser_volumes")
    out = build_index(tiny_model, tiny_archive, root / "idx")
    model = os.environ.get("RADLENS_VOLUME_MODEL") or str(SHIPPED_LESION_MODEL)
    ingest_volumes(VolumeEncoder.load(model), lesion_ct, out, progress=False)
    engine = Engine.open(out)
    bad = root / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI volume\n" * 20)
    app = build_app(engine)
    port = free_port()
    launch(app, engine, port=port, prevent_thread_lock=True)
    yield {"url": f"http://127.0.0.1:{port}/", "engine": engine, "bad": bad, "model": model}
    app.close()


def _src(page, selector: str) -> str | None:
    return page.get_attribute(selector, "src")


def test_volumes_tab_end_to_end(served, browser):
    from index.volumes import VOLUME
    from ui import handlers as h
    from vlm.volume_encoder import SCORE_MEANING

    t0 = time.time()
    engine = served["engine"]
    catalog = engine.index.catalog
    items = [it for it in catalog.get_many(catalog.filter_ids(VOLUME).tolist()) if it]
    liver = {it.id for it in items if "liver_lesion" in (it.extra.get("labels") or [])}
    label, query_id = next((lab, i) for lab, i in h.volume_choices(engine) if i in liver)

    ctx, page = open_page(browser, served["url"], height=1200)
    page.get_by_role("tab", name="Volumes").click()
    page.click("#vol-pick input")
    page.get_by_role("option", name=label).click()
    page.wait_for_function(f"document.querySelectorAll('#vol-similar img').length === {K}")
    page.wait_for_selector("#vol-viewer img")
    page.wait_for_function("document.querySelectorAll('#vol-strip img').length === 5")
    status = page.inner_text("#vol-status")
    assert status.strip().startswith("✓") and f"#{query_id}" in status
    # the strip says what its scores are: the lesion model's, or a slice encoder's
    assert any(meaning in page.inner_text("#vol-strip") for meaning in SCORE_MEANING.values())

    # the slice slider moves through the volume
    before = _src(page, "#vol-viewer img")
    page.locator("#vol-slice input[type=range]").fill("3")
    page.wait_for_function("s => document.querySelector('#vol-viewer img').src !== s",
                           arg=before)
    assert page.input_value("#vol-slice input[type=number]") == "3"
    # a window preset re-renders the slice
    before = _src(page, "#vol-viewer img")
    page.click("#vol-window input")
    page.get_by_role("option", name="lung").click()
    page.wait_for_function("s => document.querySelector('#vol-viewer img').src !== s",
                           arg=before)

    # the similar volumes: k captions, the query left out, liver-lesion share vs base rate
    captions = [c.inner_text().strip()
                for c in page.query_selector_all("#vol-similar .caption-label")]
    assert len(captions) == K, captions
    assert all("·" in c for c in captions)
    share = sum("liver lesion" in c for c in captions) / K
    base = (len(liver) - 1) / (len(items) - 1)
    result = {"query": query_id, "k": K, "liver_share": round(share, 4),
              "base_rate": round(base, 4), "volumes": len(items), "liver_volumes": len(liver),
              "volume_model": served["model"]}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "volume_browser.json").write_text(json.dumps(result, indent=1) + "\n")
    expected = {h.volume_caption(hit) for hit in h.similar_volumes(
        engine, h.load_volume_item(engine, query_id), K)[1]}
    assert set(captions) == expected  # the page shows what the handler found
    assert share > base, result

    page.locator("#vol-similar img").first.click()
    page.wait_for_function("document.querySelector('#vol-card').innerText.includes('volume')")
    _shot(page)

    # a malformed upload: one line, the app keeps serving
    page.set_input_files("#vol-upload input[type=file]", str(served["bad"]))
    page.wait_for_function("document.querySelector('#vol-status').innerText.includes('⚠')")
    status = page.inner_text("#vol-status").strip()
    assert "\n" not in status and "cannot read the upload" in status
    assert str(served["bad"].parent) not in page.content() and "Traceback" not in page.content()
    page.click("#vol-pick input")
    page.get_by_role("option", name=label).click()
    page.wait_for_function("document.querySelector('#vol-status').innerText.startsWith('✓')")
    ctx.close()
    assert time.time() - t0 < 120


def _shot(page) -> None:
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    out = SHOTS / "app_volumes.png"
    page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out))
    if out.stat().st_size > 380_000:  # keep the repository light: 256-colour PNG
        Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)
    assert out.stat().st_size < 400_000
