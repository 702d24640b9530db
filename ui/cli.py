"""The ``radlens`` command line. Errors a user can cause print one line, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from index.ingest import IngestReport
    from index.shard import Shard
    from index.volumes import VolumeIngestReport

app = typer.Typer(
    name="radlens",
    help="Query radiology archives with language.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

logger = logging.getLogger("radlens")


def _number_pair(text: str, sep: str, option: str) -> tuple[float, float]:
    """``"LO<sep>HI"`` as two floats, or a one-line error naming ``option``."""
    from vlm.errors import RadLensError

    parts = text.split(sep)
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise RadLensError(f"{option} {text!r}: expected two numbers LO{sep}HI") from None


def _path(value: str | Path) -> Path:
    """A path option's value (or its default); an empty one is refused (``Path("")`` is the
    current folder: ``--source ""`` used to index whatever folder the command ran in)."""
    if isinstance(value, Path):
        return value
    if not value.strip():
        raise typer.BadParameter("an empty path: give a file or folder")
    return Path(value)


def _source(value: str) -> str:
    """A ``--source`` value: a folder or file, or a DICOMweb server's http(s) URL (kept as
    text: a Path would fold its ``//``)."""
    if not value.strip():
        raise typer.BadParameter("an empty path: give a folder, a file or a DICOMweb URL")
    return value


def _source_arg(source: str) -> Path | str:
    """The source as ingestion takes it: a DICOMweb URL as text, anything else as a path."""
    from index.dicomweb import is_dicomweb

    return source if is_dicomweb(source) else Path(source)


def _out_folder(value: str | Path) -> Path:
    """An output folder option's value, refused up front when it, or a folder above it, is a
    file (training and evaluation found that out at their first write, minutes in)."""
    path = _path(value)
    for above in (path, *path.parents):
        if above.exists():
            if not above.is_dir():
                where = "" if above == path else f" (in {path})"
                raise typer.BadParameter(f"{above} is a file, not a folder{where}: give a new "
                                         "or existing folder")
            break
    return path


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Log progress to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from vlm.allocator import tune_allocator

    # most commands encode or train on the CPU: reuse freed activation memory (about 1.2x
    # the images/s of glibc's defaults here; RADLENS_MALLOC=default keeps those)
    logger.info("malloc: %s", tune_allocator().reason)


@app.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help="DICOM / PNG / JPEG files, NIfTI volumes or "
                                                     "DICOM series folders.")],
    out: Annotated[Path | None, typer.Option(help="Write a windowed PNG preview per file here.")
                   ] = None,
    window: Annotated[str | None, typer.Option(
        help="lung|mediastinum|bone|brain|abdomen|liver|subdural or CENTRE,WIDTH; default: the "
             "file's own VOI window")] = None,
    frame: Annotated[int, typer.Option(help="Frame of a multi-frame image to preview.")] = 0,
    with_identifiers: Annotated[bool, typer.Option(
        "--with-identifiers", help="Also print raw patient/study identifiers (off by default).")
    ] = False,
) -> None:
    """Print de-identified metadata (one JSON object per line) and write windowed previews."""
    from ui.inspect import inspect_paths

    failures = inspect_paths(files, out=out, window=window, frame=frame,
                             keep_identifiers=with_identifiers)
    if failures:
        raise typer.Exit(code=2)


data_app = typer.Typer(help="Proving-ground data sets (real report text, synthetic pixels).",
                       no_args_is_help=True)
