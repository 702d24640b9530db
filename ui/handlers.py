"""What the app's buttons do, as plain functions of an :class:`Engine` and per-session values.

No Gradio here: ``ui/app.py`` wires these to components and turns :class:`RadLensError` into a
one-line message in the page. Everything is testable without a browser.

Privacy rules kept here: an upload is labelled by its pseudonym, never its file name; catalog rows
are shown through an allow-list (:func:`describe_item`), never ``source_uri``; the only files
served are thumbnails the index owns (:meth:`Engine.item_path`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.catalog import CatalogItem
from index.engine import NORMAL_REFERENCE, Engine, Result
from index.folder import Hit
from index.volume_search import VolumeQuery, VolumeSearch
from index.volumes import SALIENT_SLICES, VOLUME, load_stack, preview_stack
from ui import render as rd
from vlm.errors import ImageReadError, RadLensError
from vlm.io import WINDOW_PRESETS, ImageData, Volume, read_image
from vlm.io import render as window_render
from vlm.volume_encoder import SCORE_DISTINCT, SCORE_MEANING
from vlm.zeroshot import PromptSet

logger = logging.getLogger(__name__)

UPLOAD_SUFFIXES = ("", ".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
FILE_WINDOW, CUSTOM_WINDOW = "file default", "custom"
WINDOW_CHOICES = (FILE_WINDOW, *WINDOW_PRESETS, CUSTOM_WINDOW)
_PATHS = re.compile(r"'?(?:[A-Za-z]:)?(?:[/\\][^\s'/\\]+){2,}'?")  # absolute-looking paths
VIEW_SIDE = 768  # long side of the overlay pictures: crisp labels on small and large studies


@dataclass
class Study:
    """The image one session is looking at (kept in that session's ``gr.State`` only)."""

    image: ImageData
    label: str  # pseudonym + modality + size; never a file name
    lo: float  # data range, for the window sliders
    hi: float
    centre: float  # the file's own window (or the data range)
    width: float


def _study(image: ImageData, label: str) -> Study:
    if image.meta.frames > 1:
        image = image.frame(image.meta.frames // 2)
    finite = image.pixels[np.isfinite(image.pixels)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    w = image.meta.windows[0] if image.meta.windows else None
    centre, width = (w.center, w.width) if w else ((lo + hi) / 2, hi - lo)
    return Study(image, label, lo, hi, float(centre), float(max(width, 1.0)))


def load_upload(path: str | os.PathLike[str] | None, max_bytes: int) -> Study:
    """Read an uploaded file; any problem is a one-line :class:`RadLensError`."""
    if not path:
        raise RadLensError("no file received: choose a DICOM, PNG or JPEG file")
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in UPLOAD_SUFFIXES and not suffix[1:].isdigit():  # DICOM often ends ".1"
        raise RadLensError(f"unsupported file type '{suffix}': upload DICOM, PNG or JPEG")
    size = p.stat().st_size if p.is_file() else 0
    if size > max_bytes:
        raise RadLensError(f"file too large ({size / 2**20:.1f} MB): the limit is "
                           f"{max_bytes / 2**20:.0f} MB")
    if size == 0:
        raise RadLensError("the file is empty: upload a DICOM, PNG or JPEG image")
    try:
        image = read_image(p)
    except ImageReadError as exc:  # server paths stay out of the page
        reason = _PATHS.sub("file", exc.reason.replace(str(p), "file"))
        raise RadLensError(f"cannot read the upload: {reason}") from None
    except RadLensError:
        raise
    except Exception as exc:  # a decoder bug must not take the session down
        logger.warning("upload decode failed: %s", type(exc).__name__)
        raise RadLensError(f"cannot read the upload ({type(exc).__name__})") from None
    if image.meta.frames > 1:  # the middle frame is the study; its size is what is checked
        image = image.frame(image.meta.frames // 2)  # ((F, H, W)[:2] refused < 8 frames)
    if image.pixels.ndim == 1:
        raise RadLensError("the upload is not a 2-D image")
    problem = image.content_problem()  # blank or tiny: said now, not at the first button
    if problem:
        raise RadLensError(f"cannot use the upload: {problem}")
    m = image.meta
    label = " · ".join(str(v) for v in (m.instance_pseudonym or "upload", m.modality or
                                        m.source_format.upper(), f"{m.columns}×{m.rows}") if v)
    return _study(image, label)


def discard_upload(path: str | os.PathLike[str] | None, root: str | os.PathLike[str]) -> None:
    """Delete an upload once it has been read, and its folder when that is left empty.

    Gradio keeps each upload as ``root/<sha256>/<original file name>``, and file names of
    studies often hold a patient's name or ID; the study lives on in the session's memory only.
    Paths outside ``root`` (Gradio's upload folder) are left alone. Never raises.
    """
    if not path:
        return
    base = Path(root).resolve()
    p = Path(path).resolve()
    if base not in p.parents:
        return
    try:
        p.unlink(missing_ok=True)
        if p.parent != base and not any(p.parent.iterdir()):
            p.parent.rmdir()
    except OSError as exc:  # no file name in the log: it may be identifying
        logger.warning("could not delete an upload after reading it: %s", exc.strerror)


def example_choices(engine: Engine, n: int = 24) -> list[tuple[str, int]]:
    """Dropdown choices ``(label, id)`` for indexed studies with a thumbnail; labelled first."""
    ids = engine.index.catalog.filter_ids("image")[: max(n * 4, n)]
    items = [it for it in engine.index.catalog.get_many(ids.tolist()) if it and it.thumbnail]
    items.sort(key=lambda it: (not (it.extra or {}).get("labels"), it.id))
    return [(f"#{it.id} · {short_meta(it)}", int(it.id)) for it in items[:n]]


def load_example(engine: Engine, item_id: int | None) -> Study:
    """An indexed study, read from the thumbnail the index owns (never the original file)."""
    if item_id is None:
        raise RadLensError("no example chosen")
    item = engine.index.catalog.get(int(item_id))
    path = engine.item_path(item) if item else None
    if item is None or path is None:
        raise RadLensError(f"study #{item_id} has no thumbnail in the index")
    return _study(read_image(path), f"#{item.id} · {short_meta(item)}")


def window_spec(preset: str, centre: float, width: float) -> str | tuple[float, float] | None:
    """Dropdown + sliders -> a :func:`vlm.io.render` window."""
    if preset == FILE_WINDOW or not preset:
        return None
    if preset in WINDOW_PRESETS:
        return preset
    return (float(centre), float(max(width, 1.0)))


def preset_values(study: Study | None, preset: str) -> tuple[float, float]:
    """Centre and width the sliders show for a preset."""
    if preset in WINDOW_PRESETS:
        return WINDOW_PRESETS[preset]
    if study is None:
        return 0.0, 1.0
    return study.centre, study.width


def display(study: Study, preset: str = FILE_WINDOW, centre: float = 0.0,
            width: float = 1.0) -> np.ndarray:
    """The study windowed for display, (H, W, 3) uint8."""
    return rd.to_rgb(window_render(study.image, window=window_spec(preset, centre, width)))


def classify(engine: Engine, study: Study, prompts: PromptSet | None) -> dict[str, float]:
    """Finding probabilities, highest first."""
    probs = engine.classify(study.image, prompts)
    return dict(sorted(probs.items(), key=lambda kv: -kv[1]))


def probability_table(probs: dict[str, float]) -> str:
    """Markdown table of finding probabilities (the chart's numbers, for reading and copying)."""
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in probs.items())
    return f"| finding | probability |\n|---|---|\n{rows}"


def add_finding(prompts: PromptSet, name: str, positive: str, negative: str) -> PromptSet:
    """A copy of ``prompts`` with a user finding (phrases one per line or ``;``-separated)."""
    def phrases(text: str) -> list[str]:
        return [p.strip() for p in (text or "").replace(";", "\n").splitlines() if p.strip()]

    key = "_".join((name or "").strip().lower().split())
    if not key:
        raise RadLensError("give the finding a name, e.g. 'pleural effusion'")
    if len(key) > 40 or len(prompts.findings) >= 40:
        raise RadLensError("too many or too long findings: keep names under 40 characters")
    return prompts.with_finding(key, phrases(positive), phrases(negative))


def prompt_summary(prompts: PromptSet) -> str:
    """Markdown list of the session's findings and their phrasing."""
    lines = [f"- **{k.replace('_', ' ')}**: {' / '.join(v.positive[:2])} ⟷ "
             f"{' / '.join(v.negative[:2])}" for k, v in prompts.findings.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- catalog display
def short_meta(item: CatalogItem) -> str:
    """``CR PA 2000 · pleural effusion`` (allow-listed fields only)."""
    parts = " ".join(str(v) for v in (item.modality, item.view, item.year) if v)
    labels = ", ".join(x.replace("_", " ") for x in (item.extra or {}).get("labels") or [])
    return " · ".join(p for p in (parts or "study", labels) if p)


def describe_item(item: CatalogItem | None, score: float | None = None) -> str:
    """De-identified Markdown card of a catalog row: pseudonyms, metadata, labels, report."""
    if item is None:
        return "_catalog row missing_"
    extra = item.extra or {}
    rows = [("study", f"`{item.study}`" if item.study else None),
            ("score", f"{score:.3f}" if score is not None else None),
            ("modality", item.modality), ("body part", item.body_part), ("view", item.view),
            ("year", item.year), ("size", f"{item.cols}×{item.rows}" if item.rows else None),
            ("labels", ", ".join(extra.get("labels") or []) or None)]
    out = " · ".join(f"**{k}** {v}" for k, v in rows if v is not None)
    if extra.get("report"):
        out += f"\n\n**Report**\n\n> {extra['report']}"
    return out


def facet_values(engine: Engine, column: str) -> list[str]:
    """Distinct values of an allow-listed catalog column among indexed images."""
    if column not in ("modality", "view", "body_part", "year"):
        raise ValueError(column)
    return [str(v) for v in engine.index.catalog.distinct(column, collection="image")]


# ---------------------------------------------------------------------------- search
def search_text(engine: Engine, text: str, k: int, modality: str | None = None,
                view: str | None = None, year_min: str | float | None = None,
                year_max: str | float | None = None, contrast: bool = True) -> list[Result]:
    """Report text -> top-k results (filters: "any"/empty means no filter). ``contrast``:
    rank against a normal study (:data:`index.engine.NORMAL_REFERENCE`), else plain cosine."""
    def opt(v: str | None) -> str | None:
        return None if v in (None, "", "any") else v

    def year(v: str | float | None) -> int | None:
        if v in (None, "", "any", 0) or (isinstance(v, float) and np.isnan(v)):
            return None
        try:
            return int(v)
        except ValueError:
            raise RadLensError(f"year '{v}' is not a number") from None

    if len((text or "").strip()) > 2000:
        raise RadLensError("query too long: keep it under 2000 characters")
    return engine.search_text(text or "", k=int(k), contrast=NORMAL_REFERENCE if contrast
                              else None, modality=opt(modality), view=opt(view),
                              year_min=year(year_min), year_max=year(year_max))


def caption(result: Result) -> str:
    return (f"{result.score:.3f} · {short_meta(result.item)}" if result.item
            else f"{result.score:.3f}")


def gallery(engine: Engine, results: Sequence[Result]) -> list[tuple[str, str]]:
    """(thumbnail path, caption) for results whose thumbnail the index owns."""
    out = []
    for r in results:
        path = engine.item_path(r.item) if r.item else None
        if path is not None:
            out.append((str(path), caption(r)))
    return out


def _thumb(engine: Engine, item: CatalogItem | None, side: int = VIEW_SIDE
           ) -> tuple[ImageData, np.ndarray, float, float]:
    """An item's thumbnail (the image and a ``side``-px RGB canvas of it) and the x/y scale from
    the item's original pixels to that canvas."""
    path = engine.item_path(item) if item else None
    if item is None or path is None:
        raise RadLensError("this result has no thumbnail in the index")
    image = read_image(path)
    rgb = rd.resize_long_side(rd.to_rgb(window_render(image)), side)
    sx = rgb.shape[1] / item.cols if item.cols else 1.0
    sy = rgb.shape[0] / item.rows if item.rows else 1.0
    return image, rgb, sx, sy


def _scaled(box: Sequence[float], sx: float, sy: float) -> list[float]:
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def result_view(engine: Engine, result: Result, query: str,
                opacity: float = 0.45) -> tuple[np.ndarray, str]:
    """A selected search hit, large: the query phrase's heatmap and box over it, and its card."""
    image, rgb, _, _ = _thumb(engine, result.item)
    if query.strip():
        (g,) = engine.ground(image, [query])
        s = rgb.shape[1] / image.pixels.shape[1]
        rgb = rd.overlay_heatmap(rgb, g.heatmap, opacity=opacity)
        rgb = rd.draw_boxes(rgb, [_scaled(g.box, s, s)], [query[:40]], [rd.PALETTE[1]])
    return rgb, describe_item(result.item, result.score)


def similar(engine: Engine, study: Study, k: int) -> tuple[np.ndarray, list[tuple[np.ndarray,
                                                                                   str]]]:
    """Query image with its matched regions, and the top-k similar studies with theirs."""
    results = engine.search_image(study.image, k=int(k))
    query = rd.resize_long_side(display(study), VIEW_SIDE)
    qs = query.shape[1] / study.image.pixels.shape[1]
    qboxes, qlabels, qcols = [], [], []
    cards = []
    for i, r in enumerate(results):
        try:
            _, rgb, sx, sy = _thumb(engine, r.item, side=320)
        except RadLensError:
            continue
        colours = [rd.colour_for(i)] * len(r.regions)
        boxes = [_scaled(reg["box"], sx, sy) for reg in r.regions]
        rgb = rd.draw_boxes(rgb, boxes, [f"{reg['score']:.2f}" for reg in r.regions], colours)
        cards.append((rgb, caption(r)))
        for reg in r.regions[:1]:
            qboxes.append(_scaled(reg["query_box"], qs, qs))
            qlabels.append(f"→{i + 1}")
            qcols.append(rd.colour_for(i))
    return rd.draw_boxes(query, qboxes, qlabels, qcols), cards


# ---------------------------------------------------------------------------- grounding
@dataclass
class Grounded:
    phrase: str
    heatmap: np.ndarray
    box: tuple[int, int, int, int]


GROUNDING_NOTE = ("<br><small>Each map shows which pixels move the image's embedding towards "
                  "the phrase and away from a normal study (gradient grounding); a research "
                  "aid, not a detection.</small>")


def ground(engine: Engine, study: Study, phrases_text: str, max_phrases: int = 8
           ) -> list[Grounded]:
    """One heatmap and box per phrase (one phrase per line)."""
    phrases = [p.strip() for p in (phrases_text or "").splitlines() if p.strip()]
    if not phrases:
        raise RadLensError("type one or more phrases, one per line")
    if len(phrases) > max_phrases:
        raise RadLensError(f"too many phrases ({len(phrases)}): at most {max_phrases}")
    return [Grounded(p, g.heatmap, (int(g.box[0]), int(g.box[1]), int(g.box[2]), int(g.box[3])))
            for p, g in zip(phrases, engine.ground(study.image, phrases), strict=True)]


def grounding_overlay(base: np.ndarray, grounded: Sequence[Grounded], opacity: float
                      ) -> tuple[np.ndarray, str]:
    """Blend every phrase's heatmap in its own colour, draw the boxes; Markdown legend.

    ``base`` is the windowed study at its original size; the result is ``VIEW_SIDE`` px long.
    """
    rgb = rd.resize_long_side(base, VIEW_SIDE)
    s = rgb.shape[1] / base.shape[1]
    for i, g in enumerate(grounded):
        rgb = rd.overlay_heatmap(rgb, g.heatmap, opacity=opacity / max(1, len(grounded)) ** 0.5,
                                 colour=rd.colour_for(i))
    rgb = rd.draw_boxes(rgb, [_scaled(g.box, s, s) for g in grounded],
                        [g.phrase[:30] for g in grounded],
                        [rd.colour_for(i) for i in range(len(grounded))])
    legend = " ".join(
        f"<span style='color:rgb{rd.colour_for(i)}'>■</span> {g.phrase}"
        for i, g in enumerate(grounded))
    return rgb, legend + GROUNDING_NOTE


# ---------------------------------------------------------------------------- index panel
def index_summary(info: dict[str, Any]) -> str:
    """Markdown statistics from :meth:`Engine.info` (no filesystem paths)."""
    lines = [f"**model** `{info.get('model_name')}` (loaded `{info.get('model_loaded')}`, "
             f"config `{info.get('config_hash')}`) · **dim** {info.get('dim')} · "
             f"**metric** {info.get('metric')} · **generation** {info.get('generation')} · "
             f"**catalog rows** {info.get('catalog_rows')} · "
             f"**on disk** {int(info.get('bytes_on_disk') or 0) / 2**20:.1f} MB",
             "", "| collection | vectors | factory | dim | deleted |", "|---|---|---|---|---|"]
    for name, c in (info.get("collections") or {}).items():
        lines.append(f"| {name} | {c.get('count')} | `{c.get('factory')}`"
                     f"{' (auto)' if c.get('auto') else ''} | {c.get('dim')} | {c.get('dead')} |")
    return "\n".join(lines)


def check_source(folder: str, roots: Sequence[str | os.PathLike[str]] | None) -> Path | str:
    """A folder to ingest, which must lie under one of the server's allowed ingest roots; or a
    DICOMweb URL whose service root is one of them (the query string may differ: a study
    date range, say). The browser never names a server the operator did not allow."""
    from index.dicomweb import DicomWeb, is_dicomweb

    if not roots:
        raise RadLensError("building from the app is off: start the server with an ingest root "
                           "(serve(..., ingest_roots=[...]))")
    if not (folder or "").strip():
        raise RadLensError("type the folder to index")
    servers = [DicomWeb(str(r), environ={}).root for r in roots if is_dicomweb(str(r))]
    if is_dicomweb(folder):
        if DicomWeb(folder, environ={}).root not in servers:
            raise RadLensError("that DICOMweb server is not an allowed ingest root")
        return folder.strip()
    path = Path(folder).expanduser().resolve()
    allowed = [Path(r).expanduser().resolve() for r in roots if not is_dicomweb(str(r))]
    if not any(path == r or r in path.parents for r in allowed):
        raise RadLensError("that folder is outside the allowed ingest roots")
    if not path.exists():
        raise RadLensError("no such folder under the ingest roots")
    return path


def failure_label(path: str, src: Path | str) -> str:
    """How the app names a failed file: relative to the folder built from; a DICOMweb
    instance or study by the pseudonyms of its UIDs (the catalog's), never the UIDs."""
    from index.dicomweb import is_dicomweb
    from vlm.io.deid import default_pseudonymizer

    if isinstance(src, str) and is_dicomweb(src):
        pseudo = default_pseudonymizer()
        kinds = {"studies": "st", "series": "se", "instances": "im"}
        parts = ["studies", *path.split("/studies/", 1)[-1].split("/")]
        out = []
        for key, uid in zip(parts[::2], parts[1::2], strict=False):
            out += [key, pseudo(kinds.get(key, "uid"), uid) or "?"]
        return "/".join(out)
    return os.path.relpath(path, src) if os.path.isabs(path) else path


def build_index(engine: Engine, folder: str, roots: Sequence[str | os.PathLike[str]] | None,
                ingest_fn: Callable[..., Any] | None = None) -> tuple[str, list[list[str]]]:
    """Extend the engine's index from ``folder`` (or an allowed DICOMweb server); returns a
    summary and the failures table."""
    from index.ingest import ingest

    src = check_source(folder, roots)
    model_path = engine.index.manifest.get("preprocessing", {}).get("model_path")
    report = (ingest_fn or ingest)(engine.encoder, src, engine.index.path, progress=True,
                                   workers=0, model_path=model_path)
    engine.index.reload()
    failures = [[failure_label(f["path"], src), f["reason"]] for f in report.failed]
    summary = (f"added **{report.added}** images ({report.regions} regions), "
               f"{report.already_indexed} already indexed, **{len(report.failed)} failed** · "
               f"{report.seconds:.1f} s, {report.images_per_s:.1f} images/s")
    return summary, failures


# ---------------------------------------------------------------------------- volumes
VOLUME_UPLOAD_SUFFIXES = (".nii", ".nii.gz", ".zip")
ZIP_MAX_FILES = 2048
VOLUME_VIEW_SIDE = 512  # long side of the slice viewer's picture
VOLUME_WINDOW = "abdomen"  # soft tissue, as the thumbnails


@dataclass
class VolumeStudy:
    """The volume one session is looking at (kept in that session's ``gr.State`` only)."""

    hu: np.ndarray  # (Z', Y', X') HU for the viewer (the index's stack, or the upload)
    z_index: np.ndarray  # (Z',) original slice number of each viewer slice
    label: str  # catalog id or pseudonym + shape; never a file name
    query: VolumeQuery
    salient: list[tuple[int, float]]  # (original slice, score), best first
    score_kind: str


def _volume_search(engine: Engine) -> VolumeSearch:
    if engine.volumes is None:
        raise RadLensError("this index has no volume collection: build it with "
                           "'radlens index build --volume-model ...'")
    return engine.volumes


def volume_labels(item: CatalogItem | None) -> list[str]:
    """An indexed volume's labels, readable (``liver lesion``)."""
    return [x.replace("_", " ") for x in ((item.extra or {}).get("labels") or [])] if item else []


def volume_meta(item: CatalogItem) -> str:
    """``CT 2019 · 48×48×48 · liver lesion, kidney lesion`` (allow-listed fields only)."""
    shape = "×".join(str(v) for v in (item.extra or {}).get("shape") or [])
    parts = " ".join(str(v) for v in (item.modality, item.year, shape) if v)
    return " · ".join(p for p in (parts or "volume", ", ".join(volume_labels(item))) if p)


def volume_choices(engine: Engine, n: int = 48) -> list[tuple[str, int]]:
    """Dropdown choices ``(label, id)`` for indexed volumes (none without a volume collection)."""
    if engine.volumes is None:
        return []
    ids = engine.index.catalog.filter_ids(VOLUME)[:n]
    return [(f"#{it.id} · {volume_meta(it)}", int(it.id))
            for it in engine.index.catalog.get_many(ids.tolist()) if it]


def load_volume_item(engine: Engine, item_id: int | None) -> VolumeStudy:
    """An indexed volume: its stored vector, its slice stack and salient slices from the index."""
    if item_id is None:
        raise RadLensError("no volume chosen")
    query = _volume_search(engine).query_item(int(item_id))
    item = query.item
    if item is None:
        raise RadLensError(f"volume #{item_id} has no catalog row")
    hu, z_index = load_stack(engine.index.path, item)
    extra = item.extra or {}
    salient = [(int(s["k"]), float(s["score"])) for s in extra.get("salient") or []]
    return VolumeStudy(hu, z_index, f"#{item.id} · {volume_meta(item)}", query, salient,
                       str(extra.get("score_kind") or SCORE_DISTINCT))


def _read_volume_upload(path: Path) -> tuple[Volume, str]:
    """A NIfTI file, or the one DICOM series in a zip (extracted flat to a private temp dir)."""
    import tempfile
    import zipfile

    from index.volume_search import query_source
    from index.volumes import content_hash, read_source

    if not path.name.lower().endswith(".zip"):
        src = query_source(path)
        return read_source(src), content_hash(src)
    try:
        with zipfile.ZipFile(path) as zf, tempfile.TemporaryDirectory() as tmp:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if not members:
                raise RadLensError("the zip is empty: zip the files of one DICOM series")
            if len(members) > ZIP_MAX_FILES:
                raise RadLensError(f"the zip holds {len(members)} files: at most "
                                   f"{ZIP_MAX_FILES}")
            budget = 4 * max(path.stat().st_size, 1) + 2**26  # refuse zip bombs
            for i, m in enumerate(members):
                budget -= m.file_size
                if budget < 0:
                    raise RadLensError("the zip expands to too much data")
                (Path(tmp) / f"{i:05d}").write_bytes(zf.read(m))  # flat names: no path tricks
            src = query_source(tmp)
            return read_source(src), content_hash(src)
    except zipfile.BadZipFile:
        raise RadLensError("the .zip file is damaged or not a zip") from None


def load_volume_upload(engine: Engine, path: str | os.PathLike[str] | None,
                       max_bytes: int) -> VolumeStudy:
    """Read an uploaded NIfTI or zipped DICOM series and encode it; one-line errors."""
    if not path:
        raise RadLensError("no file received: choose a NIfTI file or a .zip of a DICOM series")
    p = Path(path)
    if not p.name.lower().endswith(VOLUME_UPLOAD_SUFFIXES):
        raise RadLensError(f"unsupported file type '{''.join(p.suffixes[-2:]) or p.name}': "
                           "upload .nii, .nii.gz or a .zip of one DICOM series")
    size = p.stat().st_size if p.is_file() else 0
    if size == 0:
        raise RadLensError("the file is empty: upload a NIfTI file or a zipped DICOM series")
    if size > max_bytes:
        raise RadLensError(f"file too large ({size / 2**20:.1f} MB): the limit is "
                           f"{max_bytes / 2**20:.0f} MB")
    vs = _volume_search(engine)
    try:
        volume, digest = _read_volume_upload(p)
        query = vs.query_volume(volume, digest)
    except ImageReadError as exc:  # server paths stay out of the page
        reason = _PATHS.sub("file", exc.reason.replace(str(p), "file"))
        raise RadLensError(f"cannot read the upload: {reason}") from None
    except RadLensError as exc:
        raise RadLensError(_PATHS.sub("file", str(exc).replace(str(p), "file"))) from None
    except Exception as exc:  # a reader bug must not take the session down
        logger.warning("volume upload failed: %s", type(exc).__name__)
        raise RadLensError(f"cannot read the upload ({type(exc).__name__})") from None
    assert query.encoding is not None
    stack, z_index = preview_stack(volume.array)
    m = volume.meta
    shape = "×".join(str(v) for v in volume.shape)
    label = " · ".join(str(v) for v in (m.series_pseudonym or "upload",
                                        m.modality or m.source_format, shape) if v)
    return VolumeStudy(stack.astype(np.float32), z_index, label, query,
                       query.encoding.top_slices(SALIENT_SLICES), query.encoding.score_kind)


def _view_index(study: VolumeStudy, k: int) -> int:
    """The viewer slice nearest original slice ``k``."""
    return int(np.argmin(np.abs(study.z_index - int(k))))


def volume_slice(study: VolumeStudy, index: int | float, preset: str = VOLUME_WINDOW,
                 side: int = VOLUME_VIEW_SIDE) -> np.ndarray:
    """Viewer slice ``index`` windowed with a CT preset, (H, W, 3) uint8."""
    i = int(np.clip(round(float(index)), 0, study.hu.shape[0] - 1))
    if preset not in WINDOW_PRESETS:
        raise RadLensError(f"unknown window '{preset}': use one of {', '.join(WINDOW_PRESETS)}")
    return rd.resize_long_side(window_render(study.hu[i].astype(np.float32), window=preset),
                               side)


def volume_strip(study: VolumeStudy, preset: str = VOLUME_WINDOW, side: int = 192
                 ) -> list[tuple[np.ndarray, str]]:
    """The attention-slice strip: the most salient slices with their scores (what the scores
    mean is the strip's label, :func:`strip_label`)."""
    return [(volume_slice(study, _view_index(study, k), preset, side),
             f"slice {k} · {score:.2g}") for k, score in study.salient]


def strip_slice(study: VolumeStudy, position: int) -> int:
    """The viewer slice of the strip's ``position``-th picture (clicking it jumps there)."""
    k, _ = study.salient[int(position)]
    return _view_index(study, k)


def strip_label(study: VolumeStudy | None) -> str:
    """What the strip shows (learned attention, or the documented stand-in)."""
    kind = study.score_kind if study is not None else SCORE_DISTINCT
    return f"Attention slices · {SCORE_MEANING.get(kind, kind)}"


def predicted_findings(item: CatalogItem | None, threshold: float = 0.5) -> list[str]:
    """A lesion model's findings at or above ``threshold``, best first (``liver 0.91``)."""
    found = ((item.extra or {}).get("findings") or {}) if item else {}
    ranked = sorted(((float(v), str(k)) for k, v in found.items() if float(v) >= threshold),
                    reverse=True)
    return [f"{k.replace('_', ' ')} {v:.2f}" for v, k in ranked]


def volume_caption(hit: Hit) -> str:
    """``0.962 · liver lesion, kidney lesion`` (labels first: they are what a reader scans for;
    unlabelled volumes show modality, year and shape), then what a lesion model found
    (``model: liver 0.91``)."""
    if hit.item is None:
        return f"{hit.score:.3f}"
    text = f"{hit.score:.3f} · {', '.join(volume_labels(hit.item)) or volume_meta(hit.item)}"
    found = predicted_findings(hit.item)
    return f"{text} · model: {', '.join(found)}" if found else text


def similar_volumes(engine: Engine, study: VolumeStudy, k: int
                    ) -> tuple[list[tuple[str, str]], list[Hit]]:
    """Top-k similar indexed volumes (the query's own row left out): gallery items + hits."""
    hits = _volume_search(engine).search(study.query, k=int(k))
    items = []
    for hit in hits:
        path = engine.item_path(hit.item) if hit.item else None
        if path is not None:
            items.append((str(path), volume_caption(hit)))
    return items, hits


def volume_card(hit: Hit | None) -> str:
    """De-identified Markdown card of a similar volume (allow-listed fields only)."""
    if hit is None or hit.item is None:
        return "_catalog row missing_"
    it, extra = hit.item, hit.item.extra or {}
    rows = [("volume", f"#{it.id}"), ("study", f"`{it.study}`" if it.study else None),
            ("score", f"{hit.score:.3f}"), ("modality", it.modality), ("year", it.year),
            ("shape", "×".join(str(v) for v in extra.get("shape") or []) or None),
            ("spacing mm", " × ".join(f"{v:g}" for v in extra.get("spacing") or []) or None),
            ("labels", ", ".join(volume_labels(it)) or None)]
    return " · ".join(f"**{k}** {v}" for k, v in rows if v is not None)
