"""``radlens demo`` / ``make demo``: the end-to-end path on real sample files.

Reads the real DICOM shipped by ``pydicom-data`` and pydicom (a MONOCHROME1 chest CR, a CT,
MR, multi-frame and colour files, a JPEG 2000 radiograph), assembles a CT series, writes
correctly windowed previews and a de-identified summary to ``OUT``.
"""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path

from PIL import Image

from vlm.io.dicom_write import save_dataset, uid_from

logger = logging.getLogger(__name__)

DEMO_FILES = (
    ("RG1_UNCI.dcm", None),          # real chest CR, 15-bit, MONOCHROME1
    ("RG1_J2KR.dcm", None),          # the same radiograph, JPEG 2000 lossless
    ("CT_small.dcm", "mediastinum"),  # real CT slice in HU
    ("CT_small.dcm", "lung"),
    ("MR_small.dcm", None),
    ("emri_small.dcm", None),        # 10-frame MR
    ("SC_rgb.dcm", None),            # colour
    ("US1_J2KR.dcm", None),          # ultrasound, colour JPEG 2000
)


def build_demo_series(folder: Path, n: int = 12) -> Path:
    """A CT series made from the real CT slice, written shuffled, to exercise assembly."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file

    src = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    spacing = 2.5
    order = np.random.default_rng(0).permutation(n)
    for rank, k in enumerate(order):
        ds = copy.deepcopy(src)
        z = float(k) * spacing
        ds.ImagePositionPatient = [-150.0, -150.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.InstanceNumber = int(k) + 1
        ds.SeriesInstanceUID = uid_from("demo-series")
        ds.SOPInstanceUID = uid_from("demo-series", int(k))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        save_dataset(ds, folder / f"slice_{rank:03d}.dcm")
    return folder


def run_demo(out: Path) -> list[str]:
    """Inspect the demo files into ``out``; returns the failure lines."""
    from pydicom.data import get_testdata_file

    from ui.inspect import inspect_paths

    out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    lines = io.StringIO()
    for name, window in DEMO_FILES:
        path = Path(get_testdata_file(name) or name)
        sub = out / "previews" / (window or "default")
        failures += inspect_paths([path], out=sub, window=window, stream=lines)
    series = build_demo_series(out / "ct_series")
    failures += inspect_paths([series], out=out / "previews" / "lung", window="lung",
                              stream=lines)
    rows = [json.loads(line) for line in lines.getvalue().splitlines()]
    (out / "summary.jsonl").write_text(lines.getvalue())
    previews = sorted(str(p) for p in (out / "previews").rglob("*.png"))
    _contact_sheet(previews, out / "previews.png")
    for row in rows:
        meta = row["meta"]
        logger.info("%s", row["file"])
        shape = "x".join(map(str, row["shape"]))
        print(f"{Path(row['file']).name:>16}  {row['kind']:6}  {shape:>16}  "
              f"{meta.get('modality') or '-':3}  {meta['photometric']:12} -> {row.get('preview')}")
    print(f"demo: {len(rows)} inputs read, {len(failures)} failed; previews in {out}/previews, "
          f"contact sheet {out}/previews.png, summary {out}/summary.jsonl")
    return failures


def _contact_sheet(paths: list[str], target: Path, tile: int = 256) -> None:
    if not paths:
        return
    cols = min(4, len(paths))
    rows = (len(paths) + cols - 1) // cols
    sheet = Image.new("L", (cols * tile, rows * tile), 0)
    for n, p in enumerate(paths):
        with Image.open(p) as opened:
            im = opened.convert("L")
            scale = tile / max(im.width, im.height)  # fit the tile, enlarging small images too
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
            sheet.paste(im, ((n % cols) * tile + (tile - im.width) // 2,
                             (n // cols) * tile + (tile - im.height) // 2))
    sheet.save(target)