train_app = typer.Typer(help="Training recipes.", no_args_is_help=True)
index_app = typer.Typer(help="Build, extend and describe vector indexes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(index_app, name="index")


def _ingest(model: str, source: Path | str, out: Path, batch_size: int, workers: int | None,
            progress: bool, keep_paths: bool = False, save_every: int = 512,
            device: str = "cpu", amp: str | None = None, allow_empty: bool = False,
            shard: Shard | None = None) -> bool:
    """Index the 2-D images; prints the summary line. Returns True if some files failed."""
    from index.ingest import ingest
    from vlm.errors import Interrupted
    from vlm.inference import Encoder, check_device

    encoder = Encoder(model, device=check_device(device), amp=amp)
    try:
        report = ingest(encoder, source, out, batch_size=batch_size, workers=workers,
                        progress=progress, keep_paths=keep_paths, save_every=save_every,
                        model_path=str(Path(model).resolve()) if Path(model).exists() else model,
                        allow_empty=allow_empty, shard=shard)
    except Interrupted as stopped:  # what was saved, then the one-line message
        _ingest_summary(stopped.report, out / "ingest_report.json")
        raise
    return _ingest_summary(report, out / "ingest_report.json")


def _ingest_summary(report: IngestReport | VolumeIngestReport, report_file: Path,
                    **extra: str) -> bool:
    """The failures on stderr and the summary line on stdout; True if some files failed."""
    for failure in report.failed:
        print(f"radlens: skipped: {_printable(str(failure['path']))}: "
              f"{_printable(str(failure['reason']))}", file=sys.stderr)
    print(json_line({k: v for k, v in report.to_dict().items() if k != "failed"}
                    | extra | {"failed": len(report.failed), "failures_report": str(report_file)}))
    return bool(report.failed)


def _ingest_volumes(volume_model: str, source: Path | str, out: Path, progress: bool,
                    keep_paths: bool = False, save_every: int = 16, device: str = "cpu",
                    required: bool = True, shard: Shard | None = None) -> bool:
    """Index the volumes; prints the summary line. Returns True if some volumes failed.
    A source without volumes is an error, unless not ``required`` (``index add`` with the
    index's own volume model: a folder of 2-D images only), where it is a one-line note."""
    from index.volumes import REPORT_FILE, VOLUME, NoVolumesError, ingest_volumes
    from vlm.errors import Interrupted
    from vlm.inference import check_device
    from vlm.volume_encoder import VolumeEncoder

    encoder = VolumeEncoder.load(volume_model, device=str(check_device(device)))
    names = {"collection": VOLUME, "model": encoder.name}
    try:
        report = ingest_volumes(encoder, source, out, progress=progress, keep_paths=keep_paths,
                                save_every=save_every, shard=shard)
    except NoVolumesError as none:
        if required:
            raise
        print(f"radlens: note: {none}; the volume collection is unchanged", file=sys.stderr)
        return False
    except Interrupted as stopped:
        _ingest_summary(stopped.report, out / REPORT_FILE, **names)
        raise
    return _ingest_summary(report, out / REPORT_FILE, **names)


AMP_HELP = ("Encode the images under autocast: bf16 (CPU with AVX-512 BF16 or AMX, or GPU) or "
            "fp16 (GPU). A whole build ran 1.86x faster on such a CPU, its vectors within "
            "cosine 0.9998 of an fp32 build's (README); default: the model's own precision.")
DEVICE_HELP = ("Where the image and volume encoders run: cpu, cuda or cuda:N (decoding "
               "stays on the CPU). The vectors do not depend on it beyond float rounding, so "
               "one index can be filled from either.")
VOLUME_MODEL_HELP = ("Volume encoder: a 'radlens train lecl', 'drasclr' or 'lesion-seg' run "
                     "folder, or random:lecl-tiny|lecl-small|drasclr-tiny|drasclr-small, "
                     "optionally with @SEED (a seeded random tower, the baseline).")


@index_app.command("build")
def index_build(
    source: Annotated[str, typer.Option(
        parser=_source, help="Folder of DICOM / PNG / JPEG files, NIfTI volumes and DICOM "
                             "series; or a DICOMweb server's URL (http[s]://host/dicom-web, "
                             "with an optional study query such as ?ModalitiesInStudy=CR), "
                             "whose image instances are fetched with WADO-RS.")],
    out: Annotated[Path, typer.Option(
        parser=_path, help="Index folder (created, or extended if it exists).")],
    model: Annotated[str | None, typer.Option(
        help="Checkpoint folder of the image encoder: indexes the 2-D images.")] = None,
    volume_model: Annotated[str | None, typer.Option(
        help=f"{VOLUME_MODEL_HELP} Indexes the volumes into the 'volume' collection.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per encoder batch.")] = 32,
    workers: Annotated[int | None, typer.Option(
        help="Decode processes; 0 decodes in this process (default: with a CPU encoder, chosen "
             "from the measured decode and encode cost of the first files; all cores but one "
             "with a GPU).")
                       ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    keep_paths: Annotated[bool, typer.Option(
        "--keep-paths", help="Store file paths (relative to SOURCE) in the catalog; by default "
                             "only keyed pseudonyms of them, as paths can hold names.")] = False,
    save_every: Annotated[int, typer.Option(help="Images between saved generations (a kill "
                                                 "loses at most this many).")] = 512,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    amp: Annotated[str | None, typer.Option(help=AMP_HELP)] = None,
    shard: Annotated[str | None, typer.Option(
        help="I/N: index only part I (0-based) of N of SOURCE, split by a hash of each file's "
             "path relative to SOURCE (a DICOMweb source: of each Study Instance UID), to "
             "merge later with 'radlens index merge'. The parts are disjoint and together "
             "cover SOURCE on any machine.")] = None,
    shards: Annotated[int | None, typer.Option(
        help="Build N shards through --engine, under --work-dir, and merge them into OUT "
             "(a rerun resumes the shards and adds only what OUT lacks).")] = None,
    engine: Annotated[str, typer.Option(
        help="Who runs the --shards builds: local[:P] (P at a time on this machine), "
             "dask:ADDRESS (a Dask scheduler; dask:local starts one here), ray[:ADDRESS] or "
             "spark[:MASTER]. Workers need RadLens, the models, SOURCE and --work-dir at the "
             "same paths, and the same RADLENS_SITE_SECRET.")] = "local",
    work_dir: Annotated[Path | None, typer.Option(
        parser=_path, help="Folder for the --shards indexes (shared storage for a cluster; "
                           "default: OUT.shards beside OUT).")] = None,
) -> None:
    """Index SOURCE into OUT; reruns add only what is missing.

    --model indexes every 2-D image (DICOM, PNG, JPEG; a CT series counts as one image per
    slice). --volume-model indexes every volume: NIfTI files (.nii, .nii.gz), DICOM series
    (grouped by series, at least 3 slices) and, in a PhantomCT folder, one volume per manifest
    row with its lesion labels; each gets one vector in the 'volume' collection (the mean of its
    LeCL slice embeddings taken relative to an air slice, or of its DrasCLR patch features,
    L2-normalised), a thumbnail and slice previews. Give either or both (images are indexed
    first). Exit 3 if some files or volumes could not be read (listed in OUT/ingest_report.json,
    OUT/volume_ingest_report.json, with the folders, FIFOs and broken links the walk could not
    read, the short series and second copies of a series or of a volume's voxels; linked
    folders are followed); exit 2, with no index created or changed, if SOURCE holds no image
    (--model alone) or --volume-model finds no volume at all.
    """
    from index.shard import Shard
    from vlm.errors import RadLensError

    if model is None and volume_model is None:
        raise RadLensError("give --model (2-D images), --volume-model (volumes) or both")
    if shard is not None and shards is not None:
        raise RadLensError("give --shard I/N (build one part here) or --shards N (build all "
                           "parts through --engine), not both")
    src = _source_arg(source)
    if shards is not None:
        _build_shards(src, out, shards, engine, work_dir, progress, model=model,
                      volume_model=volume_model, batch_size=batch_size, workers=workers,
                      keep_paths=keep_paths, save_every=save_every, device=device, amp=amp)
        return
    part = Shard.parse(shard) if shard is not None else None
    failed = False
    if model is not None:
        failed |= _ingest(model, src, out, batch_size, workers, progress, keep_paths,
                          save_every, device, amp, allow_empty=volume_model is not None
                          or part is not None, shard=part)
    if volume_model is not None:
        failed |= _ingest_volumes(volume_model, src, out, progress, keep_paths,
                                  device=device, shard=part)
    if failed:
        raise typer.Exit(code=3)


def _build_shards(source: Path | str, out: Path, shards: int, engine: str,
                  work_dir: Path | None, progress: bool, **options: Any) -> None:
    """``index build --shards``: the shard builds through the engine, then the merge; prints
    each unfinished shard's last error line and the summary. Exit 3 if a shard did not finish
    or some files could not be read."""
    from index.distributed import build_distributed

    work = work_dir or out.with_name(out.name + ".shards")
    report = build_distributed(source, out, shards=shards, work_dir=work, engine=engine,
                               progress=progress, **options)
    for r in report.shards:
        if r["shard"] in report.unfinished:
            last = (r["stderr"].strip().splitlines() or [f"exit code {r['rc']}"])[-1]
            print(f"radlens: shard {r['shard']} did not finish ({r['out']}): "
                  f"{_printable(last)}", file=sys.stderr)
    merged = report.merge
    for failure in merged.get("failed", []):
        print(f"radlens: skipped: {_printable(str(failure['path']))}: "
              f"{_printable(str(failure['reason']))}", file=sys.stderr)
    print(json_line({"engine": report.engine, "shards": shards, "work_dir": str(work),
                     "unfinished": report.unfinished, "added": merged.get("added", {}),
                     "duplicates": merged.get("duplicates", {}),
                     "failed": len(merged.get("failed", [])),
                     "bad_shards": len(merged.get("bad_shards", [])),
                     "seconds": report.seconds,
                     "merge_report": str(out / "merge_report.json")}))
    if report.unfinished or merged.get("failed") or merged.get("bad_shards"):
        raise typer.Exit(code=3)


@index_app.command("merge")
def index_merge(
    out: Annotated[Path, typer.Option(
        parser=_path, help="Index folder to merge into (created, or extended if it exists).")],
    shards: Annotated[list[Path], typer.Argument(
        parser=_path, help="Index folders to merge: the shards of one 'index build --shard' "
                           "split, or any indexes of the same models.")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Merge index folders into OUT with fresh ids; rows OUT already holds (same content hash)
    are counted as duplicates and left out, so a rerun adds nothing. Every index must have the
    same models and site secret (exit 2, OUT untouched, otherwise). Each shard is saved as one
    generation; a damaged shard is passed over and listed in OUT/merge_report.json with the
    shards' unreadable files (exit 3)."""
    from index.merge import MERGE_REPORT, merge_indexes

    report = merge_indexes(shards, out, progress=progress)
    for bad in report.bad_shards:
        print(f"radlens: shard passed over: {_printable(bad['path'])}: "
              f"{_printable(bad['reason'])}", file=sys.stderr)
    print(json_line({"out": str(out), "shards": len(report.shards), "added": report.added,
                     "duplicates": report.duplicates, "bad_shards": len(report.bad_shards),
                     "failed": len(report.failed), "missing_files": report.missing_files,
                     "seconds": report.seconds, "merge_report": str(out / MERGE_REPORT)}))
    if report.bad_shards or report.failed:
        raise typer.Exit(code=3)


@index_app.command("add")
def index_add(
    index: Annotated[Path, typer.Option(parser=_path, help="Existing index folder.")],
    source: Annotated[str, typer.Option(
        parser=_source, help="Folder of DICOM / PNG / JPEG files, or a DICOMweb URL (see "
                             "'index build').")],
    model: Annotated[str | None, typer.Option(help="Model (default: the one of the index).")
                     ] = None,
    volume_model: Annotated[str | None, typer.Option(
        help="Volume model (default: the one of the index's volume collection, if any).")
    ] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    workers: Annotated[int | None, typer.Option()] = None,
    progress: Annotated[bool, typer.Option()] = True,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "cpu",
    amp: Annotated[str | None, typer.Option(help=AMP_HELP)] = None,
) -> None:
    """Add the images (and, with a volume collection, the volumes) under SOURCE to an existing
    index (same models required). Exit 3 if some could not be read."""
    from index.folder import IndexFolder
    from index.volumes import VOLUME
    from vlm.errors import RadLensError

    ix = IndexFolder.open(index)
    recorded = ix.manifest.get("preprocessing", {}).get("model_path")
    recorded_volume = (ix.collection_model(VOLUME).source if VOLUME in ix.collections()
                       else None)
    ix.close()
    src = _source_arg(source)
    chosen, chosen_volume = model or recorded, volume_model or recorded_volume
    if not chosen and not chosen_volume:
        raise RadLensError(f"index {index} records no model path: pass --model")
    failed = False
    if chosen:
        failed |= _ingest(chosen, src, index, batch_size, workers, progress,
                          device=device, amp=amp, allow_empty=bool(chosen_volume))
    if chosen_volume:
        failed |= _ingest_volumes(chosen_volume, src, index, progress, device=device,
                                  required=volume_model is not None)
    if failed:
        raise typer.Exit(code=3)


@index_app.command("remove")
def index_remove(
    index: Annotated[Path, typer.Argument(parser=_path, help="Index folder.")],
    patient: Annotated[list[str] | None, typer.Option(
        help="A patient to erase: its pt-... pseudonym or PatientID (repeatable).")] = None,
    study: Annotated[list[str] | None, typer.Option(
        help="A study: st-... pseudonym or StudyInstanceUID (repeatable).")] = None,
    series: Annotated[list[str] | None, typer.Option(
        help="A series: se-... pseudonym or SeriesInstanceUID (repeatable).")] = None,
    instance: Annotated[list[str] | None, typer.Option(
        help="An image: im-... pseudonym or SOPInstanceUID (repeatable).")] = None,
    file: Annotated[list[Path] | None, typer.Option(
        parser=_path, help="A file, or a folder of files, whose images or volumes to erase "
                           "(found by content and path; repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only count what would be erased.")] = False,
    allow_readd: Annotated[bool, typer.Option(
        help="Let later builds add the erased items back (default: they are withheld).")
    ] = False,
) -> None:
    """Erase patients, studies, series, images or files from an index: catalog rows (securely
    deleted), vectors, regions, thumbnails and previews, and the older generations that held
    them. Later builds, DICOMweb pulls and merges into this index skip what was erased unless
    --allow-readd. Exit 3 when an identifier or file matched nothing (listed on stderr, by
    pseudonym); the rest is erased. Shards and copies of the index are separate indexes:
    erase from each."""
    from index.remove import remove_items

    report = remove_items(index, patients=patient or (), studies=study or (),
                          series=series or (), instances=instance or (), files=file or (),
                          withhold=not allow_readd, dry_run=dry_run)
    for what in report.unmatched:
        print(f"radlens: matched nothing: {_printable(what)}", file=sys.stderr)
    print(json_line(report.to_dict()))
    if report.unmatched:
        raise typer.Exit(code=3)


@index_app.command("verify")
def index_verify(index: Annotated[Path, typer.Argument(parser=_path, help="Index folder.")]
                 ) -> None:
    """Check an index end to end, read-only: every file's checksum, every catalog row against
    its vector and the faiss index, regions against their images, and the files rows point at.
    Prints a JSON report; each problem is also a stderr line, and any problem is exit 3 (a
    checksum failure: exit 2, as for every command)."""
    from index.verify import verify

    report = verify(index)
    for problem in report["problems"]:
        print(f"radlens: index problem: {_printable(problem)}", file=sys.stderr)
    print(json_line(report))
    if not report["ok"]:
        raise typer.Exit(code=3)


@index_app.command("rebuild")
def index_rebuild(
    index: Annotated[Path, typer.Argument(parser=_path, help="Index folder.")],
    collection: Annotated[list[str] | None, typer.Option(
        help="Collection to rebuild (repeatable; default: every one).")] = None,
    factory: Annotated[str | None, typer.Option(
        help="faiss factory string to rebuild as, or 'auto' to have it chosen by size again "
             "(and again as the collection grows). Default: the collection's own.")] = None,
) -> None:
    """Rebuild collections' faiss indexes from their stored vectors: retrained on every
    current row, removed rows dropped, optionally as another factory (--factory auto makes a
    collection follow its size again: older RadLens versions fixed an automatic collection's
    factory at its first rebuild). Saved as one new generation; on any error (exit 2) the
    index is left as it was."""
    from index.folder import IndexFolder
    from vlm.errors import RadLensError

    if factory is not None and not factory.strip():
        raise RadLensError("--factory must not be empty")
    with IndexFolder.open(index, mode="w") as ix:
        rebuilt = ix.rebuild(collection, factory)
        generation = ix.save()
    print(json_line({"index": str(index), "generation": generation, "collections": rebuilt}))


@index_app.command("info")
def index_info(index: Annotated[Path, typer.Argument(parser=_path, help="Index folder.")]
               ) -> None:
    """Counts, model, factory strings and files of an index."""
    from index.folder import IndexFolder

    ix = IndexFolder.open(index)
    try:
        print(json.dumps(ix.info(), indent=1, default=str))
    finally:
        ix.close()


@app.command()
def search(
    index: Annotated[Path, typer.Option(parser=_path, help="Index folder.")],
    text: Annotated[str | None, typer.Option(help="Report text or finding phrase.")] = None,
    image: Annotated[Path | None, typer.Option(help="Query image file.")] = None,
    volume: Annotated[Path | None, typer.Option(
        help="Query volume: a NIfTI file or a folder with one DICOM series; returns similar "
             "volumes of the index's 'volume' collection (the query's own row left out).")
    ] = None,
    # at most a million: -k 10000000000 allocated 74.5 GiB of result slots (internal error)
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=1_000_000,
                                   help="Number of results (1 to 1,000,000).")] = 10,
    filter_: Annotated[list[str] | None, typer.Option(
        "--filter", help="KEY=VALUE, repeatable: modality=CR, view=PA,AP, body_part=CHEST, "
                         "year=2010, year=2005-2010, year_min=2010, year_max=2015.")] = None,
    model: Annotated[str | None, typer.Option(help="Model (default: the index's).")] = None,
    volume_model: Annotated[str | None, typer.Option(
        help="Volume model (default: the one recorded with the volume collection).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per result.")
                       ] = False,
    contrast: Annotated[str | None, typer.Option(
        help="Text a --text query is contrasted with (rank by similarity to the query minus "
             "similarity to this; default: a normal study).")] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Rank a --text query by plain cosine, without the contrast.")] = False,
) -> None:
    """Search an index by text, by image, or by volume."""
    from index.engine import Engine, parse_filters
    from vlm.errors import RadLensError

    if sum(q is not None for q in (text, image, volume)) != 1:
        raise RadLensError("give exactly one of --text, --image or --volume")
    if (contrast is not None or raw) and text is None:
        raise RadLensError("--contrast and --raw rank --text queries; an --image or --volume "
                           "query takes neither")
    if contrast is not None and raw:
        raise RadLensError("give --contrast TEXT or --raw, not both (--raw ranks by plain "
                           "cosine, without a contrast)")
    if contrast is not None and not contrast.strip():
        raise RadLensError("--contrast is empty: give the sentence to contrast with, or leave "
                           "it out for the normal study")
    filters = parse_filters(filter_ or [])
    if volume is not None:
        _search_volume(index, volume, k, filters, volume_model, as_json)
        return
    engine = Engine.open(index, model=model)
    if text is not None:
        from index.engine import NORMAL_REFERENCE

        results = engine.search_text(text, k=k, contrast=None if raw else
                                     (NORMAL_REFERENCE if contrast is None else contrast),
                                     **filters)
    else:
        results = engine.search_image(image, k=k, **filters)  # type: ignore[arg-type]
    if not results:
        _no_results(filters)
    for rank, r in enumerate(results, 1):
        if as_json:
            print(json_line({"rank": rank, **r.to_dict()}))
        else:
            it = r.item
            print(_printable(f"{rank:3d}  {r.score:+.4f}  {it.study if it else '?'}  "
                             f"{(it.modality or '-') if it else ''}  "
                             f"{(it.view or '-') if it else ''}  {it.source_uri if it else ''}"))


def _no_results(filters: dict[str, object]) -> None:
    """Say why nothing was printed (on stderr: --json output stays empty); exit status 0."""
    why = (f"no indexed item matches the filters {json.dumps(filters, sort_keys=True)}"
           if filters else "the index holds nothing to return")
    print(f"radlens: no results: {why}", file=sys.stderr)


def _search_volume(index: Path, volume: Path, k: int, filters: dict[str, object],
                   volume_model: str | None, as_json: bool) -> None:
    from index.volume_search import VolumeSearch

    vs = VolumeSearch.open(index, model=volume_model)
    try:
        hits = vs.search(vs.query_path(volume), k=k, **filters)
    finally:
        vs.close()
    if not hits:
        _no_results(filters)
    for rank, h in enumerate(hits, 1):
        it = h.item
        if as_json:
            print(json_line({"rank": rank, "id": h.id, "score": round(h.score, 6),
                             "item": it.to_dict() if it else None}))
        else:
            extra = (it.extra or {}) if it else {}
            labels = ",".join(extra.get("labels") or []) or "-"
            shape = "x".join(str(v) for v in extra.get("shape") or []) or "?"
            print(_printable(f"{rank:3d}  {h.score:+.4f}  {it.study if it and it.study else '-'}  "
                             f"{(it.modality or '-') if it else ''}  {shape}  {labels}  "
                             f"{it.source_uri if it else ''}"))


@data_app.command("phantom-cxr")
def data_phantom_cxr(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    n: Annotated[int | None, typer.Option(min=1, help="Number of studies (default: all "
                                                       "reports).")
                 ] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 512,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    workers: Annotated[int | None, typer.Option(
        help="Worker processes; 0 renders in this process (default: all cores).")] = None,
    contact_sheet: Annotated[bool, typer.Option(help="Also write contact_sheet.png.")] = True,
) -> None:
    """PhantomCXR: real IU reports and MeSH labels, rendered radiographs, exact masks."""
    from vlm.data.phantom_cxr import generate_phantom_cxr, make_contact_sheet

    summary = generate_phantom_cxr(out, n=n, size=size, seed=seed, workers=workers)
    if contact_sheet:
        summary["contact_sheet"] = str(make_contact_sheet(out))
    print(json_line(summary))


@data_app.command("phantom-ct")
def data_phantom_ct(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    n: Annotated[int, typer.Option(min=1, help="Number of volumes.")] = 100,
    shape: Annotated[str, typer.Option(help="Z,Y,X voxels.")] = "128,128,128",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    workers: Annotated[int | None, typer.Option(
        help="Worker processes; 0 renders in this process (default: all cores).")] = None,
    contact_sheet: Annotated[bool, typer.Option(help="Also write contact_sheet.png.")] = True,
) -> None:
    """PhantomCT: chest-abdomen CT volumes with lesions, emphysema and anatomical coordinates."""
    from vlm.data.phantom_ct import generate_phantom_ct, make_contact_sheet
    from vlm.errors import RadLensError

    try:
        zyx = tuple(int(v) for v in shape.split(","))
    except ValueError:
        raise RadLensError(f"--shape must be Z,Y,X integers, got '{shape}'") from None
    if len(zyx) != 3 or min(zyx) < 16:
        raise RadLensError(f"--shape must be three sizes >= 16, got '{shape}'")
    summary = generate_phantom_ct(out, n=n, shape=zyx, seed=seed, workers=workers)
    if contact_sheet:
        summary["contact_sheet"] = str(make_contact_sheet(out))
    print(json_line(summary))


@train_app.command("lrclr")
def train_lrclr_cmd(
    data: Annotated[Path, typer.Option(help="PhantomCXR-style folder with manifest.jsonl.")],
    out: Annotated[Path, typer.Option(
        parser=_out_folder, help="Run folder (best/, last/, train_state.pt).")],
    model: Annotated[str, typer.Option(help="Model config name or JSON.")] = "lrclr-r18",
    pretrained: Annotated[str | None, typer.Option(
        help="Start from weights: RadLens checkpoint or open_clip weights (path, local-dir:, "
             "hf-hub:).")] = None,
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    lr: Annotated[float, typer.Option()] = 5e-4,
    warmup_steps: Annotated[int, typer.Option()] = 50,
    max_steps: Annotated[int | None, typer.Option()] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this wall time.")
                           ] = None,
    save_every: Annotated[int, typer.Option(help="Steps between resumable states.")] = 50,
    val_every: Annotated[int, typer.Option(help="Steps between validations (0: per epoch).")
                         ] = 0,
    amp: Annotated[str | None, typer.Option(help="bf16 or fp16 mixed precision.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int | None, typer.Option(
        help="Decode processes for the image cache; 0 decodes in this process (default: all "
             "cores).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train LRCLR (or the plain-CLIP baseline config); resumes if OUT has a saved state."""
    from vlm.inference import check_device
    from vlm.train.loop import TrainConfig
    from vlm.train.lrclr import train_lrclr

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      warmup_steps=warmup_steps, max_steps=max_steps, max_minutes=max_minutes,
                      save_every=save_every, val_every=val_every, amp=amp,
                      device=check_device(device),
                      seed=seed, progress=progress)
    summary = train_lrclr(data, model, out, cfg, pretrained=pretrained, workers=workers)
    print(json_line({k: v for k, v in summary.items() if k != "history"}))


@train_app.command("lecl")
def train_lecl_cmd(
    data: Annotated[Path, typer.Option(help="PhantomCT-style folder with manifest.jsonl.")],
    out: Annotated[Path, typer.Option(parser=_out_folder, help="Run folder.")],
    lesion_weight: Annotated[float, typer.Option(help="w of LeCL; 0 = plain MoCo v3.")] = 10.0,
    preset: Annotated[str, typer.Option(help="Model size preset (tiny|small|r18).")] = "small",
    epochs: Annotated[int, typer.Option()] = 20,
    batch_size: Annotated[int, typer.Option()] = 32,
    max_minutes: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate (default: the recipe's 3e-4, as eval-volumes).")] = None,
    splits: Annotated[str | None, typer.Option(
        help="Comma-separated manifest splits whose volumes (and lesion boxes) pre-train the "
             "encoder (default: train,test); 'val' is always the validation set.")] = None,
) -> None:
    """Pre-train the CLEAR slice encoder with lesion-enhanced contrast (LeCL)."""
    from vlm.data.ct_dataset import CTDataset
    from vlm.errors import RadLensError
    from vlm.train.lecl import default_train_config, lecl_config, train_lecl

    ds = CTDataset(data)
    try:
        volumes = ds.volumes_in(splits.split(",")) if splits else ds.volumes_in()
    except RadLensError as exc:
        raise RadLensError(f"--splits: {exc}") from None
    cfg = default_train_config(epochs=epochs, batch_size=batch_size, max_minutes=max_minutes,
                               seed=seed, progress=True, **({} if lr is None else {"lr": lr}))
    summary = train_lecl(ds, out, lecl_config(preset, lesion_weight=lesion_weight),
                         lesion_weight=lesion_weight, train=cfg, volumes=volumes)
    print(json_line({k: v for k, v in summary.items() if k != "history"}))


@train_app.command("drasclr")
def train_drasclr_cmd(
    data: Annotated[Path, typer.Option(help="PhantomCT-style folder with manifest.jsonl.")],
    out: Annotated[Path, typer.Option(parser=_out_folder, help="Run folder.")],
    plain: Annotated[bool, typer.Option("--plain", help="Unconditioned convolutions "
                                                        "(the baseline).")] = False,
    preset: Annotated[str, typer.Option(help="Model size preset (tiny|small).")] = "small",
    epochs: Annotated[int, typer.Option()] = 20,
    batch_size: Annotated[int, typer.Option()] = 32,
    max_minutes: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Pre-train DrasCLR (anatomy-conditioned 3D CNN) on patch lattices."""
    from vlm.train.drasclr import default_train_config, drasclr_config, train_drasclr

    cfg = default_train_config(epochs=epochs, batch_size=batch_size, max_minutes=max_minutes,
                               seed=seed, progress=True)
    summary = train_drasclr(data, out, drasclr_config(preset, conditional=not plain),
                            conditional=not plain, train=cfg)
    print(json_line({k: v for k, v in summary.items() if k != "history"}))


def _location_numbers(items: list[str] | None, option: str) -> dict[str, float]:
    """``LOCATION=NUMBER`` option values as a dict (the task checks names and ranges)."""
    from vlm.errors import RadLensError

    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:  # no '=' leaves value empty, which float() refuses too
            out[name.strip()] = float(value)
        except ValueError:
            raise RadLensError(f"{option} {item!r}: expected LOCATION=NUMBER") from None
    return out


@train_app.command("lesion-seg")
def train_lesionseg_cmd(
    data: Annotated[Path, typer.Option(help="PhantomCT-style folder with manifest.jsonl and "
                                            "lesion masks.")],
    out: Annotated[Path, typer.Option(
        parser=_out_folder, help="Run folder (best/, last/, train_state.pt).")],
    width: Annotated[int, typer.Option(help="Channels of the first block.")] = 16,
    epochs: Annotated[int, typer.Option(help="Epochs of 100 steps.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Crops per step.")] = 4,
    crop: Annotated[int, typer.Option(help="Side of the training crops (voxels).")] = 48,
    lr: Annotated[float, typer.Option()] = 2e-3,
    max_minutes: Annotated[float | None, typer.Option()] = None,
    val_every: Annotated[int, typer.Option(help="Steps between validations.")] = 500,
    seed: Annotated[int, typer.Option()] = 0,
    splits: Annotated[str, typer.Option(
        help="Comma-separated manifest splits whose volumes and masks train the model; 'val' "
             "is always the validation set.")] = "train",
    window: Annotated[list[str] | None, typer.Option(
        help="HU window LO:HI of one input channel, repeatable, e.g. --window=-160:240 "
             "--window=-1000:400 (the default pair).")] = None,
    location_weight: Annotated[list[str] | None, typer.Option(
        help="LOCATION=W: draw lesion crops of that location W times as often as the others "
             "(default 1 each), repeatable, e.g. --location-weight liver=3.")] = None,
    copy_paste: Annotated[list[str] | None, typer.Option(
        help="LOCATION=P: a lesion crop of that location is, with probability P, one of its "
             "training lesions pasted into matching tissue of another training volume at "
             "another lesion's body-frame position (default off), repeatable, e.g. "
             "--copy-paste liver=0.5.")] = None,
) -> None:
    """Train the supervised 3-D lesion segmenter whose per-location lesion profile is a volume
    vector for finding-level similar-case search (--volume-model RUN)."""
    from vlm.data.ct_dataset import CTDataset
    from vlm.errors import RadLensError
    from vlm.models.lesionseg import LesionSegConfig
    from vlm.train.lesionseg import default_train_config, train_lesionseg

    ds = CTDataset(data)
    try:
        volumes = ds.volumes_in(splits.split(","))
    except RadLensError as exc:
        raise RadLensError(f"--splits: {exc}") from None
    cfg = default_train_config(epochs=epochs, batch_size=batch_size, lr=lr,
                               max_minutes=max_minutes, val_every=val_every, seed=seed,
                               progress=True)
    model_cfg = LesionSegConfig(width=width)
    if window:
        model_cfg = dataclasses.replace(model_cfg, windows=tuple(
            _number_pair(w, ":", "--window") for w in window))
    summary = train_lesionseg(ds, out, model_cfg, cfg, volumes=volumes, crop=crop,
                              samples_per_epoch=100 * batch_size,
                              location_weights=_location_numbers(location_weight,
                                                                 "--location-weight"),
                              paste=_location_numbers(copy_paste, "--copy-paste"))
    print(json_line({k: v for k, v in summary.items() if k != "history"}))


@train_app.command("clear")
def train_clear_cmd(
    data: Annotated[Path, typer.Option(help="PhantomCT-style folder with manifest.jsonl.")],
    slice_model: Annotated[Path, typer.Option(help="LeCL run or checkpoint folder.")],
    out: Annotated[Path | None, typer.Option(
        parser=_out_folder, help="Where clear_mil.pt goes (default: the slice-model folder, "
                                 "where the volume encoder finds it).")] = None,
    epochs: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float, typer.Option()] = 1e-3,
    batch_size: Annotated[int, typer.Option()] = 16,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the CLEAR lesion-location ABMIL on a LeCL encoder's slice embeddings."""
    import dataclasses

    from vlm.eval.volumes import SMALL_DATA_CLEAR
    from vlm.train.clear import train_clear_head

    cfg = dataclasses.replace(SMALL_DATA_CLEAR, epochs=epochs, lr=lr, batch_size=batch_size)
    summary = train_clear_head(data, slice_model, out or slice_model, cfg, seed=seed)
    print(json_line({k: v for k, v in summary.items() if k != "config"}))


@app.command("eval-volumes")
def eval_volumes_cmd(
    data: Annotated[Path, typer.Option(help="PhantomCT-style folder with manifest.jsonl.")],
    out: Annotated[Path, typer.Option(
        parser=_out_folder, help="Output folder (JSON + markdown table).")],
    budget_minutes: Annotated[float, typer.Option(help="Total pre-training budget, split "
                                                       "equally over the four encoders.")
                              ] = 20.0,
    folds: Annotated[int, typer.Option()] = 5,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """CLEAR+LeCL, CLEAR+MoCo v3, DrasCLR, DrasCLR plain and a random tower, 5-fold CV."""
    from vlm.eval.volumes import results_table, run_volume_benchmark

    result = run_volume_benchmark(data, out, budget_minutes=budget_minutes, folds=folds,
                                  seed=seed)
    print(results_table(result))


@app.command("export-model")
def export_model(
    checkpoint: Annotated[Path, typer.Option(help="Trained checkpoint folder (run/best).")],
    out: Annotated[Path, typer.Option(help="Where the shipped checkpoint goes.")],
    eval_dir: Annotated[Path | None, typer.Option(
        help="'radlens eval --out' folder: its calibration and metrics join the card.")] = None,
    half: Annotated[bool, typer.Option("--half/--full", help="Store float16 weights.")] = True,
    command: Annotated[list[str] | None, typer.Option(
        help="A command that made the model (repeat; goes into the card).")] = None,
    note: Annotated[str | None, typer.Option(
        help="A paragraph for the top of the card (e.g. which floors it misses).")] = None,
) -> None:
    """Package a trained checkpoint for shipping (float16, calibration, model card)."""
    from vlm.models.checkpoint import export_checkpoint

    path = export_checkpoint(checkpoint, out, half=half, eval_dir=eval_dir, note=note,
                             commands=command)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(json_line({"checkpoint": str(path), "bytes": size}))


@app.command("export-volume-model")
def export_volume_model_cmd(
    run: Annotated[Path, typer.Option(help="LeCL run or checkpoint folder (with clear_mil.pt "
                                           "from 'radlens train clear', if any), or a "
                                           "'radlens train lesion-seg' run.")],
    out: Annotated[Path, typer.Option(help="Where the shipped volume model goes.")],
    benchmark: Annotated[Path | None, typer.Option(
        help="volume_benchmark.json of 'radlens eval-volumes' for the model card.")] = None,
    command: Annotated[list[str] | None, typer.Option(
        help="A command that made the model (repeat; goes into the card).")] = None,
    note: Annotated[list[str] | None, typer.Option(
        help="A line for the card's Notes section (repeat).")] = None,
    with_head: Annotated[bool, typer.Option(
        "--with-head/--without-head", help="Ship the run's CLEAR ABMIL (clear_mil.pt).")
                         ] = True,
    top_k: Annotated[int | None, typer.Option(
        help="Lesion-seg runs: per-location volume score = mean of the K highest lesion "
             "probabilities (default: the run's, 20; 1 = the largest).")] = None,
) -> None:
    """Package a LeCL slice encoder (+ CLEAR ABMIL) or a lesion-seg run for shipping (float16,
    model card; for a lesion-seg run, --benchmark takes a volume_retrieval.json)."""
    from vlm.volume_encoder import export_volume_model

    path = export_volume_model(run, out, benchmark=benchmark, commands=command,
                               with_head=with_head, notes=note, top_k=top_k)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(json_line({"checkpoint": str(path), "bytes": size}))


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Checkpoint folder (or config name).")],
    data: Annotated[Path, typer.Option(help="PhantomCXR-style folder with manifest.jsonl.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    out: Annotated[Path | None, typer.Option(
        parser=_out_folder, help="Write eval.json, eval.md and plots here.")
                   ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt-set JSON (default: built-in).")
                       ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
                       ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Zero-shot AUC, retrieval recall@K (exact and label-matched) and grounding scores."""
    from vlm.eval.lrclr import evaluate, markdown_table
    from vlm.inference import check_device
    from vlm.zeroshot import PromptSet

    result = evaluate(model, data, split=split, out_dir=out,
                      prompts=PromptSet.load(prompts) if prompts else None,
                      device=check_device(device))
    print(json_line(result) if as_json else markdown_table(result))


@app.command()
def serve(
    index: Annotated[Path, typer.Option(help="Index folder to serve.")],
    host: Annotated[str, typer.Option(help="Bind address (default: this machine only).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    auth_file: Annotated[Path | None, typer.Option(
        help="File of 'user:hash' lines (python -m ui.serve hash-password).")] = None,
    model: Annotated[str | None, typer.Option(help="Model (default: the index's).")] = None,
    max_upload_mb: Annotated[int, typer.Option(help="Largest accepted upload.")] = 50,
    ingest_root: Annotated[list[str] | None, typer.Option(
        help="Folders, or DICOMweb service roots (http[s]://host/dicom-web), the Index tab "
             "may build from (off unless given).")] = None,
    allow_unauthenticated: Annotated[bool, typer.Option(
        "--allow-unauthenticated",
        help="Serve beyond this machine (--host 0.0.0.0) without --auth-file.")] = False,
) -> None:
    """Serve the RadLens app for an index (127.0.0.1 unless --host says otherwise; any other
    host needs --auth-file or --allow-unauthenticated)."""
    from ui.serve import serve as run_server

    run_server(index, host=host, port=port, auth_file=auth_file, model=model,
               max_upload_mb=max_upload_mb, allow_unauthenticated=allow_unauthenticated,
               ingest_roots=list(ingest_root) if ingest_root else None)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(
        parser=_out_folder, help="Folder for the demo data and index.")
                   ] = Path("data/demo"),
    model: Annotated[Path | None, typer.Option(help="Checkpoint (default: the shipped one).")
                     ] = None,
    port: Annotated[int, typer.Option()] = 7860,
    serve_app: Annotated[bool, typer.Option("--serve/--no-serve",
                                            help="Open the app when the index is ready.")
                         ] = True,
    reader_only: Annotated[bool, typer.Option(
        "--reader-only", help="Only read the real sample DICOM files and write previews.")
    ] = False,
) -> None:
    """The embedded default: PhantomCXR test split + real DICOM, indexed with the shipped
    model, served on 127.0.0.1. Later runs reuse what was built."""
    from ui.demo import SHIPPED_MODEL, build_demo_index, run_demo

    if reader_only:
        if run_demo(out / "reader"):
            raise typer.Exit(code=2)
        return
    from vlm.errors import RadLensError

    checkpoint = model or SHIPPED_MODEL
    if not (checkpoint / "config.json").is_file():
        raise RadLensError(f"no checkpoint at {checkpoint}: train one with 'radlens train "
                           "lrclr' (see README) or pass --model")
    if serve_app:  # a busy port is found now, not after the build
        from ui.serve import check_port

        check_port("127.0.0.1", port)
    index = build_demo_index(out, checkpoint)
    if serve_app:
        from ui.serve import serve as run_server

        print(f"demo: serving {index} on http://127.0.0.1:{port} (Ctrl-C to stop)")
        run_server(index, host="127.0.0.1", port=port, model=str(checkpoint))


#: 128 + SIGINT: what typer returns for a KeyboardInterrupt
INTERRUPTED_EXIT = 130


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line per user error, exit codes 0 ok / 1 internal / 2 user error."""
    from typer.exceptions import Abort, Exit, TyperException

    from vlm.errors import Interrupted, RadLensError

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="radlens", standalone_mode=False)
        if result == INTERRUPTED_EXIT and not isinstance(result, bool):
            # typer turns a KeyboardInterrupt into this exit code without a word
            print("radlens: interrupted", file=sys.stderr)
        if isinstance(result, int) and not isinstance(result, bool):
            return result
    except Exit as exc:
        return int(exc.exit_code)
    except TyperException as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"radlens: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except Abort:
        print("radlens: aborted", file=sys.stderr)
        return 130
    except Interrupted as exc:  # "interrupted: what was saved, how to continue"
        print(f"radlens: {exc}", file=sys.stderr)
        return exc.exit_code
    except RadLensError as exc:
        print(f"radlens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("radlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("RADLENS_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.filename is not None:
            # a folder that cannot be written, a full disk, a read-only file system: the
            # environment, not a bug (a save in progress leaves the last generation intact)
            print(f"radlens: error: {_printable(str(exc.filename))}: "
                  f"{exc.strerror or type(exc).__name__}", file=sys.stderr)
            return 2
        if _is_storage_error(exc):
            print(f"radlens: error: index catalog: {exc} (check the index folder's permissions "
                  "and free space)", file=sys.stderr)
            return 2
        text = " ".join(str(exc).split())[:300]
        print(f"radlens: internal error: {type(exc).__name__}: {text} "
              "(set RADLENS_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


def _is_storage_error(exc: BaseException) -> bool:
    """An SQLite error about the disk rather than the SQL: read-only, full, unopenable."""
    import sqlite3

    words = ("readonly", "disk", "unable to open", "disk I/O", "database is locked")
    return isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in words)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: a file name holding a newline cannot forge
    extra output lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def json_line(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=False, default=str)


if __name__ == "__main__":
    sys.exit(main())
