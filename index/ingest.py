"""Fill an index from a folder archive: walk -> decode (worker processes) -> encode (batches)
-> add image and region vectors with catalog rows -> save generations as it goes.

Resumable and idempotent: every file's content hash (sha256 of its bytes) is looked up in the
catalog before decoding, so a rerun, or a restart after a kill, adds only what is missing; a
generation is saved every ``save_every`` images, so a kill loses at most that much work and
never the previous index. A bad file never stops the run: it is listed once in the failures
report (``ingest_report.json`` in the index folder) with its reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index.dicomweb import DicomWeb, DicomWebError, is_dicomweb, list_instances
from index.folder import IndexFolder, bind_pseudonyms, is_index_folder
from index.shard import Shard, shard_key
from index.walk import folders
from vlm.allocator import tune_allocator
from vlm.cpus import available_cpus
from vlm.errors import ImageReadError, Interrupted, ManifestError, RadLensError
from vlm.inference import Encoder
from vlm.interrupt import StopRequest, ignore_stop_signals, interrupt_for_test, stop_on_signal
from vlm.models.config import PreprocessConfig

logger = logging.getLogger(__name__)

IMAGE, REGION = "image", "region"
KILL_ENV = "RADLENS_TEST_KILL_AFTER_SAVES"  # tests: SIGKILL self after this many saves
INTERRUPT_ENV = "RADLENS_TEST_INTERRUPT_AFTER_BATCHES"  # tests: Ctrl-C after this many batches
THUMB_SIZE = 512  # what the app shows; originals are never served
THUMB_QUALITY = 92
SKIP_SUFFIXES = {".json", ".jsonl", ".txt", ".md", ".csv", ".npy", ".nii", ".gz", ".html"}


@dataclass
class IngestReport:
    source: str
    added: int = 0
    regions: int = 0
    already_indexed: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    encode_seconds: float = 0.0
    images_per_s: float = 0.0
    encoder_images_per_s: float = 0.0
    #: (decode processes, encoder threads) the run used; 0 processes = decode in-process
    plan: list[int] = field(default_factory=list)
    #: how decoding and encoding took turns: "in-process", "lockstep" (the processes decode
    #: one batch at a time and wait while it is encoded) or "stream" (they decode ahead)
    schedule: str = ""
    #: what the plan was chosen from: seconds per image to decode (one core) and to encode
    #: (all cores), measured on the first files; empty when not probed
    probe: dict[str, float] = field(default_factory=dict)
    #: seconds from the start to the first decoded file: listing, probing, worker start-up
    first_result_s: float = 0.0
    #: the autocast precision images were encoded in (``Encoder.amp``); None: as loaded
    amp: str | None = None
    #: stopped by Ctrl-C or SIGTERM: everything counted here was saved, ``unread`` files were
    #: not looked at (a rerun adds them)
    interrupted: bool = False
    unread: int = 0
    #: images of this run in saved generations: ``added`` unless the run died between saves
    saved: int = 0
    #: DICOMweb: instances of SOP classes without pixel data (reports, presentation states,
    #: PDFs), left out unfetched
    not_images: int = 0
    #: the part of the source this run indexed ("I/N", :mod:`index.shard`); None: all of it
    shard: str | None = None
    #: files (or DICOMweb instances) skipped because they were erased from this index
    #: (``radlens index remove``) and are withheld from it
    withheld: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _manifest_rows(root: Path) -> dict[str, dict[str, Any]]:
    """The rows of a RadLens data set folder (a ``manifest.jsonl`` whose rows have ``file``
    fields) by file path, so reports and labels land in the catalog; empty if it lists none.

    Raises:
        ManifestError: the manifest cannot be read.
    """
    from vlm.data.cxr_dataset import row_text
    from vlm.data.manifest import read_jsonl

    out = {}
    for row in read_jsonl(root / "manifest.jsonl"):
        if isinstance(row.get("file"), str):
            out[str(root / row["file"])] = {
                "report": row_text(row) or None, "labels": row.get("labels"),
                "dataset_id": row.get("id"), "split": row.get("split"),
                "findings": [{k: f.get(k) for k in ("finding", "side", "zone", "severity")}
                             for f in row.get("findings", [])]}
    return out


def walk(source: Path, datasets: dict[str, dict[str, dict[str, Any]]] | None = None,
         problems: list[dict[str, str]] | None = None) -> Iterator[Path]:
    """Image files under ``source``, folders and files in name order (:func:`index.walk.folders`:
    links followed, each folder once, hidden entries and index folders passed over).

    In a data set folder (a ``manifest.jsonl`` listing ``file`` rows) the files its manifest
    lists, and their rows are put in ``datasets`` by folder; elsewhere every regular file
    (reports and NIfTI volumes are skipped). What cannot be walked is appended to ``problems``
    as ``{"path", "reason"}`` instead of being skipped silently: a folder that cannot be
    listed, a broken link, a FIFO, socket or device, a data set manifest that cannot be read
    (its folder is then left out: indexed as plain files, its images would later be known
    without their reports).
    """
    def note(path: str, reason: str) -> None:
        if problems is not None:
            problems.append({"path": path, "reason": reason})

    if source.is_file():
        yield source
        return
    datasets = {} if datasets is None else datasets
    for folder in folders(source, note):
        if folder.has_manifest:
            try:
                rows = _manifest_rows(Path(folder.path))
            except ManifestError as bad:
                # not indexed as plain files: a rerun after the fix would find them known
                # and never attach their reports and labels
                note(str(folder.manifest),
                     f"{bad}; its data set folder is not indexed until the manifest is fixed")
                folder.prune()
                continue
            if rows:
                datasets[folder.path] = rows
                yield from (Path(p) for p in sorted(rows))
                folder.prune()
                continue
        yield from (Path(f) for f in folder.files
                    if os.path.splitext(f)[1].lower() not in SKIP_SUFFIXES)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


#: files up to this size are read into memory once, hashed, and decoded from those bytes
#: (a 512x512 radiograph: 0.67 -> 0.42 ms for the hash, and no second read); larger ones are
#: hashed in blocks and read again by the decoder
READ_ONCE_BYTES = 64 << 20


class KnownHashes:
    """The content hashes an index already holds, as sorted 64-bit prefixes: what each decode
    process receives so that it can skip known files without decoding them.

    Eight bytes per file, where a Python set of the 64-character hex digests is copied into
    every worker: for a million files (measured) 8 MB per process, unpickled in 1 ms, instead
    of 147 MB and 0.3 s; a lookup costs 5 us beside the file's hashing (about 1 ms for a
    512x512 DICOM). Membership is by prefix, so a different file can (with
    probability about n / 2^64) look known; the ingesting process checks every "known" answer
    against the full digests and decodes such a file itself.
    """

    def __init__(self, digests: Iterable[str] = ()) -> None:
        self.prefixes = np.unique(np.fromiter((_prefix(d) for d in digests), dtype=np.uint64))

    def __contains__(self, digest: object) -> bool:
        if not isinstance(digest, str):
            return False
        p = np.uint64(_prefix(digest))
        i = int(np.searchsorted(self.prefixes, p))
        return i < len(self.prefixes) and self.prefixes[i] == p

    def __len__(self) -> int:
        return len(self.prefixes)


def _prefix(digest: str) -> int:
    """First 64 bits of a hex digest (any other string: of its BLAKE2b hash)."""
    try:
        return int(digest[:16], 16)
    except ValueError:
        return int.from_bytes(hashlib.blake2b(digest.encode(), digest_size=8).digest(), "big")


_KNOWN: KnownHashes = KnownHashes()
_PRE: PreprocessConfig | None = None
_WEB: DicomWeb | None = None  # the DICOMweb source whose instances this process fetches
_FETCHERS: ThreadPoolExecutor | None = None  # its fetch threads (decode_fetched)
#: DICOMweb: the most instances each decode process keeps on the way (threads, one
#: keep-alive connection each), so that a network's wait overlaps decoding
FETCH_AHEAD = 8
#: the decoder waited longer than this fraction of its last decode: one more fetch on the way
WAIT_GROWS = 0.25
#: this many decodes in a row without such a wait: one fewer
SHRINK_AFTER = 16
_WINDOW = 1  # instances on the way now (decode_fetched)
#: DICOMweb: instances handed to a decode process at a time
FETCH_CHUNK = 64


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs; a zombie (killed, not yet reaped) does not."""
    if os.path.isdir("/proc/self"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return False
        return stat.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exit_with(owner: int, every: float = 0.5) -> None:
    """End this decode worker when the ingesting process ``owner`` is gone: a killed build
    must not leave workers behind holding its pipes and files. The kernel's parent-death
    signal cannot do this for a forkserver worker, whose parent is the fork server (which in
    turn waits for its workers), so a daemon thread checks on the owner instead."""

    def watch() -> None:
        while _running(owner):
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="radlens-owner-watch", daemon=True).start()


