"""PhantomCT: a synthetic chest-abdomen CT proving ground for CLEAR and DrasCLR.

Layout written under ``out_dir``::

    dicom/<volume_id>/<k:04d>.dcm        one CT slice per file, k = 0 most inferior
    nifti/<volume_id>.nii.gz             int16 HU, RAS affine, (i, j, k) array order
    masks/<volume_id>_lesions.nii.gz     uint8, label = lesion index + 1
    masks/<volume_id>_lung.nii.gz        uint8 lung mask (recompute the emphysema score)
    manifest.jsonl                       one row per volume (byte-stable for a seed)
    summary.json                         counts and timing

Generating into a folder used before first removes what an earlier run wrote there (the files
above by their names, ``contact_sheet.png`` and the cached arrays in ``.cache/volumes/``), so no
slice, volume, mask or cached array of another shape, seed or count survives; other files are
left alone.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlm.data.manifest import (
    prepare_output,
    remove_generated,
    split_for,
    worker_count,
    write_jsonl,
)
from vlm.data.phantom_ct.coords import body_frame, to_body_frame
from vlm.data.phantom_ct.endpoints import location_labels, simulate_survival
from vlm.data.phantom_ct.geometry import DEFAULT_FOV_MM, Grid, make_grid
from vlm.data.phantom_ct.lesions import slice_annotations
from vlm.data.phantom_ct.render import RenderedVolume, render_volume
from vlm.data.phantom_ct.tissues import LOCATION_CLASSES, body_mask
from vlm.data.phantom_ct.writers import write_dicom_series, write_nifti
from vlm.errors import RadLensError
from vlm.io.dicom_write import uid_from

logger = logging.getLogger(__name__)

DATASET_NAME = "phantom_ct"
#: a volume id of :func:`volume_ids` (any seed and index), the stem of every file it owns
_VOLUME_ID = r"pct_s\d+_\d{5}"
#: (folder, file names) the generator writes, temporary files included
_OWNED_FILES = (
    ("nifti", re.compile(rf"\.?{_VOLUME_ID}\.nii\.gz(\.tmp\.nii\.gz)?")),
    ("masks", re.compile(rf"\.?{_VOLUME_ID}_(lesions|lung)\.nii\.gz(\.tmp\.nii\.gz)?")),
    # vlm.data.ct_dataset's HU arrays, their hashes and source stamps
    (".cache/volumes", re.compile(rf"{_VOLUME_ID}(\.tmp)?\.(npy|sha256|source)")),
)
_SLICE_FILE = re.compile(r"\.?\d{4}\.dcm(\.tmp)?")
_TOP_FILES = ("manifest.jsonl", "summary.json", ".summary.json.tmp", "contact_sheet.png")


def volume_ids(seed: int, index: int) -> dict[str, str]:
    """Pseudonymous identifiers of volume ``index`` (deterministic)."""
    tag = hashlib.sha256(f"phantom_ct:{seed}:{index}".encode()).hexdigest()[:10].upper()
    return {"volume_id": f"pct_s{seed}_{index:05d}", "patient_id": f"PCT-{tag}",
            "study_uid": uid_from("phantom_ct", seed, index, "study"),
            "series_uid": uid_from("phantom_ct", seed, index, "series")}


def manifest_row(vol: RenderedVolume, grid: Grid, seed: int, index: int) -> dict[str, Any]:
    """The manifest row of one rendered volume (paths relative to the dataset root)."""
    ids = volume_ids(seed, index)
    vid = ids["volume_id"]
    frame = body_frame(body_mask(vol.labels), vol.lung)
    flags, boxes, box_labels = slice_annotations(vol.lesion_map, len(vol.lesions))
    lesions = []
    for rec in vol.lesions:
        r = dict(rec)
        r["centre_body_frame"] = [round(float(v), 4)
                                  for v in to_body_frame(rec["centre_voxel"], frame)]
        lesions.append(r)
    score = vol.info["emphysema_score"]
    time_m, event = simulate_survival(
        score, len(lesions), np.random.default_rng(np.random.SeedSequence([seed, index, 1])))
    return {
        **ids,
        "dataset": DATASET_NAME,
        "seed": int(seed),
        "index": int(index),
        "split": split_for(ids["patient_id"], seed),
        "modality": "CT",
        "dicom_dir": f"dicom/{vid}",
        "nifti": f"nifti/{vid}.nii.gz",
        "masks": {"lesions": f"masks/{vid}_lesions.nii.gz", "lung": f"masks/{vid}_lung.nii.gz"},
        "shape": list(grid.shape),
        "spacing": list(grid.spacing),
        "origin_lps": list(grid.origin),
        "lesions": lesions,
        "n_lesions": len(lesions),
        "slice_flags": flags,
        "slice_boxes": boxes,
        "slice_box_labels": box_labels,
        "location_labels": location_labels(r["location"] for r in lesions),
        "emphysema_score": score,
        "emphysema_class": vol.info["emphysema_class"],
        "emphysema_pattern": vol.info["emphysema_pattern"],
        "noise_sd_hu": vol.info["noise_sd_hu"],
        "time": time_m,
        "event": event,
        "body_frame": frame,
        "landmarks_mm": {k: round(float(v), 2) for k, v in sorted(vol.landmarks.items())},
    }


def _generate_one(task: tuple[str, int, int, tuple[int, int, int], tuple[float, float, float]]
                  ) -> dict[str, Any]:
    """Worker: render, write all files of one volume, return its manifest row."""
    out_dir, seed, index, shape, fov = task
    grid = make_grid(shape, fov)
    vol = render_volume(grid, seed, index)
    row = manifest_row(vol, grid, seed, index)
    root = Path(out_dir)
    write_dicom_series(vol.hu, grid, root / row["dicom_dir"], patient_id=row["patient_id"],
                       study_uid=row["study_uid"], series_uid=row["series_uid"])
    write_nifti(vol.hu, grid, root / row["nifti"])
    write_nifti(vol.lesion_map, grid, root / row["masks"]["lesions"])
    write_nifti(vol.lung.astype(np.uint8), grid, root / row["masks"]["lung"])
    return row


def generate_phantom_ct(out_dir: str | os.PathLike[str], n: int = 8,
                        shape: tuple[int, int, int] = (128, 128, 128), seed: int = 0,
                        workers: int | None = None,
                        fov_mm: tuple[float, float, float] = DEFAULT_FOV_MM) -> dict[str, Any]:
    """Generate ``n`` synthetic CT volumes (DICOM + NIfTI + masks + manifest) into ``out_dir``.

    Volume ``i`` depends only on (seed, i, shape, fov_mm), never on ``workers``.

    Args:
        n: number of volumes. shape: (Z, Y, X) voxels; spacing = fov_mm / shape.
        seed: dataset seed (different seeds give different subjects and splits).
        workers: processes (default: all cores, at most ``n``); 1 runs in this process.
        fov_mm: physical field of view (z, y, x) in mm.

    Returns:
        Summary dict (also written to ``summary.json``): counts, seconds, volumes_per_s.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    worker_count(workers, 1)  # a negative --workers: refused before any file is touched
    if int(seed) < 0:  # numpy's SeedSequence refused it deep in the first worker
        raise RadLensError(f"the PhantomCT seed must be a non-negative integer, got {seed}")
    root = Path(out_dir)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    fov = (float(fov_mm[0]), float(fov_mm[1]), float(fov_mm[2]))
    make_grid(shape, fov)  # validate early
    removed = prepare_output(root, "PhantomCT", clear_previous_run)
    if removed:
        logger.info("PhantomCT: removed %d files of an earlier run in %s", removed, root)
    workers = worker_count(workers, n)
    tasks = [(str(root), int(seed), i, shape, fov) for i in range(n)]
    t0 = time.perf_counter()
    if workers == 1:
        rows = [_generate_one(t) for t in tasks]
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers) as pool:
            rows = list(pool.imap(_generate_one, tasks, chunksize=1))
    write_jsonl(root / "manifest.jsonl", rows)
    seconds = time.perf_counter() - t0
    summary = _summary(rows, seconds, workers, shape, fov, seed)
    tmp = root / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / "summary.json")
    logger.info("PhantomCT: %d volumes of %s in %.1f s (%.2f volumes/s) -> %s", n, shape,
                seconds, summary["volumes_per_s"], root)
    return summary


