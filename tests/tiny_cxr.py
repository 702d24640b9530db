"""A tiny PhantomCXR-shaped folder for fast tests: DICOM radiographs with a bright blob on the
side the report names, manifest rows in PhantomCXR's field layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlm.data.manifest import write_jsonl
from vlm.io.dicom_write import build_dataset, save_dataset, uid_from

TEXTS = {
    "left": ("Opacity in the left lung.", "Left lower lobe opacity."),
    "right": ("Opacity in the right lung.", "Right lower lobe opacity."),
    None: ("The lungs are clear.", "No acute disease."),
}


def make_tiny_cxr(root: Path, n: int = 48, size: int = 96, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        side = [None, "left", "right"][i % 3]
        yy, xx = np.mgrid[:size, :size]
        img = 800 + 200 * np.exp(-((xx - size / 2) ** 2) / (2 * (size / 5) ** 2))
        img = img + rng.normal(0, 20, (size, size))
        box = None
        if side:
            # patient left is image right
            cx = size * (0.72 if side == "left" else 0.28)
            cy = size * rng.uniform(0.4, 0.7)
            r = size * 0.12
            blob = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
            img[blob] += 1500
            box = [int(cx - r), int(cy - r), int(cx + r) + 1, int(cy + r) + 1]
        pixels = np.clip(img, 0, 4095).astype(np.uint16)
        rel = Path("dicom") / f"s{i:03d}.dcm"
        ds = build_dataset(pixels, modality="DX", patient_id=f"P{i:03d}",
                           study_uid=uid_from("tiny", i), series_uid=uid_from("tiny", i, "s"),
                           sop_uid=uid_from("tiny", i, "i"), pixel_spacing=(0.5, 0.5),
                           bits_stored=12, window=(2048, 4096))
        save_dataset(ds, root / rel)
        findings, impression = TEXTS[side]
        rows.append({
            "id": f"s{i:03d}", "file": rel.as_posix(), "patient_id": f"P{i:03d}",
            "split": "train" if i < int(n * 0.6) else ("val" if i < int(n * 0.8) else "test"),
            "findings_text": findings, "impression": impression,
            "labels": ["lung_opacity"] if side else [],
            "findings": ([{"finding": "lung_opacity", "side": side, "zone": "lower",
                           "severity": None, "box": box, "mask": None}] if side else []),
            "size": size,
        })
    write_jsonl(root / "manifest.jsonl", rows)
    return root
