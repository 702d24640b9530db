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
import shutil
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


#: Real DICOM files from pydicom-data / pydicom that join the demo archive.
REAL_DEMO_FILES = ("RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG3_UNCI.dcm", "CT_small.dcm",
                   "MR_small.dcm", "emri_small.dcm", "US1_J2KR.dcm", "SC_rgb.dcm")
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "lrclr-r18"
SHIPPED_VOLUME_MODEL = SHIPPED_MODEL.parent / "lecl-small"
#: PhantomCT volumes in the demo (seed 1: not the seed-0 volumes the shipped encoder saw).
DEMO_VOLUMES, DEMO_VOLUME_SHAPE, DEMO_VOLUME_SEED = 24, (128, 128, 128), 1


def test_split_report_ids(seed: int = 0) -> list[str]:
    """IU report ids whose PhantomCXR study falls in the test split for ``seed``."""
    from vlm.data.iu_reports import load_reports
    from vlm.data.manifest import split_for
    from vlm.data.phantom_cxr.generate import pseudonym

    return [r.uid for r in load_reports() if split_for(pseudonym("PT", r.uid), seed) == "test"]


def build_demo_archive(data_dir: Path, size: int = 512, limit: int | None = None) -> Path:
    """The demo archive: the PhantomCXR test split plus real DICOM files (reused if built)."""
    from pydicom.data import get_testdata_file

    from vlm.data.phantom_cxr import generate_phantom_cxr

    archive = data_dir / "archive"
    cxr = archive / "phantom_cxr_test"
    if not (cxr / "summary.json").is_file():
        ids = test_split_report_ids()
        generate_phantom_cxr(cxr, report_ids=ids[:limit] if limit else ids, size=size)
    real = archive / "real"
    real.mkdir(parents=True, exist_ok=True)
    for name in REAL_DEMO_FILES:
        src = get_testdata_file(name)
        if src is not None and not (real / name).exists():
            shutil.copyfile(str(src), real / name)
    return archive


def build_demo_volumes(data_dir: Path, index: Path, model: str | Path = SHIPPED_VOLUME_MODEL,
                       n: int = DEMO_VOLUMES,
                       shape: tuple[int, int, int] = DEMO_VOLUME_SHAPE,
                       progress: bool = True) -> Path:
    """PhantomCT volumes (outside the image archive) in the index's ``volume`` collection,
    for the Volumes tab; reused once built."""
    from index.volumes import REPORT_FILE, ingest_volumes
    from vlm.data.phantom_ct import generate_phantom_ct
    from vlm.volume_encoder import VolumeEncoder

    ct = data_dir / "ct" / "phantom_ct"
    if not (ct / "manifest.jsonl").is_file():
        generate_phantom_ct(ct, n=n, shape=shape, seed=DEMO_VOLUME_SEED)
    if not _finished(index / REPORT_FILE):
        report = ingest_volumes(VolumeEncoder.load(model), ct, index, progress=progress,
                                keep_paths=True)
        print(f"demo: indexed {report.added} PhantomCT volumes with {Path(str(model)).name}, "
              f"{len(report.failed)} unreadable")
    return ct


def _finished(report_file: Path) -> bool:
    """Whether a build ran to its end. A build writes its report also when it stops early
    (Ctrl-C or SIGTERM: ``interrupted``; an error: no run time yet), and a demo that took
    such a report for a finished build served a partial index; a rerun of the build adds only
    what is missing."""
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):
        return False
    return not report.get("interrupted") and float(report.get("seconds") or 0) > 0


def _volume_model_matches(index: Path, model: str | Path) -> bool:
    """Whether the index's volume collection was filled by ``model`` (config and weights)."""
    from index.folder import read_collection_model
    from index.volumes import VOLUME
    from vlm.errors import RadLensError
    from vlm.volume_encoder import VolumeEncoder

    try:
        have = read_collection_model(index, VOLUME)
    except (RadLensError, OSError, KeyError):  # unreadable: rebuilt like another model's
        return False
    return have is not None and have.config_hash == VolumeEncoder.load(model).config_hash


