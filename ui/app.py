"""The RadLens Gradio app: ``build_app(engine) -> gr.Blocks``.

Layout: a study panel on the left (upload or indexed example, window preset and sliders) and five
tabs: zero-shot findings, search by report text, similar cases, grounding, index; plus a sixth,
Volumes, when the index has a volume collection (pick or upload a CT volume, scroll its axial
slices with CT window presets, its most salient slices, and similar indexed volumes). Per-user data
lives only in ``gr.State`` (the current study, the session's prompt set, the last search, the
last groundings), so two sessions never see each other's images. Handlers are thin: they call
:mod:`ui.handlers` and turn a :class:`RadLensError` into a one-line message (status line + toast).

Theme and CSS are launch arguments in Gradio 6: use :func:`ui.serve.launch` (or pass
``theme=THEME``, ``css=CSS`` yourself).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from index.engine import Engine
from ui import gradio_fixes
from ui import handlers as h
from ui import render as rd
from vlm.errors import RadLensError
from vlm.zeroshot import PromptSet

logger = logging.getLogger(__name__)

CSS = """
:root, .dark { --rl-bg: #0b0e14; --rl-panel: #141923; --rl-line: #252c3a; --rl-accent: #e69f00; }
body, gradio-app, .gradio-container { background: var(--rl-bg) !important; }
.gradio-container { max-width: 1500px !important; }
#rl-header h1 { font-size: 1.35rem; margin: 0; letter-spacing: .02em; }
#rl-header p { margin: 0; opacity: .7; }
.rl-viewer, .rl-viewer img, .rl-viewer .image-container { background: #000 !important; }
.rl-viewer img { object-fit: contain; }
#study-status { min-height: 1.6em; font-size: .95rem; }
#study-status p, .rl-status p { margin: 0; }
.rl-error { color: #ff6b6b; font-weight: 600; }
.rl-ok { color: #8fd19e; }
#zs-table table { font-size: .85rem; width: 100%; }
#index-stats table, #index-stats th, #index-stats td, #zs-table table, #zs-table th,
#zs-table td { border: 1px solid var(--rl-line) !important; border-collapse: collapse; }
#zs-table td, #zs-table th { padding: 2px 8px; }
#search-gallery .caption-label, #similar-gallery .caption-label { font-size: .8rem; }
#vol-strip .caption-label, #vol-similar .caption-label { font-size: .8rem; }
"""

THEME = gr.themes.Base(
    primary_hue=gr.themes.colors.amber, neutral_hue=gr.themes.colors.slate,
    font=["Inter", "system-ui", "Segoe UI", "sans-serif"],  # local fonts only: no CDN
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
).set(
    body_background_fill="#0b0e14", body_background_fill_dark="#0b0e14",
    body_text_color="#e6e9ef", body_text_color_dark="#e6e9ef",
    block_background_fill="#141923", block_background_fill_dark="#141923",
    block_border_color="#252c3a", block_border_color_dark="#252c3a",
    block_label_text_color="#aab2c0", block_label_text_color_dark="#aab2c0",
    block_title_text_color="#e6e9ef", block_title_text_color_dark="#e6e9ef",
    input_background_fill="#0f131b", input_background_fill_dark="#0f131b",
    background_fill_primary="#141923", background_fill_primary_dark="#141923",
    background_fill_secondary="#0f131b", background_fill_secondary_dark="#0f131b",
    border_color_primary="#252c3a", border_color_primary_dark="#252c3a",
    button_primary_background_fill="#e69f00", button_primary_background_fill_dark="#e69f00",
    button_primary_text_color="#0b0e14", button_primary_text_color_dark="#0b0e14",
    color_accent_soft="#2a2213", color_accent_soft_dark="#2a2213",
)
#: Force Gradio's dark palette whatever the browser prefers.
FORCE_DARK_JS = "() => { document.body.classList.add('dark'); }"


def _err(message: str) -> str:
    return f"<span class='rl-error'>⚠ {message}</span>"


def _ok(message: str) -> str:
    return f"<span class='rl-ok'>✓</span> {message}"


def _guarded(fn: Callable[..., Any], n_out: int, status_index: int | None = None
             ) -> Callable[..., Any]:
    """Run ``fn``; on a user error, warn with one line and leave the outputs unchanged (or put
    the line into output ``status_index``). Unexpected errors become one line too, no trace."""
    @functools.wraps(fn)  # Gradio reads the signature (gr.SelectData, gr.Progress) through it
    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except RadLensError as exc:
            message = str(exc)
        except Exception as exc:  # keep serving: one line for the user, details in the log
            logger.exception("handler %s failed", getattr(fn, "__name__", "?"))
            message = f"internal error ({type(exc).__name__}); the app is still running"
        gr.Warning(message)
        outs: list[Any] = [gr.skip()] * n_out
        if status_index is not None:
            outs[status_index] = _err(message)
        return tuple(outs) if n_out > 1 else outs[0]

    return wrapped


def build_app(engine: Engine, *, max_upload_mb: float = 50, k_default: int = 8,
              ingest_roots: Sequence[str | os.PathLike[str]] | None = None,
              prompts: PromptSet | None = None, title: str = "RadLens") -> gr.Blocks:
    """The app for one engine.

    Args:
        engine: The opened index and model; shared read-only by all sessions.
        max_upload_mb: Largest upload accepted (also pass it to ``launch(max_file_size=...)``).
        k_default: Results per search.
        ingest_roots: Folders (or DICOMweb service roots) the Index tab may build from; None
            switches building off.
        prompts: Starting prompt set of every session (default: the shipped CXR prompts).
    """
    gradio_fixes.install()  # cached images are never rewritten while being served
    max_bytes = int(max_upload_mb * 2**20)
    base_prompts = prompts or PromptSet.load()
    examples = h.example_choices(engine)
    volume_choices = h.volume_choices(engine)
    modalities = ["any", *h.facet_values(engine, "modality")]
    views = ["any", *h.facet_values(engine, "view")]
    years = ["any", *h.facet_values(engine, "year")]

    # uploads are deleted once read (h.discard_upload); what else gradio caches (rendered
    # views) is dropped after an hour, checked every 10 minutes
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as app:
        upload_root = app.GRADIO_CACHE  # where gradio keeps uploads (GRADIO_TEMP_DIR)
        study = gr.State(None)  # h.Study of this session
        session_prompts = gr.State(base_prompts)
        hits = gr.State([])  # last search: list[Result]
        last_query = gr.State("")
        grounded = gr.State([])  # list[h.Grounded]
        selected_id = gr.State(None)  # catalog id of the search hit shown large
        vol_study = gr.State(None)  # h.VolumeStudy of this session
        vol_hits = gr.State([])  # last similar-volume search: list[Hit]

        gr.Markdown(f"# {title}\nQuery an imaging archive with language · research use only, "
                    "not for diagnosis", elem_id="rl-header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=290):
                upload = gr.File(label=f"Upload a study · DICOM, PNG, JPEG ≤ {max_upload_mb:g} MB",
                                 type="filepath", file_count="single", elem_id="upload",
                                 height=120)
                example = gr.Dropdown(examples, value=None, label="…or open an indexed example",
                                      elem_id="example")
                status = gr.Markdown("_no study loaded_", elem_id="study-status")
                preset = gr.Dropdown(list(h.WINDOW_CHOICES), value=h.FILE_WINDOW,
                                     label="Window", elem_id="window-preset")
                centre = gr.Slider(-1024, 4096, value=40, label="Centre", elem_id="w-centre")
                width = gr.Slider(1, 8192, value=400, label="Width", elem_id="w-width")
            with gr.Column(scale=4), gr.Tabs(elem_id="tabs"):
                with gr.Tab("Zero-shot findings", id="zeroshot", elem_id="tab-zeroshot"):
                    with gr.Row():
                        viewer = gr.Image(label="Study", type="numpy", interactive=False,
                                          elem_id="zs-viewer",
                                          elem_classes="rl-viewer", height=460)
                        with gr.Column():
                            chart = gr.Image(label="Finding probabilities", type="numpy",
                                             interactive=False, height=340,
                                             elem_id="zs-chart")
                            table = gr.Markdown(elem_id="zs-table")
                    with gr.Accordion("Prompts (this session only)", open=False):
                        with gr.Row():
                            f_name = gr.Textbox(label="Finding", placeholder="pneumothorax",
                                                elem_id="f-name")
                            f_pos = gr.Textbox(label="Positive phrasing (one per line)",
                                               lines=2, elem_id="f-pos")
                            f_neg = gr.Textbox(label="Negative phrasing (one per line)",
                                               lines=2, elem_id="f-neg")
                        with gr.Row():
                            add_btn = gr.Button("Add / replace finding", variant="primary")
                            reset_btn = gr.Button("Reset to defaults")
                        prompt_md = gr.Markdown(h.prompt_summary(base_prompts))
                with gr.Tab("Search by report text", id="search", elem_id="tab-search"):
                    with gr.Row():
                        query = gr.Textbox(label="Report text or finding", scale=4,
                                           placeholder="large right pleural effusion",
                                           elem_id="query")
                        k = gr.Slider(1, 48, value=k_default, step=1, label="Top k", scale=1)
                    with gr.Row():
                        f_mod = gr.Dropdown(modalities, value="any", label="Modality")
                        f_view = gr.Dropdown(views, value="any", label="View")
                        f_ymin = gr.Dropdown(years, value="any", label="Year from")
                        f_ymax = gr.Dropdown(years, value="any", label="Year to")
                        with gr.Column(min_width=160):
                            search_btn = gr.Button("Search", variant="primary",
                                                   elem_id="search-btn")
                            contrast = gr.Checkbox(
                                value=True, label="Rank against a normal study",
                                info="off: plain similarity to the text", elem_id="contrast")
                    search_status = gr.Markdown(elem_classes="rl-status")
                    results = gr.Gallery(label="Results", columns=6, height=300,
                                         object_fit="contain", elem_id="search-gallery",
                                         allow_preview=False)
                    with gr.Row():
                        selected = gr.Image(label="Selected · query heatmap", type="numpy",
                                            interactive=False, elem_classes="rl-viewer",
                                            height=420, elem_id="search-selected")
                        with gr.Column():
                            card = gr.Markdown(elem_id="search-card")
                            open_btn = gr.Button("Open as current study", size="sm",
                                                 elem_id="open-selected")
                with gr.Tab("Similar cases", id="similar", elem_id="tab-similar"):
                    with gr.Row():
                        k_sim = gr.Slider(1, 24, value=6, step=1, label="Top k")
                        sim_btn = gr.Button("Find similar cases", variant="primary",
                                            elem_id="similar-btn")
                    with gr.Row():
                        sim_query = gr.Image(label="Study · matched regions", type="numpy",
                                             elem_id="similar-query",
                                             interactive=False, elem_classes="rl-viewer",
                                             height=400, scale=1)
                        sim_gallery = gr.Gallery(label="Similar studies", columns=3,
                                                 height=400, object_fit="contain", scale=2,
                                                 elem_id="similar-gallery")
                with gr.Tab("Grounding", id="grounding", elem_id="tab-grounding"):
                    with gr.Row():
                        phrases = gr.Textbox(label="Phrases (one per line)", lines=3,
                                             value="pleural effusion\ncardiomegaly",
                                             elem_id="phrases", scale=3)
                        with gr.Column(scale=1):
                            ground_btn = gr.Button("Ground", variant="primary",
                                                   elem_id="ground-btn")
                            opacity = gr.Slider(0, 1, value=0.55, step=0.05,
                                                label="Overlay opacity", elem_id="opacity")
                    ground_img = gr.Image(label="Heatmaps", type="numpy", interactive=False,
                                          elem_classes="rl-viewer", height=480,
                                          elem_id="ground-img")
                    legend = gr.Markdown(elem_id="ground-legend")
                if engine.volumes is not None:
                    with gr.Tab("Volumes", id="volumes", elem_id="tab-volumes"):
                        with gr.Row():
                            vol_pick = gr.Dropdown(volume_choices, value=None, scale=3,
                                                   label="Indexed volume", elem_id="vol-pick")
                            vol_upload = gr.File(
                                label="…or upload · NIfTI (.nii, .nii.gz) or a .zip of one "
                                      f"DICOM series ≤ {max_upload_mb:g} MB", scale=2,
                                type="filepath", file_count="single", elem_id="vol-upload",
                                height=120)
                            vol_k = gr.Slider(1, 24, value=6, step=1, label="Similar volumes",
                                              elem_id="vol-k", scale=1)
                        vol_status = gr.Markdown("_no volume loaded_", elem_id="vol-status",
                                                 elem_classes="rl-status")
                        with gr.Row():
                            with gr.Column(scale=2):
                                vol_view = gr.Image(label="Axial slice", type="numpy",
                                                    interactive=False, height=420,
                                                    elem_id="vol-viewer",
                                                    elem_classes="rl-viewer")
                                vol_slice = gr.Slider(0, 1, value=0, step=1, label="Slice",
                                                      elem_id="vol-slice")
                                vol_window = gr.Dropdown(list(h.WINDOW_PRESETS),
                                                         value=h.VOLUME_WINDOW, label="Window",
                                                         elem_id="vol-window")
                            with gr.Column(scale=3):
                                vol_similar = gr.Gallery(label="Similar volumes", columns=3,
                                                         height=380, object_fit="contain",
                                                         elem_id="vol-similar",
                                                         allow_preview=False)
                                vol_card = gr.Markdown(elem_id="vol-card")
                        vol_strip = gr.Gallery(label=h.strip_label(None), columns=5, height=230,
                                               object_fit="contain", elem_id="vol-strip",
                                               allow_preview=False)
                with gr.Tab("Index", id="index", elem_id="tab-index"):
                    stats = gr.Markdown(h.index_summary(engine.info()), elem_id="index-stats")
                    with gr.Row():
                        folder = gr.Textbox(label="Folder (under an ingest root) or DICOMweb "
                                                  "URL (an allowed server) to add",
                                            elem_id="ingest-folder",
                                            scale=4, interactive=bool(ingest_roots),
                                            placeholder="/data/archive/new" if ingest_roots
                                            else "building is off on this server")
                        build_btn = gr.Button("Build / extend", variant="primary",
                                              elem_id="build-btn",
                                              interactive=bool(ingest_roots))
                    build_status = gr.Markdown(elem_classes="rl-status", elem_id="build-status")
                    failures = gr.Dataframe(headers=["file", "reason"], interactive=False,
                                            elem_id="failures",
                                            label="Failures", max_height=260)

        # ------------------------------------------------------------------ study panel
        def _sliders(s: h.Study | None, c: float, w: float) -> tuple[Any, Any]:
            # ranges cover the data and the window asked for (an out-of-range value is refused)
            lo, hi = (s.lo, s.hi) if s is not None else (c - w, c + w)
            return (gr.update(minimum=min(lo, c - w / 2), maximum=max(hi, c + w / 2), value=c),
                    gr.update(minimum=1, maximum=max(2.0 * (hi - lo), w, 2.0), value=w))

        def _loaded(s: h.Study) -> tuple[Any, ...]:
            return (s, _ok(s.label), gr.update(value=h.FILE_WINDOW),
                    *_sliders(s, s.centre, s.width), [])

        def on_upload(path: str | None) -> tuple[Any, ...]:
            # the file box is cleared after reading, so the file name does not stay on screen,
            # and the file is deleted, so it does not stay on disk either
            try:
                return (*_loaded(h.load_upload(path, max_bytes)), None)
            except RadLensError as exc:
                gr.Warning(str(exc))
                return (None, _err(str(exc)), gr.skip(), gr.skip(), gr.skip(), [], None)
            finally:
                h.discard_upload(path, upload_root)

        def on_example(item_id: int | None) -> tuple[Any, ...]:
            return _loaded(h.load_example(engine, item_id))

        study_outs = [study, status, preset, centre, width, grounded]
        view_ins = [study, preset, centre, width]

        def refresh(s: h.Study | None, p: str, c: float, w: float,
                    ps: PromptSet) -> tuple[Any, ...]:
            if s is None:
                return None, None, None, None, None
            probs = h.classify(engine, s, ps)
            return (h.display(s, p, c, w), rd.bar_chart(probs), h.probability_table(probs),
                    None, None)

        refresh_outs = [viewer, chart, table, ground_img, sim_query]
        refresh_g = _guarded(refresh, len(refresh_outs))
        upload.upload(on_upload, upload, [*study_outs, upload]).then(
            refresh_g, [*view_ins, session_prompts], refresh_outs)
        example.input(_guarded(on_example, len(study_outs), 1), example, study_outs).then(
            refresh_g, [*view_ins, session_prompts], refresh_outs)

        def rerender(s: h.Study | None, p: str, c: float, w: float, gs: list[h.Grounded],
                     op: float) -> tuple[Any, ...]:
            if s is None:
                return None, gr.skip()
            img = h.display(s, p, c, w)
            return img, (h.grounding_overlay(img, gs, op)[0] if gs else gr.skip())

        def on_preset(s: h.Study | None, p: str) -> tuple[Any, Any]:
            return _sliders(s, *h.preset_values(s, p))

        rerender_g = _guarded(rerender, 2)
        preset.input(on_preset, [study, preset], [centre, width]).then(
            rerender_g, [*view_ins, grounded, opacity], [viewer, ground_img])
        for slider in (centre, width):
            slider.release(lambda: h.CUSTOM_WINDOW, None, preset).then(
                rerender_g, [*view_ins, grounded, opacity], [viewer, ground_img],
                trigger_mode="always_last", show_progress="hidden")

        # ------------------------------------------------------------------ prompts
        def on_add(ps: PromptSet, name: str, pos: str, neg: str) -> tuple[Any, ...]:
            new = h.add_finding(ps, name, pos, neg)
            return new, h.prompt_summary(new)

        add_btn.click(_guarded(on_add, 2), [session_prompts, f_name, f_pos, f_neg],
                      [session_prompts, prompt_md]).then(
            refresh_g, [*view_ins, session_prompts], refresh_outs)
        reset_btn.click(lambda: (base_prompts, h.prompt_summary(base_prompts)), None,
                        [session_prompts, prompt_md]).then(
            refresh_g, [*view_ins, session_prompts], refresh_outs)

        # ------------------------------------------------------------------ search
        def on_search(text: str, k_: float, mod: str, view: str, y0: float | None,
                      y1: float | None, contrast_: bool = True) -> tuple[Any, ...]:
            found = h.search_text(engine, text, int(k_), mod, view, y0, y1, bool(contrast_))
            items = h.gallery(engine, found)
            note = _ok(f"{len(items)} studies") if items else _err("no studies match")
            return found, text, items, note, None, "", None

        search_outs = [hits, last_query, results, search_status, selected, card, selected_id]
        for trigger in (search_btn.click, query.submit):
            trigger(_guarded(on_search, len(search_outs), 3),
                    [query, k, f_mod, f_view, f_ymin, f_ymax, contrast], search_outs)

        def on_select(found: list[Any], text: str, evt: gr.SelectData) -> tuple[Any, ...]:
            if not found or evt.index is None or evt.index >= len(found):
                return gr.skip(), gr.skip(), gr.skip()
            hit = found[int(evt.index)]
            return (*h.result_view(engine, hit, text), hit.id)

        results.select(_guarded(on_select, 3), [hits, last_query], [selected, card, selected_id])
        open_btn.click(_guarded(on_example, len(study_outs), 1), selected_id, study_outs).then(
            refresh_g, [*view_ins, session_prompts], refresh_outs)

        # ------------------------------------------------------------------ similar
        def on_similar(s: h.Study | None, k_: float) -> tuple[Any, ...]:
            if s is None:
                raise RadLensError("load a study first (upload or pick an example)")
            return h.similar(engine, s, int(k_))

        sim_btn.click(_guarded(on_similar, 2), [study, k_sim], [sim_query, sim_gallery])

        # ------------------------------------------------------------------ grounding
        def on_ground(s: h.Study | None, text: str, p: str, c: float, w: float,
                      op: float) -> tuple[Any, ...]:
            if s is None:
                raise RadLensError("load a study first (upload or pick an example)")
            gs = h.ground(engine, s, text)
            img, leg = h.grounding_overlay(h.display(s, p, c, w), gs, op)
            return gs, img, leg

        ground_btn.click(_guarded(on_ground, 3, 2), [study, phrases, *view_ins[1:], opacity],
                         [grounded, ground_img, legend])
        opacity.release(rerender_g, [*view_ins, grounded, opacity], [viewer, ground_img],
                        show_progress="hidden")

        # ------------------------------------------------------------------ index
        def on_build(path: str, progress: gr.Progress = gr.Progress(track_tqdm=True)
                     ) -> tuple[Any, ...]:
            progress(0, desc="scanning")
            summary, fails = h.build_index(engine, path, ingest_roots)
            return _ok(summary), fails, h.index_summary(engine.info())

        build_btn.click(_guarded(on_build, 3, 0), folder, [build_status, failures, stats],
                        concurrency_limit=1, concurrency_id="ingest")
        # ------------------------------------------------------------------ volumes
        if engine.volumes is not None:
            def _vol_loaded(vs: h.VolumeStudy, preset: str, k_: float) -> tuple[Any, ...]:
                mid = vs.hu.shape[0] // 2
                items, found = h.similar_volumes(engine, vs, int(k_))
                note = _ok(f"{vs.label} · {len(items)} similar volumes")
                return (vs, note, gr.update(minimum=0, maximum=max(vs.hu.shape[0] - 1, 1),
                                            value=mid),
                        h.volume_slice(vs, mid, preset),
                        gr.update(value=h.volume_strip(vs, preset), label=h.strip_label(vs)),
                        items, found, "")

            vol_outs = [vol_study, vol_status, vol_slice, vol_view, vol_strip, vol_similar,
                        vol_hits, vol_card]

            def on_vol_pick(item_id: int | None, preset: str, k_: float) -> tuple[Any, ...]:
                return _vol_loaded(h.load_volume_item(engine, item_id), preset, k_)

            def on_vol_upload(path: str | None, preset: str, k_: float) -> tuple[Any, ...]:
                # the file box is cleared after reading and the file deleted (as on_upload)
                try:
                    return (*_vol_loaded(h.load_volume_upload(engine, path, max_bytes), preset,
                                         k_), None)
                except RadLensError as exc:
                    gr.Warning(str(exc))
                    outs: list[Any] = [gr.skip()] * len(vol_outs)
                    outs[1] = _err(str(exc))
                    return (*outs, None)
                finally:
                    h.discard_upload(path, upload_root)

            vol_pick.input(_guarded(on_vol_pick, len(vol_outs), 1),
                           [vol_pick, vol_window, vol_k], vol_outs)
            vol_upload.upload(on_vol_upload, [vol_upload, vol_window, vol_k],
                              [*vol_outs, vol_upload])

            def on_vol_slice(vs: h.VolumeStudy | None, i: float, preset: str) -> Any:
                return gr.skip() if vs is None else h.volume_slice(vs, i, preset)

            vol_slice.change(_guarded(on_vol_slice, 1), [vol_study, vol_slice, vol_window],
                             vol_view, trigger_mode="always_last", show_progress="hidden")

            def on_vol_window(vs: h.VolumeStudy | None, i: float, preset: str
                              ) -> tuple[Any, ...]:
                if vs is None:
                    return gr.skip(), gr.skip()
                return h.volume_slice(vs, i, preset), h.volume_strip(vs, preset)

            vol_window.input(_guarded(on_vol_window, 2), [vol_study, vol_slice, vol_window],
                             [vol_view, vol_strip])

            def on_vol_k(vs: h.VolumeStudy | None, k_: float) -> tuple[Any, ...]:
                if vs is None:
                    return gr.skip(), gr.skip(), gr.skip()
                items, found = h.similar_volumes(engine, vs, int(k_))
                return items, found, ""

            vol_k.release(_guarded(on_vol_k, 3), [vol_study, vol_k],
                          [vol_similar, vol_hits, vol_card])

            def on_vol_select(found: list[Any], evt: gr.SelectData) -> Any:
                if not found or evt.index is None or evt.index >= len(found):
                    return gr.skip()
                return h.volume_card(found[int(evt.index)])

            vol_similar.select(_guarded(on_vol_select, 1), vol_hits, vol_card)

            def on_strip_select(vs: h.VolumeStudy | None, evt: gr.SelectData) -> Any:
                if vs is None or evt.index is None or evt.index >= len(vs.salient):
                    return gr.skip()
                return h.strip_slice(vs, int(evt.index))

            vol_strip.select(_guarded(on_strip_select, 1), vol_study, vol_slice)
        app.load(None, js=FORCE_DARK_JS)
    return app
