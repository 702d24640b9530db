"""Fill the index's ``volume`` collection: find volumes under a source -> read -> encode -> add
one vector and one catalog row per volume -> save generations as it goes.

What counts as a volume:

* every NIfTI file (``.nii``, ``.nii.gz``);
* every DICOM series (files grouped by SeriesInstanceUID, read header-only) of at least
  :data:`MIN_SERIES_SLICES` single-frame slices with a position and orientation, assembled with
  :func:`vlm.io.read_series` (files that are not DICOM are left to the image ingest);
* on a DICOMweb server (``source`` an http(s) URL, :mod:`index.dicomweb`): every series of at
  least :data:`MIN_SERIES_SLICES` instances, fetched into a private temporary folder when its
  turn comes and read like a series folder; a series the collection holds (by its Series
  Instance UID pseudonym) is not fetched again;
* in a RadLens data set folder whose ``manifest.jsonl`` rows name a ``dicom_dir`` or ``nifti``
  (PhantomCT), exactly one volume per row, the DICOM series when present, else the NIfTI file;
  the row's labels (lesion locations as ``liver_lesion``, ...) go into the catalog row's
  ``extra`` and the folder's other files (masks) are not indexed.

Idempotent and resumable like :mod:`index.ingest`: a volume's content hash (sha256 of its file,
or of the sorted file hashes of a series) is looked up before reading, so a rerun adds nothing
twice; a generation is saved every ``save_every`` volumes. A bad volume never stops the run: it
is listed once in ``volume_ingest_report.json`` (mode 0600) in the index folder, and so are
what the search passed over: a DICOM series of fewer than :data:`MIN_SERIES_SLICES` slices, a
second copy of a series (the same SeriesInstanceUID and SOPInstanceUIDs in another folder; the
first copy, by path, is indexed), a volume with the same voxels as one already indexed (a NIfTI
copy of an indexed DICOM series, see :func:`voxel_hash`; DICOM series are read before NIfTI
files, so the copy with the DICOM metadata is kept), an unreadable folder, a broken link, and a
file that is not a regular file (FIFO, socket, device), which is never opened. Linked folders
are followed, each real folder once, as in the image ingest's walk. A source with no volume at
all is an error (:class:`NoVolumesError`) raised before any index is created or opened.

Catalog rows hold pseudonyms only (study/series pseudonyms from DICOM, a keyed pseudonym of the
path unless ``keep_paths``). The index folder keeps, per volume, a thumbnail (middle axial slice,
soft-tissue window), previews of the most salient slices (both under ``thumbs/vol/``, the only
files the app serves) and a down-sampled int16 HU stack for the app's slice viewer
(``volumes/``, read by the server, never served).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from index import persist
from index.catalog import CatalogItem
from index.dicomweb import DicomWeb, Series, is_dicomweb, list_series
from index.folder import CollectionModel, IndexFolder, bind_pseudonyms, is_index_folder
from index.ingest import file_hash
from index.shard import Shard, shard_key
from index.walk import folders
from vlm.errors import ConfigError, Interrupted, RadLensError
from vlm.interrupt import StopRequest, stop_on_signal
from vlm.io import Volume, is_nifti, read_nifti, read_series, render
from vlm.volume_encoder import VolumeEncoder, VolumeEncoding

logger = logging.getLogger(__name__)

VOLUME = "volume"
REPORT_FILE = "volume_ingest_report.json"
#: Thumbnails and slice previews use the soft-tissue window (centre 60, width 400 HU).
PREVIEW_WINDOW = "abdomen"
PREVIEW_SIDE = 256
SALIENT_SLICES = 5
MIN_SERIES_SLICES = 3
STACK_MAX_SIDE = 256  # in-plane size of the viewer's stack
STACK_MAX_SLICES = 256
NOT_DICOM_SUFFIXES = {".json", ".jsonl", ".txt", ".md", ".csv", ".npy", ".npz", ".png", ".jpg",
                      ".jpeg", ".tif", ".tiff", ".bmp", ".html", ".zip", ".gz", ".pt", ".sqlite",
                      ".py", ".log"}


class NoVolumesError(RadLensError):
    """A source holds nothing to index as a volume (raised before the index is touched)."""


@dataclass
class VolumeSource:
    """One volume to read: a NIfTI file or the files of one DICOM series."""

    kind: str  # "nifti" | "dicom-series"
    path: Path  # the NIfTI file, or the folder holding the series
    files: list[Path]
    extra: dict[str, Any] = field(default_factory=dict)  # labels from a data set manifest
    #: a series on a DICOMweb server, fetched into ``path`` (a private temporary folder)
    #: when its turn comes; reports and the catalog name it by its URL
    remote: Series | None = None
    url: str = ""

    @property
    def where(self) -> str:
        return self.url or str(self.path)


@dataclass
class VolumeIngestReport:
    source: str
    added: int = 0
    already_indexed: int = 0
    #: volumes skipped because they were erased from this index (``radlens index remove``)
    withheld: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    encode_seconds: float = 0.0
    volumes_per_s: float = 0.0
    #: stopped by Ctrl-C or SIGTERM after saving; ``unread`` volumes were not looked at
    interrupted: bool = False
    unread: int = 0
    #: DICOMweb: series with fewer than MIN_SERIES_SLICES instances (radiographs, scouts,
    #: reports), left out unfetched
    short_series: int = 0
    #: the part of the source this run indexed ("I/N", :mod:`index.shard`); None: all of it
    shard: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collection_model(encoder: VolumeEncoder) -> CollectionModel:
    """The identity the ``volume`` collection records for ``encoder``."""
    return CollectionModel(encoder.name, encoder.config_hash, encoder.dim, encoder.source)


# ---------------------------------------------------------------------------- finding volumes
def dataset_extra(row: dict[str, Any]) -> dict[str, Any]:
    """Catalog ``extra`` of a PhantomCT-style manifest row: labels, no identifiers."""
    lesions = [les for les in row.get("lesions") or [] if isinstance(les, dict)]
    locations = sorted({str(les["location"]) for les in lesions if les.get("location")})
    return {"dataset_id": row.get("volume_id") or row.get("id"), "split": row.get("split"),
            "labels": [f"{loc}_lesion" for loc in locations],
            "location_labels": row.get("location_labels"),
            "lesions": [{k: les.get(k) for k in ("location", "kind", "diameter_mm")}
                        for les in lesions],
            "emphysema_class": row.get("emphysema_class")}


def _manifest_volume_rows(folder: Path) -> list[dict[str, Any]]:
    from vlm.data.manifest import read_jsonl

    path = folder / "manifest.jsonl"
    if not path.is_file():
        return []
    try:
        rows = list(read_jsonl(path))  # a damaged manifest: ManifestError, one line
    except OSError as exc:
        raise ConfigError(f"{path}: unreadable manifest ({exc.strerror or exc})") from None
    return [r for r in rows if isinstance(r.get("dicom_dir"), str)
            or isinstance(r.get("nifti"), str)]


def _dataset_sources(root: Path, rows: list[dict[str, Any]]) -> list[VolumeSource]:
    out = []
    for row in rows:
        extra = dataset_extra(row)
        if row.get("modality"):
            extra["modality"] = row["modality"]
        series = root / row["dicom_dir"] if isinstance(row.get("dicom_dir"), str) else None
        if series is not None and series.is_dir():
            try:
                files = sorted(p for p in series.iterdir() if p.is_file()
                               and not p.name.startswith("."))
            except OSError:  # listed as a failure by content_hash (no files)
                files = []
            out.append(VolumeSource("dicom-series", series, files, extra))
        elif isinstance(row.get("nifti"), str):
            out.append(VolumeSource("nifti", root / row["nifti"], [root / row["nifti"]], extra))
        elif series is not None:
            out.append(VolumeSource("dicom-series", series, [], extra))
    return out


def group_series(files: list[Path]) -> tuple[list[VolumeSource], list[dict[str, str]]]:
    """DICOM files -> one source per series of positioned, single-frame slices (headers only;
    unreadable or non-DICOM files are skipped, and so are files without a position, which are
    2-D images), and the series passed over, as report rows: fewer than
    :data:`MIN_SERIES_SLICES` slices, or a second copy of slices already seen (a file whose
    SOPInstanceUID an earlier file of the series has, by path; the first is kept, so a series
    split over several folders is still one volume)."""
    from vlm.io.dicom import load_dataset

    groups: dict[str, list[tuple[Path, str]]] = {}
    for path in files:
        try:
            ds = load_dataset(path, stop_before_pixels=True)
        except RadLensError:
            continue
        if ("ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds
                or int(ds.get("NumberOfFrames") or 1) > 1):
            continue
        sop = str(ds.get("SOPInstanceUID") or "").strip()
        groups.setdefault(str(ds.get("SeriesInstanceUID") or ""), []).append((path, sop))
    out: list[VolumeSource] = []
    skipped: list[dict[str, str]] = []
    for members in groups.values():
        kept: list[Path] = []
        first_of: dict[str, Path] = {}  # SOPInstanceUID -> the file kept for it
        copies: dict[Path, list[Path]] = {}  # folder -> its files that repeat a kept slice
        for path, sop in sorted(members):
            if sop and sop in first_of:
                copies.setdefault(path.parent, []).append(path)
                continue
            if sop:
                first_of[sop] = path
            kept.append(path)
        folder = _folder_of(kept)
        for where, repeated in copies.items():
            skipped.append({"path": str(where), "reason": (
                f"duplicate: {len(repeated)} slice(s) repeat the series already taken from "
                f"{folder} (same SeriesInstanceUID and SOPInstanceUIDs); not indexed twice")})
        if len(kept) < MIN_SERIES_SLICES:
            skipped.append({"path": str(kept[0] if len(kept) == 1 else folder), "reason": (
                f"a DICOM series of {len(kept)} slice(s): a volume needs at least "
                f"{MIN_SERIES_SLICES}; not indexed as a volume")})
            continue
        out.append(VolumeSource("dicom-series", folder, kept))
    return out, skipped


def _folder_of(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in files]))


def find_volumes(source: str | os.PathLike[str]) -> list[VolumeSource]:
    """Every volume under ``source`` (a folder, a NIfTI file or a series folder), by path."""
    return discover_volumes(source)[0]


def discover_volumes(source: str | os.PathLike[str]
                     ) -> tuple[list[VolumeSource], list[dict[str, str]]]:
    """:func:`find_volumes`, and what it passed over as report rows (``path``, ``reason``):
    unreadable folders, broken links, FIFOs, sockets and devices, a data set manifest that
    cannot be read (its folder is left out until it is fixed), short series and second copies
    of a series (see :func:`group_series`). The folders are walked by the rules the image walk
    follows too (:func:`index.walk.folders`: links followed, each real folder once)."""
    src = Path(source)
    if src.is_file():
        return ([VolumeSource("nifti", src, [src])] if is_nifti(src) else []), []
    found: list[VolumeSource] = []
    loose: list[Path] = []
    skipped: list[dict[str, str]] = []

    def note(path: str, reason: str) -> None:
        skipped.append({"path": path, "reason": reason})

    for folder in folders(src, note):
        here = Path(folder.path)
        if folder.has_manifest:
            try:
                rows = _manifest_volume_rows(here)
            except ConfigError as bad:  # a damaged manifest (ManifestError) or an unreadable one
                # as the image walk: not read as loose files, which a rerun after the fix
                # would find known and never attach their labels to
                note(str(folder.manifest),
                     f"{bad}; its data set folder is not indexed until the manifest is fixed")
                folder.prune()
                continue
            if rows:
                found.extend(_dataset_sources(here, rows))
                folder.prune()
                continue
        for name in folder.files:
            path = Path(name)
            if is_nifti(path):
                found.append(VolumeSource("nifti", path, [path]))
            elif path.suffix.lower() not in NOT_DICOM_SUFFIXES:
                loose.append(path)
    series, passed_over = group_series(loose)
    found.extend(series)
    return sorted(found, key=lambda s: str(s.path)), skipped + passed_over


def voxel_hash(volume: Volume) -> str:
    """sha256 of a volume's shape and voxel values (to 0.001, slice by slice) on the canonical
    grid: a DICOM series and its NIfTI copy read to the same volume, so they share it, while
    their file-based :func:`content_hash` differs. Recorded with every row (``extra``) so that
    the copy is not indexed twice and a query does not find its own copy."""
    arr = volume.array
    digest = hashlib.sha256(f"voxels:{tuple(arr.shape)}".encode())
    for k in range(arr.shape[0]):
        q = np.round(np.asarray(arr[k], dtype=np.float64) * 1000.0)
        q = np.clip(np.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0), -2.0 ** 62, 2.0 ** 62)
        digest.update(q.astype("<i8").tobytes())
    return digest.hexdigest()


def content_hash(src: VolumeSource) -> str:
    """sha256 of a NIfTI file's bytes, or of the sorted file hashes of a series."""
    if src.kind == "nifti":
        return file_hash(src.path)
    if not src.files:
        raise FileNotFoundError(2, "no files", str(src.path))
    digest = hashlib.sha256(b"dicom-series\0")
    for h in sorted(file_hash(p) for p in src.files):
        digest.update(h.encode())
    return digest.hexdigest()