def _index_config_hash(index: Path) -> str | None:
    """The fingerprint of the image model an index folder was built with (None: unreadable)."""
    from index import persist
    from vlm.errors import RadLensError

    try:
        manifest = persist.read_manifest(index / persist.read_current(index))
    except (RadLensError, OSError):  # a broken demo index is rebuilt like another model's
        return None
    return str(manifest.get("config_hash"))


def build_demo_index(data_dir: Path, model: Path = SHIPPED_MODEL, limit: int | None = None,
                     progress: bool = True, volume_model: str | Path | None = None,
                     volumes: int = DEMO_VOLUMES,
                     volume_shape: tuple[int, int, int] = DEMO_VOLUME_SHAPE) -> Path:
    """Build (or reuse) ``data_dir/index`` over the demo archive with ``model``, plus
    ``volumes`` PhantomCT volumes encoded by ``volume_model`` (default: the shipped one, when
    present; ``volumes=0`` leaves them out)."""
    from index.ingest import ingest
    from index.volumes import REPORT_FILE as VOLUME_REPORT
    from vlm.inference import Encoder, checkpoint_fingerprint

    index = data_dir / "index"
    archive = build_demo_archive(data_dir, limit=limit)
    chosen = volume_model or default_volume_model()
    if (index / "CURRENT").exists():
        built, wanted = _index_config_hash(index), checkpoint_fingerprint(model)
        if built != wanted or (volumes > 0 and chosen is not None
                               and (index / VOLUME_REPORT).is_file()
                               and not _volume_model_matches(index, chosen)):
            _check_demo_built(index, archive)  # never delete an index the user built
        if built != wanted:
            # a checkout that ships a different default model: the old demo index would be
            # refused at serve time, and it holds nothing but the regenerable demo archive
            print(f"demo: {index} was built with another model ({built}); rebuilding it "
                  f"with {model.name} ({wanted})")
            shutil.rmtree(index)
        elif (volumes > 0 and chosen is not None and (index / VOLUME_REPORT).is_file()
              and not _volume_model_matches(index, chosen)):
            # the same for the volume collection, which would refuse the new model's vectors
            print(f"demo: the volume collection of {index} was built with another volume "
                  f"model; rebuilding the index with {Path(str(chosen)).name}")
            shutil.rmtree(index)
    if not (index / "CURRENT").exists() or not _finished(index / "ingest_report.json"):
        report = ingest(Encoder(str(model)), archive, index, progress=progress,
                        model_path=str(model.resolve()), keep_paths=True)
        print(f"demo: indexed {report.added} images ({report.regions} regions), "
              f"{len(report.failed)} unreadable, {report.images_per_s:.1f} images/s")
    if volumes > 0 and chosen is not None:
        build_demo_volumes(data_dir, index, chosen, volumes, volume_shape, progress)
    return index


def _check_demo_built(index: Path, archive: Path) -> None:
    """Refuse to rebuild ``index`` unless the demo filled it from ``archive`` (its last
    ingest report says so): an index of the user's own at ``--out/index`` was deleted.

    Raises:
        RadLensError: naming the folder and what to do.
    """
    from vlm.errors import RadLensError

    try:
        source = json.loads((index / "ingest_report.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        source = None
    if not source or Path(source).resolve() != archive.resolve():
        raise RadLensError(f"{index} holds an index the demo did not build (from "
                           f"{source or 'an unknown source'}), made with another model: move "
                           "it away or give the demo another --out")


def default_volume_model() -> Path | None:
    """The shipped LeCL slice encoder (self-supervised), else None (no volumes). The shipped
    supervised lesion model (``checkpoints/lesion-seg``) is one ``--volume-model`` away. It
    finds the demo's lung and liver lesions above the base rate, narrowly for the liver (2 of
    12 hits; README, CT volumes). It is not the default yet: switching needs the demo's own
    tests updated with it."""
    return SHIPPED_VOLUME_MODEL if (SHIPPED_VOLUME_MODEL / "lecl.pt").is_file() else None
