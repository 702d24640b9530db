"""Generate the PhantomCXR data set: real IU report text and MeSH labels, synthetic pixels.

Layout under ``out_dir``::

    dicom/<patient_id>/<study_id>.dcm   one frontal DX/CR image per rendered report
    masks/<image_id>__<k>.png           0/255 mask of finding k of that study
    manifest.jsonl                      one row per rendered study (see data_cards/phantom_cxr.md)
    skipped.jsonl                       every report not rendered, with its reason
    summary.json                        counts, timing

Generating into a folder used before first removes what an earlier run wrote there (the files
above by their names, ``contact_sheet.png`` and the decoded-image caches ``.cache/images-*``),
so no study, mask or cached image of another size, seed or count survives; other files are left
alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm.data.iu_reports import Report, frontal_image, load_reports, map_mesh_terms
from vlm.data.manifest import (
    prepare_output,
    remove_generated,
    split_for,
    worker_count,
    write_jsonl,
)
from vlm.data.phantom_cxr.anatomy import load_lung_masks
from vlm.data.phantom_cxr.study import render_study
from vlm.errors import RadLensError
from vlm.io.dicom_write import build_dataset, save_dataset, uid_from

logger = logging.getLogger(__name__)

GENERATOR = "radlens-phantom-cxr-v1"
DATASET_NAME = "phantom_cxr"
#: the folders and files the generator (and CXRDataset's cache) write, temporary files included
_PATIENT_DIR = re.compile(r"IU-PT-[0-9A-F]{10}")
_STUDY_FILE = re.compile(r"\.?IU-ST-[0-9A-F]{10}\.dcm(\.tmp)?")
_MASK_FILE = re.compile(r"CXR\d+(_\d+)?_IM-\d{4}(-\d+)+__\d+\.png")
_CACHE_FILE = re.compile(r"\.?images-[0-9a-f]{16}(\.\d+\.tmp\.npy|\.npy|\.skipped\.json"
                         r"(\.\d+\.tmp)?)")
_TOP_FILES = ("manifest.jsonl", "skipped.jsonl", "summary.json", ".manifest.jsonl.tmp",
              ".skipped.jsonl.tmp", "contact_sheet.png")


def pseudonym(prefix: str, uid: str) -> str:
    """Stable pseudonymous id, e.g. ``IU-PT-3F2A9C01D4``, derived from the report uid."""
    digest = hashlib.sha256(f"{GENERATOR}:{prefix}:{uid}".encode()).hexdigest()[:10].upper()
    return f"IU-{prefix}-{digest}"


def skip_reason(report: Report) -> str | None:
    """Why a report cannot be rendered (None if it can)."""
    if not report.image_ids:
        return "no image in the report"
    if frontal_image(report) is None:
        return "no frontal image (only lateral views)"
    if not report.findings and not report.impression:
        return "no findings or impression text"
    return None


def _render_one(args: tuple[Report, str, int, int]) -> dict[str, Any]:
    report, out_dir, size, seed = args
    out = Path(out_dir)
    picked = frontal_image(report)
    assert picked is not None
    image_id, view = picked
    findings = map_mesh_terms(report.mesh_major)
    st = render_study(report.uid, findings, size=size, seed=seed, view=view)
    acq = st.acq
    patient_id = pseudonym("PT", report.uid)
    study_id = pseudonym("ST", report.uid)
    study_uid = uid_from(GENERATOR, seed, report.uid, "study")
    series_uid = uid_from(GENERATOR, seed, report.uid, "series")
    sop_uid = uid_from(GENERATOR, seed, report.uid, "image")
    top = 2**acq.bits_stored - 1
    ds = build_dataset(
        st.pixels, modality=acq.modality, patient_id=patient_id, study_uid=study_uid,
        series_uid=series_uid, sop_uid=sop_uid,
        pixel_spacing=(acq.pixel_spacing, acq.pixel_spacing), photometric=acq.photometric,
        bits_stored=acq.bits_stored, window=(top / 2.0, float(top)),
        extra={"ViewPosition": acq.view, "BodyPartExamined": "CHEST", "StudyID": study_id[-8:],
               "AccessionNumber": study_id[-10:], "PatientOrientation": ["L", "F"],
               "SeriesDescription": "PhantomCXR synthetic frontal chest"},
    )
    rel = Path("dicom") / patient_id / f"{study_id}.dcm"
    save_dataset(ds, out / rel)
    rows = []
    for k, (f, mask) in enumerate(zip(findings, st.masks, strict=True)):
        mrel = Path("masks") / f"{image_id}__{k}.png"
        (out / mrel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((mask * 255).astype(np.uint8)).save(out / mrel, compress_level=1)
        rows.append({"finding": f.finding, "side": f.side, "zone": f.zone,
                     "severity": f.severity, "multiple": f.multiple, "term": f.term,
                     "box": st.boxes[k], "mask": mrel.as_posix(),
                     "contrast": st.contrasts[k], "peak_contrast": st.peaks[k],
                     "saturated": st.saturated[k]})
    return {
        "id": study_id, "report_uid": report.uid, "image_id": image_id,
        "patient_id": patient_id, "study_uid": study_uid, "series_uid": series_uid,
        "sop_uid": sop_uid, "file": rel.as_posix(), "split": split_for(patient_id, seed),
        "comparison": report.comparison, "indication": report.indication,
        "findings_text": report.findings, "impression": report.impression,
        "mesh_major": list(report.mesh_major), "labels": sorted({f.finding for f in findings}),
        "findings": rows, "size": size, "pixel_spacing": [acq.pixel_spacing] * 2,
        "photometric": acq.photometric, "bits_stored": acq.bits_stored,
        "modality": acq.modality, "view": acq.view, "view_from_source": bool(view),
        "lung_mask": st.lung_mask_name, "seed": seed,
    }


#: image sides ``generate_phantom_cxr`` renders: below 64 pixels the anatomy is a few pixels
#: wide; a real radiograph is about 3,000 pixels on a side
MIN_SIZE, MAX_SIZE = 64, 4096


def generate_phantom_cxr(out_dir: str | os.PathLike[str], n: int | None = None,
                         size: int = 512, seed: int = 0, workers: int | None = None,
                         *, report_ids: Iterable[str] | None = None) -> dict[str, Any]:
    """Render PhantomCXR studies (one per renderable IU report) into ``out_dir``.

    Args:
        out_dir: output folder (created).
        n: render at most this many renderable reports (archive order); the others are listed
            in ``skipped.jsonl`` as "not selected".
        size: rows = columns of every image.
        seed: changes anatomy, exposure and header draws; same seed -> identical output.
        workers: processes (default: all CPU cores). Output does not depend on it.
        report_ids: restrict to these report uids (e.g. ``["CXR1", "CXR10"]``).

    Returns:
        The summary also written to ``summary.json``.
    """
    if not MIN_SIZE <= int(size) <= MAX_SIZE:  # 0 divided by zero; 100000 asked for 10 GB
        raise RadLensError(f"the PhantomCXR image size must be {MIN_SIZE} to {MAX_SIZE} "
                           f"pixels, got {size}")
    worker_count(workers, 1)  # a negative --workers: refused before any file is touched
    if int(seed) < 0:  # numpy's SeedSequence refused it deep in the first worker
        raise RadLensError(f"the PhantomCXR seed must be a non-negative integer, got {seed}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    removed = prepare_output(out, "PhantomCXR", clear_previous_run)
    if removed:
        logger.info("PhantomCXR: removed %d files of an earlier run in %s", removed, out)
    wanted = set(report_ids) if report_ids is not None else None
    todo: list[Report] = []
    skipped: list[dict[str, Any]] = []
    for report in load_reports():
        if wanted is not None and report.uid not in wanted:
            continue
        reason = skip_reason(report)
        if reason is None and n is not None and len(todo) >= n:
            reason = f"not selected (n={n})"
        if reason is None:
            todo.append(report)
        else:
            skipped.append({"report_uid": report.uid, "reason": reason,
                            "labels": report.labels})
    load_lung_masks()  # once in the parent; forked workers inherit it
    workers = worker_count(workers, len(todo))
    jobs = [(r, str(out), size, seed) for r in todo]
    if workers == 1:
        rows = [_render_one(j) for j in jobs]
    else:
        # fork shares the parsed reports and lung masks; elsewhere workers reload them
        # (cached). Only from a single-threaded process: a fork copies the locks other threads
        # hold (a web server's, a logging handler's) and the child can wait on them forever,
        # as the whole test session did after a test had launched the app in a thread.
        single = threading.active_count() == 1
        method = "fork" if single and "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        with ctx.Pool(workers) as pool:
            rows = list(pool.imap(_render_one, jobs, chunksize=8))
    write_jsonl(out / "manifest.jsonl", rows)
    write_jsonl(out / "skipped.jsonl", skipped)
    seconds = time.perf_counter() - t0
    labels = Counter(label for row in rows for label in row["labels"])
    summary = {
        "dataset": DATASET_NAME, "rendered": len(rows), "skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "labels": dict(sorted(labels.items())),
        "normal_or_unmapped": sum(1 for row in rows if not row["labels"]),
        "splits": dict(Counter(row["split"] for row in rows)),
        "size": size, "seed": seed, "workers": workers, "seconds": round(seconds, 2),
        "images_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    logger.info("PhantomCXR: %d rendered, %d skipped in %.1f s", len(rows), len(skipped),
                seconds)
    return summary


def clear_previous_run(root: Path) -> int:
    """Remove what an earlier generation wrote into ``root``: every study DICOM and finding mask
    named as this generator names them (``dicom/IU-PT-*/IU-ST-*.dcm``, ``masks/<IU image
    id>__<k>.png``; a patient folder only once empty), CXRDataset's decoded images of them
    (``.cache/images-*``) and, when ``root`` holds a PhantomCXR manifest or summary, those, the
    skipped list and the contact sheet (the manifest first, so a folder left half-regenerated
    is not taken for a data set). Returns how many files went."""
    return remove_generated(root, _TOP_FILES if _is_phantom_folder(root) else (),
                            _PATIENT_DIR, _STUDY_FILE,
                            (("masks", _MASK_FILE), (".cache", _CACHE_FILE)))


def _is_phantom_folder(root: Path) -> bool:
    """Whether ``root``'s summary or first manifest row says PhantomCXR wrote it (summaries
    before ``dataset`` was recorded are known by their fields)."""
    try:
        summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and (summary.get("dataset") == DATASET_NAME or {
            "rendered", "skipped_by_reason", "normal_or_unmapped"} <= summary.keys()):
        return True
    try:
        with open(root / "manifest.jsonl", encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError):
        return False
    return (isinstance(first, dict) and isinstance(first.get("file"), str)
            and "report_uid" in first and "lung_mask" in first
            and re.fullmatch(r"dicom/IU-PT-[0-9A-F]{10}/IU-ST-[0-9A-F]{10}\.dcm", first["file"])
            is not None)