def read_source(src: VolumeSource) -> Volume:
    """Read one volume (raises :class:`vlm.errors.ImageReadError` / ``SeriesError``)."""
    if src.kind == "nifti":
        return read_nifti(src.path)
    return read_series(src.files)


# ---------------------------------------------------------------------------- previews
def _png(hu: np.ndarray, path: Path) -> None:
    from PIL import Image

    im = Image.fromarray(render(hu, window=PREVIEW_WINDOW))
    scale = PREVIEW_SIDE / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def preview_stack(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Z', Y', X') int16 HU for the slice viewer (at most :data:`STACK_MAX_SLICES` evenly spaced
    slices, in-plane decimated to at most :data:`STACK_MAX_SIDE`) and the original slice index
    of each kept slice."""
    z, y, x = hu.shape
    step = max(1, int(np.ceil(max(y, x) / STACK_MAX_SIDE)))
    keep = (np.arange(z) if z <= STACK_MAX_SLICES
            else np.unique(np.linspace(0, z - 1, STACK_MAX_SLICES).round().astype(int)))
    stack = np.clip(np.round(hu[keep, ::step, ::step]), -32768, 32767).astype(np.int16)
    return stack, keep.astype(np.int32)


def write_previews(ix_path: Path, digest: str, hu: np.ndarray, enc: VolumeEncoding,
                   n_salient: int = SALIENT_SLICES) -> dict[str, Any]:
    """Write the thumbnail, salient-slice previews and viewer stack of one volume into the
    index folder; returns the catalog fields pointing at them (paths relative to the folder)."""
    sub = Path("thumbs") / "vol" / digest[:2]
    thumb = sub / f"{digest}.png"
    _png(hu[hu.shape[0] // 2], ix_path / thumb)
    salient = []
    for k, score in enc.top_slices(n_salient):
        rel = sub / f"{digest}_k{k:04d}.png"
        _png(hu[k], ix_path / rel)
        salient.append({"k": k, "score": round(score, 6), "preview": rel.as_posix()})
    stack, z_index = preview_stack(hu)
    rel_stack = Path("volumes") / digest[:2] / f"{digest}.npz"
    (ix_path / rel_stack).parent.mkdir(parents=True, exist_ok=True)
    tmp = ix_path / rel_stack.with_name(f".{digest}.tmp.npz")
    np.savez_compressed(tmp, hu=stack, z=z_index)
    os.replace(tmp, ix_path / rel_stack)
    return {"thumbnail": thumb.as_posix(), "salient": salient, "stack": rel_stack.as_posix()}


def load_stack(index_path: str | os.PathLike[str], item: CatalogItem
               ) -> tuple[np.ndarray, np.ndarray]:
    """The viewer stack of a volume row: (Z', Y', X') int16 HU and original slice indices.

    Raises:
        RadLensError: the row has no stack inside the index folder.
    """
    rel = (item.extra or {}).get("stack")
    root = Path(index_path).resolve()
    path = (root / rel).resolve() if isinstance(rel, str) else None
    if path is None or root not in path.parents or not path.is_file():
        raise RadLensError(f"volume #{item.id} has no slice stack in the index: rebuild it")
    with persist.NPY_HEADER_LOCK, np.load(path) as data:  # see NPY_HEADER_LOCK
        return np.asarray(data["hu"]), np.asarray(data["z"])


# ---------------------------------------------------------------------------- ingest
def ingest_volumes(encoder: VolumeEncoder, source: str | os.PathLike[str],
                   out: str | os.PathLike[str], *, save_every: int = 16, progress: bool = True,
                   keep_paths: bool = False, shard: Shard | None = None
                   ) -> VolumeIngestReport:
    """Add every volume under ``source`` to the ``volume`` collection of the index at ``out``
    (created if missing, with the volume model as its folder-level model). With ``shard``,
    only the volumes of that part of the source (:mod:`index.shard`; a DICOMweb series by its
    study), which may be none.

    Raises:
        ConfigError: the index's ``volume`` collection was filled by another model.
        NoVolumesError: ``source`` holds no volume to index (nothing is created or opened).
    """
    web = DicomWeb(str(source)) if is_dicomweb(source) else None
    src, dest = Path(source), Path(out)
    if web is None and not src.exists():
        raise RadLensError(f"{src}: no such file or folder")
    if web is None and is_index_folder(src):
        raise RadLensError(f"{src} is a RadLens index, not an archive: pass the folder of "
                           "volumes as --source")
    start = time.time()
    short = 0
    part = shard if shard is not None and shard.count > 1 else None
    if web is not None:
        listing = list_series(web, MIN_SERIES_SLICES, keep=part.holds if part else None)
        sources = [VolumeSource("dicom-series", Path(), [], remote=s, url=web.series_url(s))
                   for s in listing.series]
        skipped, short = listing.problems, listing.short
        anything = bool(sources) or (part is not None and listing.studies > 0)
    else:
        sources, skipped = discover_volumes(src)
        anything = bool(sources)
        if part is not None:
            root = src if src.is_dir() else src.parent
            sources = [vs for vs in sources if part.holds(shard_key(vs.path, root))]
    if not anything:
        first = f"; {len(skipped)} passed over, the first: {skipped[0]['path']}: " \
                f"{skipped[0]['reason']}" if skipped else ""
        if web is not None:
            raise NoVolumesError(f"{web.display}: no volumes to index (series of at least "
                                 f"{MIN_SERIES_SLICES} instances; {short} shorter series "
                                 f"passed over){first}")
        raise NoVolumesError(f"{src}: no volumes to index (NIfTI files, DICOM series of at "
                             f"least {MIN_SERIES_SLICES} slices or a PhantomCT folder){first}")
    model = collection_model(encoder)
    if (dest / "CURRENT").exists():
        ix = IndexFolder.open(dest, mode="w")
    else:
        ix = IndexFolder.create(dest, model_name=model.model_name,
                                config_hash=model.config_hash, dim=model.dim,
                                preprocessing={"volume_model_path": encoder.source})
    try:
        bind_pseudonyms(ix)
        ix.collection(VOLUME, model=model)
    except BaseException:
        ix.close()
        raise
    # listed once, by the caller (the CLI prints each failure on stderr), as image ingest does
    report = VolumeIngestReport(source=web.display if web is not None else str(src),
                                failed=list(skipped), short_series=short,
                                shard=str(part) if part else None)
    try:
        stop = _run(encoder, model, ix, src, sources, report, save_every, progress, keep_paths,
                    start, web)
    finally:
        report_file = dest / REPORT_FILE
        report_file.write_text(json.dumps(report.to_dict(), indent=1))
        report_file.chmod(0o600)
        ix.close()
    if stop:
        raise Interrupted(
            f"interrupted: {report.added} new volumes saved in {dest}, {report.unread} not "
            "read yet; run the same command again to add them", stop.exit_code, report)
    return report


def _failure(src: VolumeSource, exc: BaseException) -> dict[str, str]:
    if isinstance(exc, RadLensError):
        reason = str(exc)
        for p in (src.url, str(src.path), *(str(f) for f in src.files[:1])):
            reason = reason.removeprefix(f"{p}: ") if p else reason
        if src.remote is not None and src.files:  # a fetched slice: named by its number
            reason = reason.replace(f"{src.path}{os.sep}", "slice file ")
    elif isinstance(exc, OSError):
        reason = f"unreadable ({exc.strerror or exc})"
    else:  # a reader or model bug must not stop the archive
        reason = f"unexpected {type(exc).__name__}: {exc}"[:300]
    return {"path": src.where, "reason": " ".join(reason.split())}


class _Duplicate(RadLensError):
    """The volume's voxels are those of a volume already indexed."""


def _known_voxels(ix: IndexFolder) -> dict[str, str]:
    """voxel hash -> "volume #id" of the rows that recorded one (rows indexed before voxel
    hashes were recorded have none, and are not matched)."""
    ids = ix.catalog.filter_ids(VOLUME).tolist()
    return {str(it.extra["voxel_hash"]): f"volume #{it.id}"
            for it in ix.catalog.get_many(ids)
            if it is not None and isinstance((it.extra or {}).get("voxel_hash"), str)}


class _SeriesFetcher:
    """Fetches DICOMweb series one ahead of the loop that reads and encodes them, each into its
    own private temporary folder (mode 0700), so that a remote archive's wait overlaps the
    encoder. :meth:`close` drops or removes what was fetched ahead and not taken."""

    def __init__(self, web: DicomWeb) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.web = web
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="radlens-fetch")
        self.ahead: tuple[VolumeSource, Future[tuple[VolumeSource, str]]] | None = None
        self.closed = False

    def _fetch(self, vs: VolumeSource) -> tuple[VolumeSource, str]:
        assert vs.remote is not None
        folder = tempfile.mkdtemp(prefix="radlens-series-")
        try:
            files = self.web.fetch_series(vs.remote, Path(folder))
            if self.closed:  # nobody will take it (a second Ctrl-C cut close() short)
                raise RuntimeError("the fetcher was closed")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return replace(vs, path=Path(folder), files=files), folder

    def get(self, vs: VolumeSource, after: VolumeSource | None) -> tuple[VolumeSource, str]:
        """``vs`` fetched (its copy with ``path`` and ``files``, and the folder to remove when
        done); starts on ``after``. Raises what the fetch raised (its folder removed)."""
        if self.ahead is not None and self.ahead[0] is vs:
            job = self.ahead[1]
        else:
            self.close_ahead()
            job = self.pool.submit(self._fetch, vs)
        self.ahead = None
        if after is not None and after.remote is not None:
            self.ahead = (after, self.pool.submit(self._fetch, after))
        return job.result()

    def close_ahead(self) -> None:
        if self.ahead is None:
            return
        job = self.ahead[1]
        self.ahead = None
        if not job.cancel():
            with contextlib.suppress(Exception):  # a failed fetch kept nothing
                shutil.rmtree(job.result()[1], ignore_errors=True)

    def close(self) -> None:
        self.closed = True
        self.close_ahead()
        self.pool.shutdown(wait=True)