def clear_previous_run(root: Path) -> int:
    """Remove what an earlier generation wrote into ``root``: every volume, slice and mask file
    named as this generator names them, their cached arrays (``.cache/volumes/<volume_id>.*``,
    the one cache keyed by name; the others are keyed by content) and, when ``root`` holds a
    PhantomCT manifest or summary, those and the contact sheet (the manifest first, so a folder
    left half-regenerated is not taken for a data set). Returns how many files went."""
    return remove_generated(root, _TOP_FILES if _is_phantom_folder(root) else (),
                            re.compile(_VOLUME_ID), _SLICE_FILE,
                            _OWNED_FILES)


def _is_phantom_folder(root: Path) -> bool:
    """Whether ``root``'s summary or first manifest row says PhantomCT wrote it."""
    for name in ("summary.json", "manifest.jsonl"):
        try:
            with open(root / name, encoding="utf-8") as fh:
                first = json.loads(fh.read() if name == "summary.json" else fh.readline())
        except (OSError, ValueError):
            continue
        if isinstance(first, dict) and first.get("dataset") == DATASET_NAME:
            return True
    return False


def _summary(rows: list[dict[str, Any]], seconds: float, workers: int,
             shape: tuple[int, int, int], fov: tuple[float, float, float], seed: int
             ) -> dict[str, Any]:
    lesion_counts = collections.Counter(les["location"] for r in rows for les in r["lesions"])
    return {
        "dataset": DATASET_NAME,
        "n_volumes": len(rows),
        "seed": seed,
        "shape": list(shape),
        "fov_mm": list(fov),
        "spacing": rows[0]["spacing"],
        "workers": workers,
        "seconds": round(seconds, 2),
        "volumes_per_s": round(len(rows) / max(seconds, 1e-9), 3),
        "n_lesions": int(sum(lesion_counts.values())),
        "lesions_per_location": {c: int(lesion_counts.get(c, 0)) for c in LOCATION_CLASSES},
        "emphysema_classes": dict(sorted(collections.Counter(
            r["emphysema_class"] for r in rows).items())),
        "splits": dict(sorted(collections.Counter(r["split"] for r in rows).items())),
        "events": int(sum(r["event"] for r in rows)),
        "lesion_slices": int(sum(sum(r["slice_flags"]) for r in rows)),
        "slices": int(sum(len(r["slice_flags"]) for r in rows)),
    }