def _init_worker(known: KnownHashes, pre: dict[str, Any], owner: int = 0,
                 web: dict[str, Any] | None = None) -> None:
    """Per decode process (``owner``: the ingesting process's pid) or, with ``owner`` 0,
    for in-process decoding, which keeps the encoder's thread count. ``web``: the
    :meth:`DicomWeb.config` of a DICOMweb source (each process opens its own connection)."""
    global _KNOWN, _PRE, _WEB
    if owner:
        _exit_with(owner)
        # Ctrl-C in a terminal reaches every process of the group: the ingesting process
        # finishes its batch, saves and stops the pool; a worker that died instead would
        # print a traceback and break the pool under it
        ignore_stop_signals()
        torch.set_num_threads(1)
        # a fork server's worker does not inherit the ingesting process's malloc settings;
        # with them one decode costs 3.7-3.8 instead of 4.2-5.0 ms here (freed pixel buffers
        # are reused instead of mapped anew)
        tune_allocator()
    _KNOWN, _PRE = known, PreprocessConfig(**pre)
    _WEB = DicomWeb.from_config(web) if web else None


def decode_one(path: str, data: bytes | None = None) -> dict[str, Any]:
    """Worker: hash, skip if known, read + preprocess + thumbnail. Never raises. ``path``: a
    file, or a WADO-RS instance URL of the process's DICOMweb source (fetched here unless
    ``data`` holds its bytes already)."""
    try:
        if data is not None:
            digest = hashlib.sha256(data).hexdigest()
        elif _WEB is not None and _WEB.owns(path):
            data = _WEB.fetch(path)
            digest = hashlib.sha256(data).hexdigest()
        elif os.path.getsize(path) <= READ_ONCE_BYTES:
            with open(path, "rb") as fh:
                data = fh.read()
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = file_hash(Path(path))
    except DicomWebError as exc:
        return {"path": path, "error": str(exc).removeprefix(f"{path}: ")}
    except OSError as exc:
        return {"path": path, "error": f"unreadable file ({exc.strerror or exc})"}
    if digest in _KNOWN:
        return {"path": path, "hash": digest, "known": True}
    assert _PRE is not None
    return decode_file(path, digest, _PRE, data)