def _run(encoder: VolumeEncoder, model: CollectionModel, ix: IndexFolder, src: Path,
         sources: list[VolumeSource], report: VolumeIngestReport, save_every: int,
         progress: bool, keep_paths: bool, start: float, web: DicomWeb | None = None
         ) -> StopRequest:
    from tqdm import tqdm

    from vlm.io.deid import default_pseudonymizer

    pseudo = default_pseudonymizer()
    root = src if src.is_dir() else src.parent
    # DICOM series first: of a series and its NIfTI copy, the one with DICOM metadata is kept
    sources = sorted(sources, key=lambda s: (s.kind != "dicom-series", s.where))
    known = ix.catalog.content_hashes(VOLUME)
    withheld = ix.catalog.withheld("hash")  # erased by request: never added back
    fetcher = None
    if web is not None:  # a series the collection holds is not fetched again
        held = ix.catalog.pseudonyms("series", VOLUME)
        erased = ix.catalog.withheld("series")
        fresh = []
        for vs in sources:
            name = pseudo("se", vs.remote.series) if vs.remote is not None else None
            if name is not None and name in erased:
                report.withheld += 1
            elif name is not None and name in held:
                report.already_indexed += 1
            else:
                fresh.append(vs)
        sources, fetcher = fresh, _SeriesFetcher(web)
    voxels = _known_voxels(ix)
    since_save = 0
    seen = 0
    with stop_on_signal("saving the index after this volume") as stop, \
            contextlib.closing(fetcher) if fetcher else contextlib.nullcontext():
        for i, vs in enumerate(tqdm(sources, unit="volume", dynamic_ncols=True,
                                    disable=not progress)):
            if stop:
                break
            seen += 1
            fetched = None
            try:
                if fetcher is not None and vs.remote is not None:
                    vs, fetched = fetcher.get(vs, sources[i + 1] if i + 1 < len(sources)
                                              else None)
                digest = content_hash(vs)
                if digest in withheld:
                    report.withheld += 1
                    continue
                if digest in known:
                    report.already_indexed += 1
                    continue
                volume = read_source(vs)
                problem = volume.content_problem()
                if problem:  # its vector would rank among the rest like any other volume's
                    raise RadLensError(f"{problem}: not indexed")
                voxel_digest = voxel_hash(volume)
                if voxel_digest in voxels:
                    raise _Duplicate(f"duplicate: the same voxels as {voxels[voxel_digest]}, "
                                     "already indexed (a copy in another format?); not "
                                     "indexed twice")
                t0 = time.time()
                enc = encoder.encode(volume)
                report.encode_seconds += time.time() - t0
                if not (np.isfinite(enc.vector).all() and np.abs(enc.vector).sum() > 0):
                    raise RadLensError("the volume encodes to a zero or non-finite vector "
                                       "(empty or constant volume?)")
                if vs.url:
                    uri = vs.url if keep_paths else pseudo("src", vs.url)
                else:
                    uri = (os.path.relpath(vs.path, root) if keep_paths
                           else pseudo("src", os.path.abspath(vs.path)))
                row = _row(ix.path, vs, volume, enc, digest, uri)
                row["extra"]["voxel_hash"] = voxel_digest
                ix.add(VOLUME, enc.vector[None], [row], model=model)
            except Exception as exc:
                report.failed.append(_failure(vs, exc))
                logger.info("skipped a volume: %s", report.failed[-1]["reason"])
                continue
            finally:
                if fetched is not None:
                    shutil.rmtree(fetched, ignore_errors=True)
            known.add(digest)
            voxels[voxel_digest] = vs.where
            report.added += 1
            since_save += 1
            if since_save >= save_every:
                ix.save()
                since_save = 0
        ix.save()
    report.interrupted, report.unread = bool(stop), len(sources) - seen
    report.seconds = round(time.time() - start, 3)
    report.encode_seconds = round(report.encode_seconds, 3)
    report.volumes_per_s = (round(report.added / report.seconds, 3)
                            if report.added and report.seconds else 0.0)
    return stop


def _row(ix_path: Path, vs: VolumeSource, volume: Volume, enc: VolumeEncoding, digest: str,
         uri: str | None) -> dict[str, Any]:
    """The catalog row of one volume (previews written into the index folder first)."""
    meta = volume.meta
    files = write_previews(ix_path, digest, volume.array, enc)
    extra = {k: v for k, v in vs.extra.items() if k != "modality"}
    extra.update(shape=list(volume.shape), spacing=[round(s, 4) for s in volume.spacing],
                 source_format=meta.source_format, score_kind=enc.score_kind,
                 salient=files["salient"], stack=files["stack"])
    if enc.findings:  # a lesion-seg model's per-location scores (model output, not labels)
        extra["findings"] = enc.findings
    if meta.patient_pseudonym:  # what `radlens index remove --patient` finds the volume by
        extra["patient"] = meta.patient_pseudonym
    return {"source_uri": uri, "content_hash": digest, "thumbnail": files["thumbnail"],
            "study": meta.study_pseudonym, "series": meta.series_pseudonym,
            "modality": meta.modality or vs.extra.get("modality"), "body_part": meta.body_part,
            "year": meta.study_year, "rows": volume.shape[1], "cols": volume.shape[2],
            "extra": extra}