def decode_file(path: str, digest: str, pre_cfg: PreprocessConfig, data: bytes | None = None
                ) -> dict[str, Any]:
    """Read + preprocess + thumbnail one file whose content hash is ``digest`` (``data``: its
    bytes, if already read). Never raises."""
    from PIL import Image

    from vlm.data.transforms import Preprocess
    from vlm.io import read_image, render

    try:
        image = read_image(path, data=data)
        if image.meta.frames > 1:
            image = image.frame(image.meta.frames // 2)
        problem = image.content_problem()
        if problem:  # its vector would rank among the rest like any other image's
            return {"path": path, "error": f"{problem}: not indexed"}
        pre = Preprocess(pre_cfg)
        unit = pre.unit(image)  # the VOI pass, shared by the model input and the thumbnail
        x, box = pre.one_channel(unit.numpy())
        if pre_cfg.window is None and not image.meta.is_color:  # render() would repeat this VOI
            shown = unit.numpy() * 255.0
            np.rint(shown, out=shown)  # in place: 0.2 ms, against 0.85 with a temporary
            shown = shown.astype(np.uint8)
        else:
            shown = render(image)
        thumb = Image.fromarray(shown)
        thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        # JPEG: about 1 ms against 30-70 ms for PNG at 512 px, which made thumbnails the
        # costliest step of ingestion. Thumbnails are previews; originals stay in the archive.
        thumb.save(buf, format="JPEG", quality=THUMB_QUALITY)
    except ImageReadError as exc:  # a URL's path would come back as "http:/host/..."
        named = exc.path == str(Path(path))
        return {"path": path, "error": exc.reason if named else str(exc)}
    except RadLensError as exc:
        return {"path": path, "error": str(exc).removeprefix(f"{path}: ")}
    except Exception as exc:  # a decoder bug must not stop the archive
        return {"path": path, "error": f"unexpected {type(exc).__name__}: {exc}"[:300]}
    meta = image.meta
    # a NumPy array, not a tensor: a tensor crosses the process boundary as a shared-memory
    # file descriptor, which cost the receiving process about 2 ms per image (the ceiling of a
    # GPU pipeline); an array is pickled inline in microseconds. One channel: the model's
    # channels repeat it (model_input), so a third of the bytes cross the process boundary.
    return {"path": path, "hash": digest, "pixels": x.to(torch.float16).numpy(),
            "letterbox": box, "patient": meta.patient_pseudonym,
            "thumb": buf.getvalue(), "meta": {
                "study": meta.study_pseudonym, "series": meta.series_pseudonym,
                "instance": meta.instance_pseudonym, "modality": meta.modality,
                "body_part": meta.body_part, "view": meta.view_position,
                "year": meta.study_year, "rows": meta.rows, "cols": meta.columns}}


@dataclass(frozen=True)
class Plan:
    """How ingestion uses the machine: ``workers`` decode processes (0: decode in the ingesting
    process), ``threads`` encoder threads, and whether the processes work in ``lockstep`` with
    the encoder (decode one batch with every core, then wait while it is encoded) or stream
    (decode ahead, beside the encoder)."""

    workers: int
    threads: int
    lockstep: bool = False

    @property
    def schedule(self) -> str:
        return "in-process" if self.workers == 0 else "lockstep" if self.lockstep else "stream"


def plan_workers(workers: int | None, device: torch.device,
                 costs: tuple[float, float] | None = None, batch_size: int = 32,
                 network: bool = False) -> Plan:
    """Decode processes, encoder threads and schedule. ``workers=0`` decodes in this process.

    With the encoder on the CPU, decoding and encoding share the cores. Given ``costs`` (seconds
    per image to decode on one core, to encode with every core), the plan with the highest
    predicted rate wins:

    - decode in-process, then encode on every core: 1 / (d + e) (one core idles while decoding);
    - lockstep: C processes decode a batch of B on every core, then wait while every core
      encodes it: B / (B d / C + d + B e), nothing oversubscribed; the lone d is the wait for
      the last process of each batch;
    - stream: W processes decode ahead beside an encoder on the other cores:
      min(W / d, (C - W) / (C e)).

    On 2 cores that is lockstep for a ResNet-18 encoder (d 5.1 ms, e 12.8 ms) and for the small
    ViT (d 4.9 ms, e 3.6 ms); streaming wins where encoding is cheap beside decoding (16 cores,
    d 6.3 ms, e 1.2 ms: 4 processes beside 12 encoder threads). Without
    costs half the cores decode and the encoder gets the rest. With a GPU encoder every core
    but one decodes, streaming, and the encoder's thread count is left alone. With
    ``network`` (a DICOMweb source, where a fetch mostly waits on the server), a process per
    core (at least two) fetches and decodes, streaming beside an encoder on every core.
    """
    cores = available_cpus()
    if workers is None and network:
        return Plan(max(2, cores), cores if device.type == "cpu" else torch.get_num_threads())
    lockstep = False
    if workers is None and device.type == "cpu" and costs is not None and cores > 1:
        decode, encode = (max(float(c), 1e-9) for c in costs)
        b = max(1, batch_size)
        rates: dict[tuple[int, bool], float] = {
            (0, False): 1.0 / (decode + encode),
            (cores, True): b / (b * decode / cores + decode + b * encode)}
        for w in range(1, cores):
            rates[(w, False)] = min(w / decode, (cores - w) / (cores * encode))
        workers, lockstep = max(rates, key=lambda k: (rates[k], -k[0]))
    if workers is None:
        workers = max(1, cores // 2) if device.type == "cpu" else max(1, cores - 1)
    workers = max(0, int(workers))
    if device.type != "cpu":
        return Plan(workers, torch.get_num_threads())
    if lockstep:
        return Plan(workers, cores, True)
    return Plan(workers, cores if workers == 0 else max(1, cores - workers))


def model_input(arrays: list[np.ndarray], encoder: Encoder) -> torch.Tensor:
    """Decoded one-channel float16 arrays -> the encoder's input batch on its device."""
    x = torch.from_numpy(np.stack(arrays))
    channels = encoder.model.config.preprocess.channels
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    return x.to(encoder.device).to(encoder.dtype)


#: files decoded (and encoded) up front to choose the CPU plan; decoded again in the run
PROBE_FILES = 8


def probe_costs(encoder: Encoder, paths: list[str], pre: PreprocessConfig
                ) -> tuple[float, float] | None:
    """(decode s/image on one core, encode s/image with the current threads) on ``paths``;
    None when fewer than two of them decode."""
    _init_worker(KnownHashes(), asdict(pre))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a decode process has one thread
    try:
        decode_one(paths[0])  # first call: lazy imports, decoder and resampler set-up
        t0 = time.perf_counter()
        results = [decode_one(p) for p in paths]
        decode = (time.perf_counter() - t0) / max(1, len(paths))
    finally:
        torch.set_num_threads(threads)
    arrays = [r["pixels"] for r in results if "pixels" in r]
    if len(arrays) < 2:
        return None
    x = model_input(arrays, encoder)
    encoder.encode_tensor(x[:1])  # first call: allocator and kernel selection
    t0 = time.perf_counter()
    encoder.encode_tensor(x)
    return decode, (time.perf_counter() - t0) / len(arrays)


#: yielded by a lockstep decode stream when the processes have just started on a batch: the
#: moment for the ingesting process to do its own bookkeeping for the previous one
STARTED = {"started": True}


def decode_many(paths: list[str]) -> list[dict[str, Any]]:
    """Worker: :func:`decode_one` over a share of a lockstep batch."""
    return [decode_one(p) for p in paths]


def _fetch_pool() -> ThreadPoolExecutor:
    global _FETCHERS
    if _FETCHERS is None:
        _FETCHERS = ThreadPoolExecutor(FETCH_AHEAD, thread_name_prefix="radlens-fetch")
    return _FETCHERS


def _fetched(url: str, future: Future[bytes]) -> dict[str, Any]:
    try:
        data = future.result()
    except DicomWebError as exc:
        return {"path": url, "error": str(exc).removeprefix(f"{url}: ")}
    except Exception as exc:  # a client bug must not stop the archive
        return {"path": url, "error": f"unexpected {type(exc).__name__}: {exc}"[:300]}
    return decode_one(url, data)


def decode_fetched(urls: list[str]) -> list[dict[str, Any]]:
    """Worker, DICOMweb: decode ``urls`` in order while the next ones are fetched on threads.

    How many instances are on the way beside the one being decoded adapts to the network
    (:data:`_WINDOW`, kept per process from one call to the next): it starts at one, grows
    by one each time the decoder had to wait for a fetch longer than :data:`WAIT_GROWS` of
    its last decode, up to :data:`FETCH_AHEAD`, and shrinks by one after
    :data:`SHRINK_AFTER` decodes in a row that did not wait. A nearby server keeps one fetch
    beside each decode (more requests at once only contend for the same cores); a distant one
    gets as many as hide its latency. Never raises."""
    global _WINDOW
    assert _WEB is not None
    web, pool = _WEB, _fetch_pool()
    futures: dict[str, Future[bytes]] = {}
    out: list[dict[str, Any]] = []
    ahead, calm, decode_s = 0, 0, 0.0
    try:
        for i, url in enumerate(urls):
            while ahead < len(urls) and ahead <= i + _WINDOW:  # this one and WINDOW more
                futures[urls[ahead]] = pool.submit(web.fetch, urls[ahead])
                ahead += 1
            t0 = time.perf_counter()
            fut = futures.pop(url)
            wait([fut])
            waited = time.perf_counter() - t0
            if waited > WAIT_GROWS * decode_s and _WINDOW < FETCH_AHEAD:
                _WINDOW, calm = min(FETCH_AHEAD, 2 * _WINDOW), 0
            elif waited <= WAIT_GROWS * decode_s:
                calm += 1
                if calm >= SHRINK_AFTER and _WINDOW > 1:
                    _WINDOW, calm = _WINDOW - 1, 0
            t1 = time.perf_counter()
            out.append(_fetched(url, fut))
            decode_s = time.perf_counter() - t1
    finally:
        for f in futures.values():  # stopped early: the fetches not yet started are dropped
            f.cancel()
    return out


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _results(paths: list[str], plan: Plan, known: KnownHashes, pre: PreprocessConfig,
             batch_size: int, web: DicomWeb | None = None
             ) -> Generator[dict[str, Any], None, None]:
    web_cfg = web.config() if web is not None else None
    if plan.workers == 0:
        _init_worker(known, asdict(pre), web=web_cfg)
        if web is not None:
            for chunk in _chunks(paths, FETCH_CHUNK):
                yield from decode_fetched(chunk)
            return
        yield from map(decode_one, paths)
        return
    with ProcessPoolExecutor(plan.workers, mp_context=worker_context(), initializer=_init_worker,
                             initargs=(known, asdict(pre), os.getpid(), web_cfg)) as pool:
        try:
            if web is not None:  # each process keeps FETCH_AHEAD instances on the way
                for results in pool.map(decode_fetched, _chunks(paths, FETCH_CHUNK)):
                    yield from results
                return
            if not plan.lockstep:
                yield from pool.map(decode_one, paths, chunksize=8)
                return
            share = -(-batch_size // plan.workers)
            for start in range(0, len(paths), batch_size):
                batch = paths[start:start + batch_size]
                futures = [pool.submit(decode_many, batch[i:i + share])
                           for i in range(0, len(batch), share)]
                yield STARTED
                # the whole batch before any of it: the caller encodes as soon as it has a
                # batch, and no process may still be decoding then (it would take a core from
                # the encoder)
                done = [f.result() for f in futures]
                for results in done:
                    yield from results
        finally:
            # closed early (a stop, an error): drop the queued files instead of decoding the
            # rest of the archive before the pool can exit
            pool.shutdown(wait=True, cancel_futures=True)


def worker_context() -> multiprocessing.context.BaseContext:
    """How decode processes start: ``forkserver`` where the platform has it, else ``spawn``.

    A spawned worker imports torch and the decode stack itself: seconds per worker, and far
    more where the installed packages have no byte-code cache, all of it before its first
    image. A forkserver imports this module once and forks each worker from it, so workers
    start warm; unlike a plain fork of this process they inherit no CUDA context, encoder
    threads or open index files.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def ingest(encoder: Encoder, source: str | os.PathLike[str], out: str | os.PathLike[str], *,
           batch_size: int = 32, workers: int | None = None, save_every: int = 512,
           regions: bool = True, progress: bool = True, model_path: str | None = None,
           keep_paths: bool = False, allow_empty: bool = False,
           shard: Shard | None = None) -> IngestReport:
    """Build (or extend) the index at ``out`` from the files under ``source``, or from the
    instances of a DICOMweb server when ``source`` is its http(s) URL (:mod:`index.dicomweb`).
    With ``shard``, only the files (or studies) of that part of the source (:mod:`index.shard`);
    a part that holds nothing gives an empty index, to be merged with the others.

    File paths can embed patient names, so the catalog stores a keyed pseudonym of each path
    or instance URL (``src-…``) unless ``keep_paths`` asks for the path relative to ``source``
    (or the instance's URL). The failures report (``ingest_report.json``, mode 0600) names
    failing files so they can be fixed; it also lists what the walk could not enter (see
    :func:`walk`) and the studies a DICOMweb server would not list.

    Raises:
        RadLensError: ``source`` holds no image file at all (unless ``allow_empty``: a folder
            of NIfTI volumes indexed by a volume model next), or a DICOMweb server cannot be
            reached or searched; no index is created or changed.
    """
    web = DicomWeb(str(source)) if is_dicomweb(source) else None
    src, dest = Path(source), Path(out)
    if web is None and not src.exists():
        raise RadLensError(f"{src}: no such file or folder")
    if web is None and is_index_folder(src):
        raise RadLensError(f"{src} is a RadLens index, not an archive: pass the folder of "
                           "images as --source")
    if workers is not None and workers < 0:
        raise RadLensError(f"--workers must be 0 (decode in this process) or more, not "
                           f"{workers}")
    if batch_size < 1 or save_every < 1:
        raise RadLensError(f"batch size and save interval must be at least 1 (got "
                           f"{batch_size} and {save_every})")
    datasets: dict[str, dict[str, dict[str, Any]]] = {}
    problems: list[dict[str, str]] = []
    sops: dict[str, str] | None = None
    not_images = 0
    part = shard if shard is not None and shard.count > 1 else None
    if web is not None:
        listing = list_instances(web, keep=part.holds if part else None)
        paths, problems, sops, not_images = (listing.urls, listing.problems, listing.sops,
                                             listing.not_images)
        anything = bool(paths) or (part is not None and listing.studies > 0)
    else:
        paths = [str(p) for p in walk(src, datasets, problems)]
        anything = bool(paths)
        if part is not None:
            root = src if src.is_dir() else src.parent
            paths = [p for p in paths if part.holds(shard_key(p, root))]
    if not anything and not allow_empty:
        detail = (f"; {len(problems)} entries could not be read, the first: "
                  f"{problems[0]['path']}: {problems[0]['reason']}" if problems else "")
        what = (f"{web.display}: no image instances to index" if web is not None
                else f"{src}: no image files to index (DICOM, PNG or JPEG)")
        raise RadLensError(what + detail)
    if (dest / "CURRENT").exists():
        ix = IndexFolder.open(dest, mode="w", expect_model=encoder.name,
                              expect_config_hash=encoder.config_hash)
    else:
        ix = IndexFolder.create(dest, model_name=encoder.name, config_hash=encoder.config_hash,
                                dim=encoder.dim, preprocessing={
                                    **asdict(encoder.model.config.preprocess),
                                    "model_path": model_path})
    bind_pseudonyms(ix)
    report = IngestReport(source=web.display if web is not None else str(src),
                          amp=encoder.amp, failed=problems, not_images=not_images,
                          shard=str(part) if part else None)
    before = torch.get_num_threads()
    try:
        stop = _run(encoder, ix, src, paths, datasets, report, batch_size, workers, save_every,
                    regions, progress, keep_paths, web, sops)
    finally:
        torch.set_num_threads(before)
        report_file = dest / "ingest_report.json"
        report_file.write_text(json.dumps(report.to_dict(), indent=1))
        report_file.chmod(0o600)
        ix.close()
    if stop:
        raise Interrupted(
            f"interrupted: {report.added} new images saved in {dest}, {report.unread} files "
            "not read yet; run the same command again to add them", stop.exit_code, report)
    return report


def _run(encoder: Encoder, ix: IndexFolder, src: Path, paths: list[str],
         datasets: dict[str, dict[str, dict[str, Any]]], report: IngestReport, batch_size: int,
         workers: int | None, save_every: int, regions: bool, progress: bool, keep_paths: bool,
         web: DicomWeb | None = None, sops: dict[str, str] | None = None) -> StopRequest:
    from vlm.io.deid import default_pseudonymizer

    pseudo = default_pseudonymizer()
    root = src if src.is_dir() else src.parent

    def uri(path: str) -> str | None:
        if web is not None:
            return path if keep_paths else pseudo("src", path)
        if keep_paths:
            return os.path.relpath(path, root)
        return pseudo("src", os.path.abspath(path))

    start = time.time()
    listed = {path: meta for rows in datasets.values() for path, meta in rows.items()}
    known = ix.catalog.content_hashes(IMAGE)
    withheld = ix.catalog.withheld("hash")  # erased by request: never added back
    if sops:  # DICOMweb: what the index holds by SOP Instance UID is not fetched again
        held = ix.catalog.pseudonyms("instance", IMAGE)
        erased = ix.catalog.withheld("instance")
        fresh = []
        for p in paths:
            name = pseudo("im", sops[p])
            if name in erased:
                report.withheld += 1
            elif name in held:
                report.already_indexed += 1
            else:
                fresh.append(p)
        paths = fresh
    pre = encoder.model.config.preprocess
    costs = None
    if (web is None and workers is None and encoder.device.type == "cpu"
            and available_cpus() > 1 and len(paths) > 4 * PROBE_FILES):
        torch.set_num_threads(available_cpus())
        costs = probe_costs(encoder, paths[:PROBE_FILES], pre)
        if costs is not None:
            report.probe = {"decode_s": round(costs[0], 5), "encode_s": round(costs[1], 5)}
    plan = plan_workers(workers, encoder.device, costs, batch_size, network=web is not None)
    torch.set_num_threads(plan.threads)
    report.plan, report.schedule = [plan.workers, plan.threads], plan.schedule
    logger.info("ingest plan: %d decode processes, %d encoder threads, %s", plan.workers,
                plan.threads, plan.schedule)
    thumbs = ix.path / "thumbs"
    thumbs.mkdir(exist_ok=True)
    bar = _bar(len(paths), progress)
    pending: list[dict[str, Any]] = []
    since_save = 0
    saves = [0]
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    interrupt_after = int(os.environ.get(INTERRUPT_ENV, "0") or 0)
    batches = [0]

    encoded: list[tuple[list[dict[str, Any]], Any]] = []

    def flush() -> None:
        """Encode the pending batch; its vectors and rows are recorded at once, or (lockstep)
        when the decode processes have started on the next batch."""
        if not pending:
            return
        t0 = time.time()
        emb = encoder.encode_tensor(model_input([p["pixels"] for p in pending], encoder))
        report.encode_seconds += time.time() - t0
        encoded.append((pending[:], emb))
        pending.clear()
        if not plan.lockstep:
            record()

    def save() -> None:
        ix.save()
        report.saved = report.added

    def record() -> None:
        nonlocal since_save
        while encoded:
            batch, emb = encoded.pop(0)
            _record(batch, emb)
            since_save += len(batch)
            batches[0] += 1
            if batches[0] == interrupt_after:
                interrupt_for_test()
            if since_save >= save_every:
                save()
                since_save = 0
                saves[0] += 1
                if kill_after and saves[0] >= kill_after:  # tests: die like a killed process
                    os.kill(os.getpid(), 9)

    def _record(batch: list[dict[str, Any]], emb: Any) -> None:
        # one device-to-host copy per output (not one per image or region: on a GPU each copy
        # is a synchronisation), one pseudonym per file
        vectors = emb.global_embedding.float().cpu().numpy()
        uris = [uri(p["path"]) for p in batch]
        rows = []
        for p, source_uri in zip(batch, uris, strict=True):
            thumb = thumbs / f"{p['hash'][:2]}" / f"{p['hash']}.jpg"
            thumb.parent.mkdir(exist_ok=True)
            if not thumb.exists():
                thumb.write_bytes(p["thumb"])
            extra = listed.get(p["path"], {})
            if p.get("patient"):  # what `radlens index remove --patient` finds the image by
                extra = {**extra, "patient": p["patient"]}
            rows.append({"source_uri": source_uri, "content_hash": p["hash"],
                         "thumbnail": str(thumb.relative_to(ix.path)), **p["meta"],
                         "extra": extra})
        ids = ix.add(IMAGE, vectors, rows)
        report.added += len(ids)
        if regions and emb.region_embeddings is not None and emb.region_boxes is not None:
            region_vectors = emb.region_embeddings.float().cpu().numpy()  # (B, K, E)
            region_boxes = emb.region_boxes.float().cpu().numpy()  # (B, K, 4)
            region_scores = (emb.region_scores.float().cpu().tolist()
                             if emb.region_scores is not None else None)
            rrows = []
            for j, (p, parent) in enumerate(zip(batch, ids.tolist(), strict=True)):
                boxes = p["letterbox"].to_original(region_boxes[j])
                for r, box in enumerate(boxes):
                    rrows.append({"source_uri": uris[j], "content_hash": f"{p['hash']}#{r}",
                                  "box": [float(v) for v in box], **p["meta"],
                                  "extra": {"parent": parent, "score": region_scores[j][r]
                                            if region_scores is not None else None}})
            ix.add(REGION, region_vectors.reshape(-1, region_vectors.shape[-1]), rrows)
            report.regions += len(rrows)

    seen = 0
    broken = False
    with stop_on_signal("saving the index after this batch") as stop:
        results = _results(paths, plan, KnownHashes(known | withheld), pre, batch_size, web)
        try:
            for result in results:
                if stop:
                    break
                if result is STARTED:  # the processes decode the next batch: record the last
                    record()
                    continue
                seen += 1
                if not report.first_result_s:
                    report.first_result_s = round(time.time() - start, 3)
                bar.update(1)
                if "error" not in result and result["hash"] in withheld:
                    report.withheld += 1
                    continue
                if "error" not in result and result["hash"] in known:
                    report.already_indexed += 1
                    continue
                if result.get("known"):  # a prefix collision: a new file that only looked known
                    result = _decode_again(result["path"], result["hash"], pre, web)
                if "error" in result:
                    # listed once, by the caller (the CLI prints each failure on stderr)
                    report.failed.append({"path": result["path"], "reason": result["error"]})
                else:
                    known.add(result["hash"])
                    pending.append(result)
                    if len(pending) >= batch_size:
                        flush()
        except BrokenProcessPool:
            # a decode process (or the fork server behind them) died: SIGTERM sent to the whole
            # process group kills the fork server, the OOM killer a worker. What was decoded
            # is still encoded and saved below.
            broken = True
        finally:
            results.close()  # stops the decode processes now, not when collected
        # what was decoded is encoded and saved, also after a stop (a second signal stops at
        # once, with the last saved generation intact)
        flush()
        record()
        save()
    bar.close()
    report.interrupted, report.unread = bool(stop), len(paths) - seen
    if broken and not stop:
        error = RadLensError(
            f"a decode process died (killed, or out of memory?): {report.added} new images "
            f"saved in {ix.path}, {report.unread} files not read yet; run the same command "
            "again to add them")
        error.exit_code = 1
        raise error
    report.seconds = round(time.time() - start, 3)
    n = report.added
    report.images_per_s = round(n / report.seconds, 3) if n and report.seconds else 0.0
    report.encoder_images_per_s = (round(n / report.encode_seconds, 3)
                                   if n and report.encode_seconds else 0.0)
    return stop


def _decode_again(path: str, digest: str, pre: PreprocessConfig, web: DicomWeb | None
                  ) -> dict[str, Any]:
    """:func:`decode_file` in the ingesting process, for a file (or DICOMweb instance, fetched
    again) that a decode process skipped as known by its hash prefix. Never raises."""
    if web is None or not web.owns(path):
        return decode_file(path, digest, pre)
    try:
        data = web.fetch(path)
    except DicomWebError as exc:
        return {"path": path, "error": str(exc).removeprefix(f"{path}: ")}
    return decode_file(path, digest, pre, data)


class _bar:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="file", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
