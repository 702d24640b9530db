"""A DICOMweb server (a PACS, a VNA, Orthanc) as an ingestion source.

``radlens index build --source https://pacs.example.org/dicom-web`` lists the server's
instances with QIDO-RS (``/studies``, then ``/studies/{study}/instances``, paged with
``limit``/``offset``) and fetches each one with WADO-RS
(``/studies/{study}/series/{series}/instances/{instance}``, any transfer syntax), in the decode
worker processes, so fetching runs beside the encoder the way reading files does. A query
string on the URL is passed to the study search unchanged (``?ModalitiesInStudy=CR`` or
``?StudyDate=20240101-20241231``), so a site can index one slice of its archive at a time.

Resumable without refetching: an instance whose SOP Instance UID the index already holds (as
its keyed pseudonym, the catalog's ``instance`` column) is not fetched again, so a rerun or a
restart after a kill only downloads what is missing. An instance that cannot be fetched (an
HTTP error, a timeout, a reply that is not DICOM) and a study whose instances cannot be listed
are failures in the report; the rest of the archive goes on. A server that cannot be reached
or whose study search fails stops the build before any index is created or changed.

Credentials never go in the URL (it is logged, printed and kept in the failures report): a
URL with ``user:password@`` is refused. ``RADLENS_DICOMWEB_TOKEN`` sends a bearer token,
``RADLENS_DICOMWEB_USER`` with ``RADLENS_DICOMWEB_PASSWORD`` HTTP basic authentication.

Instances of SOP classes that hold no image (structured reports, presentation states, key
object selections, encapsulated PDFs, waveforms, raw data, RT plans and structures) are not
fetched; they are counted, not listed as failures.

Volumes (``--volume-model``): :func:`list_series` lists each study's series (QIDO-RS series
search); a series the server counts fewer than three instances in (a radiograph, a scout, a
report) is counted and passed over, and each other series is fetched instance by instance
into a private temporary folder (:meth:`DicomWeb.fetch_series`; one series ahead of the
encoder, :class:`index.volumes._SeriesFetcher`), read as a DICOM series folder is, encoded,
and the folder removed. A series the volume collection holds (by Series
Instance UID pseudonym) is not fetched again.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from vlm.errors import RadLensError

logger = logging.getLogger(__name__)
R = TypeVar("R")

TOKEN_ENV = "RADLENS_DICOMWEB_TOKEN"
USER_ENV = "RADLENS_DICOMWEB_USER"
PASSWORD_ENV = "RADLENS_DICOMWEB_PASSWORD"
PAGE = 1000  # QIDO-RS results asked for per request
TIMEOUT_S = 60.0
RETRY_STATUS = (429, 502, 503, 504)
RETRIES = 3
BACKOFF_S = 0.5
MAX_WAIT_S = 10.0
LIST_THREADS = 8  # studies whose instances are listed at once (each search waits on the server)
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
QIDO_ACCEPT = "application/dicom+json"

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
SERIES_INSTANCES = "00201209"  # NumberOfSeriesRelatedInstances
#: SOP classes without pixel data (PS3.4 Annex B), as UIDs under 1.2.840.10008.5.1.4.1.1: the
#: class itself and every class below it. Structured reports and key object selections (88),
#: presentation states (11), encapsulated documents (104), waveforms (9), raw data and
#: segmentations (66), RT structure sets, plans and treatment records (481.3-481.9)
NON_IMAGE_CLASSES = ("88", "11", "104", "9", "66", "481.3", "481.4", "481.5", "481.6", "481.7",
                     "481.8", "481.9")
STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."


def holds_image(sop_class: str) -> bool:
    """Whether instances of ``sop_class`` can hold an image (an unknown or missing class
    does: the decoder decides)."""
    if not sop_class.startswith(STORAGE_ROOT):
        return True
    rest = sop_class[len(STORAGE_ROOT):]
    return not any(rest == c or rest.startswith(c + ".") for c in NON_IMAGE_CLASSES)


class DicomWebError(RadLensError):
    """A DICOMweb request failed (one line: what was asked and why it failed)."""


def is_dicomweb(source: object) -> bool:
    """Whether a ``--source`` value names a DICOMweb server (an http or https URL)."""
    return isinstance(source, str) and source.strip().lower().startswith(("http://",
                                                                          "https://"))


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str


@dataclass(frozen=True)
class Series:
    study: str
    series: str
    instances: int | None = None  # as the server counts them; None where it does not say


def _int(record: Mapping[str, Any], tag: str) -> int | None:
    value = _value(record, tag)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _value(record: Mapping[str, Any], tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON record, as text."""
    value = (record.get(tag) or {}).get("Value") or []
    return str(value[0]).strip() if value and value[0] is not None else None


def _auth_headers(environ: Mapping[str, str]) -> dict[str, str]:
    token = environ.get(TOKEN_ENV)
    if token:
        return {"Authorization": f"Bearer {token.strip()}"}
    user = environ.get(USER_ENV)
    if user:
        pair = f"{user}:{environ.get(PASSWORD_ENV, '')}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return {}


def first_part(body: bytes, content_type: str, what: str) -> bytes:
    """The first body part of a ``multipart/related`` reply (a WADO-RS instance), or the body
    itself when the server answered with a single ``application/dicom`` object.

    Raises:
        DicomWebError: a multipart reply without a boundary or without any part.
    """
    kind, _, params = content_type.partition(";")
    kind = kind.strip().lower()
    if kind == "application/dicom":
        return body
    if kind != "multipart/related":
        raise DicomWebError(f"{what}: the server sent {kind or 'no content type'}, not DICOM")
    boundary = None
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise DicomWebError(f"{what}: a multipart reply without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise DicomWebError(f"{what}: a multipart reply without any part")
    start += len(delimiter)
    end = body.find(b"\r\n" + delimiter, start)
    if end < 0:
        raise DicomWebError(f"{what}: a multipart reply cut short (no closing boundary)")
    part = body[start:end]
    _headers, sep, content = part.partition(b"\r\n\r\n")
    if not sep:
        raise DicomWebError(f"{what}: a multipart part without headers")
    return content


class DicomWeb:
    """A client for one DICOMweb service root (``…/dicom-web``); picklable by :meth:`config`
    into the decode processes, each of which keeps its own connection."""

    def __init__(self, url: str, *, timeout: float = TIMEOUT_S,
                 environ: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise RadLensError(f"{url}: not a DICOMweb URL (http[s]://host[:port]/path)")
        if parts.username or parts.password:
            raise RadLensError("a DICOMweb URL must not hold credentials (it is logged and "
                               f"stored): set {TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}")
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError as exc:
            raise RadLensError(f"{url}: {exc}") from None
        self.root = f"{parts.scheme.lower()}://{parts.hostname}{port}{parts.path.rstrip('/')}"
        self.query = parse_qsl(parts.query, keep_blank_values=True)
        self.timeout = timeout
        self.headers = _auth_headers(os.environ if environ is None else environ)
        self._local = threading.local()  # one keep-alive session per thread

    def __repr__(self) -> str:  # never the credentials
        return f"DicomWeb({self.root!r})"

    @property
    def display(self) -> str:
        """The source as reports show it: the service root and study query, no credentials."""
        query = "&".join(f"{k}={v}" for k, v in self.query)
        return self.root + (f"?{query}" if query else "")

    def config(self) -> dict[str, Any]:
        return {"root": self.root, "query": self.query, "timeout": self.timeout,
                "headers": dict(self.headers)}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> DicomWeb:
        client = cls.__new__(cls)
        client.root, client.query = cfg["root"], [tuple(q) for q in cfg["query"]]
        client.timeout, client.headers = cfg["timeout"], dict(cfg["headers"])
        client._local = threading.local()
        return client

    def instance_url(self, inst: Instance) -> str:
        return (f"{self.root}/studies/{quote(inst.study)}/series/{quote(inst.series)}"
                f"/instances/{quote(inst.sop)}")

    def owns(self, url: str) -> bool:
        return url.startswith(self.root + "/studies/")

    def _get(self, url: str, accept: str, params: list[tuple[str, str]] | None = None,
             what: str = "", encoding: str | None = None) -> Any:
        """One GET; a lost connection, a timeout and HTTP 429/502/503/504 are tried again
        (``RETRIES`` times, waiting ``BACKOFF_S`` doubling, or the server's Retry-After up to
        ``MAX_WAIT_S``), as a busy PACS answers now and then."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.headers)
        what = what or url
        headers = {"Accept": accept}
        if encoding:
            headers["Accept-Encoding"] = encoding
        for attempt in range(RETRIES + 1):
            wait = BACKOFF_S * 2 ** attempt
            try:
                reply = session.get(url, params=params, headers=headers, timeout=self.timeout)
            except requests.Timeout:
                problem = f"no answer within {self.timeout:g} s"
            except requests.ConnectionError as exc:
                why = "connection refused" if "refused" in str(exc).lower() else "no connection"
                problem = f"cannot connect ({why})"
            except requests.RequestException as exc:
                raise DicomWebError(f"{what}: {type(exc).__name__}") from None
            else:
                if reply.status_code not in RETRY_STATUS:
                    break
                problem = f"HTTP {reply.status_code} {reply.reason or ''}".strip()
                after = reply.headers.get("Retry-After", "")
                wait = float(after) if after.isdigit() else wait
            if attempt == RETRIES:
                tries = f" ({RETRIES + 1} attempts)" if RETRIES else ""
                raise DicomWebError(f"{what}: {problem}{tries}")
            time.sleep(min(wait, MAX_WAIT_S))
        if reply.status_code in (401, 403):
            raise DicomWebError(f"{what}: HTTP {reply.status_code} (not authorised: check "
                                f"{TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV})")
        if reply.status_code == 204:  # QIDO: no match
            return reply
        if reply.status_code != 200:
            raise DicomWebError(f"{what}: HTTP {reply.status_code} {reply.reason or ''}".strip())
        return reply

    def _search(self, path: str, query: list[tuple[str, str]], what: str
                ) -> Iterator[dict[str, Any]]:
        """Every QIDO-RS match of ``path``, page by page."""
        offset = 0
        while True:
            reply = self._get(f"{self.root}{path}", QIDO_ACCEPT,
                              [*query, ("limit", str(PAGE)), ("offset", str(offset))], what)
            if reply.status_code == 204 or not reply.content.strip():
                return
            try:
                page = reply.json()
            except ValueError:
                raise DicomWebError(f"{what}: the server's answer is not DICOM JSON") from None
            if not isinstance(page, list):
                raise DicomWebError(f"{what}: the server's answer is not a list of matches")
            yield from (r for r in page if isinstance(r, dict))
            if len(page) < PAGE:
                return
            offset += len(page)

    def studies(self) -> list[str]:
        """Study Instance UIDs matching the URL's query.

        Raises:
            DicomWebError: the server cannot be reached or the search fails.
        """
        found = (_value(r, STUDY_UID) for r in self._search(
            "/studies", [*self.query, ("includefield", STUDY_UID)],
            f"{self.display}: study search"))
        return list(dict.fromkeys(uid for uid in found if uid))

    def instances(self, study: str) -> tuple[list[Instance], int]:
        """The image instances of one study, and how many non-image instances it also holds.

        Raises:
            DicomWebError: the study's instances cannot be listed.
        """
        out, other = [], 0
        for r in self._search(f"/studies/{quote(study)}/instances",
                              [("includefield", f"{SERIES_UID},{SOP_UID},{SOP_CLASS}")],
                              f"{self.root}/studies/{study}: instance search"):
            series, sop = _value(r, SERIES_UID), _value(r, SOP_UID)
            sop_class = _value(r, SOP_CLASS) or ""
            if not series or not sop:
                continue
            if not holds_image(sop_class):
                other += 1
                continue
            out.append(Instance(study, series, sop))
        return out, other

    def series_of(self, study: str) -> list[Series]:
        """The series of one study (QIDO-RS series search).

        Raises:
            DicomWebError: the study's series cannot be listed.
        """
        out = []
        for r in self._search(f"/studies/{quote(study)}/series",
                              [("includefield", f"{SERIES_UID},{SERIES_INSTANCES}")],
                              f"{self.root}/studies/{study}: series search"):
            uid = _value(r, SERIES_UID)
            if uid:
                out.append(Series(study, uid, _int(r, SERIES_INSTANCES)))
        return out

    def series_url(self, s: Series) -> str:
        return f"{self.root}/studies/{quote(s.study)}/series/{quote(s.series)}"

    def fetch_series(self, s: Series, folder: Path, threads: int = LIST_THREADS) -> list[Path]:
        """Every image instance of one series, written into ``folder`` (one file each, fetched
        ``threads`` at a time): a volume is read from them like a series folder.

        Raises:
            DicomWebError: the series' instances cannot be listed, or one of them cannot be
                fetched (a volume with a slice missing is not read).
        """
        what = f"{self.series_url(s)}: instance search"
        instances = []
        for r in self._search(f"/studies/{quote(s.study)}/series/{quote(s.series)}/instances",
                              [("includefield", f"{SOP_UID},{SOP_CLASS}")], what):
            sop = _value(r, SOP_UID)
            if sop and holds_image(_value(r, SOP_CLASS) or ""):
                instances.append(Instance(s.study, s.series, sop))

        def one(item: tuple[int, Instance]) -> Path:
            path = folder / f"{item[0]:06d}.dcm"
            path.write_bytes(self.fetch(self.instance_url(item[1])))
            return path

        paths = []
        for _, got in _each(one, list(enumerate(instances)), threads):
            if isinstance(got, DicomWebError):
                raise got  # the slices not yet asked for are not fetched
            paths.append(got)
        return paths

    def fetch(self, url: str) -> bytes:
        """One instance's DICOM bytes (WADO-RS, the server's stored transfer syntax).

        Raises:
            DicomWebError: the request failed or the reply holds no DICOM object.
        """
        # no HTTP compression of pixel data: gzip cost Orthanc 20 ms per 512x512 radiograph,
        # nine times the rest of the request, to save a fifth of the bytes (benchmarks/
        # dicomweb_ingest.py); compressed transfer syntaxes are compressed already
        reply = self._get(url, WADO_ACCEPT, encoding="identity")
        if reply.status_code == 204:
            raise DicomWebError(f"{url}: the server sent no content")
        return first_part(reply.content, reply.headers.get("Content-Type", ""), url)


def _each(fn: Callable[[Any], R], items: list[Any], threads: int
          ) -> Iterator[tuple[Any, R | DicomWebError]]:
    """``(item, fn(item))`` in order, ``threads`` calls at a time; a call's DicomWebError is
    its result. Stopped early (an error, Ctrl-C), the calls not yet started are dropped
    instead of waited for."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item: Any) -> R | DicomWebError:
        try:
            return fn(item)
        except DicomWebError as exc:
            return exc

    pool = ThreadPoolExecutor(max(1, threads))
    try:
        yield from zip(items, pool.map(one, items), strict=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _study_problem(client: DicomWeb, study: str, exc: DicomWebError) -> dict[str, str]:
    """The failures-report row of a study whose contents could not be listed."""
    return {"path": f"{client.root}/studies/{study}", "reason": str(exc).split(": ", 1)[-1]}


@dataclass
class Listing:
    """What :func:`list_instances` found: the instances' WADO-RS URLs with their SOP Instance
    UIDs, the studies that could not be listed, and the non-image instances left out."""

    urls: list[str]
    sops: dict[str, str]  # url -> SOP Instance UID
    problems: list[dict[str, str]]
    not_images: int = 0
    #: studies the study search returned, before a shard kept its part
    studies: int = 0


def _studies(client: DicomWeb, keep: Callable[[str], bool] | None) -> tuple[list[str], int]:
    """The study search's Study Instance UIDs that ``keep`` accepts, and how many it returned."""
    studies = client.studies()
    return [s for s in studies if keep is None or keep(s)], len(studies)


def list_instances(client: DicomWeb, threads: int = LIST_THREADS,
                   keep: Callable[[str], bool] | None = None) -> Listing:
    """Every image instance the source's study search reaches, in server order. The studies'
    instance searches run ``threads`` at a time: from a local Orthanc on 2 cores, 512 studies
    took 1.42 s one at a time and 0.94 s eight at a time; a remote archive makes each search
    wait on the network, which threads overlap.

    Args:
        keep: lists only the studies whose Study Instance UID it accepts (a shard's part).

    Raises:
        DicomWebError: the study search itself fails (nothing can be listed).
    """
    studies, total = _studies(client, keep)
    logger.info("%s: %d studies; listing the instances of %d", client.display, total,
                len(studies))
    listing = Listing([], {}, [], studies=total)
    for n, (study, found) in enumerate(_each(client.instances, studies, threads), 1):
        if n % 1000 == 0:
            logger.info("listed the instances of %d of %d studies", n, len(studies))
        if isinstance(found, DicomWebError):
            listing.problems.append(_study_problem(client, study, found))
            continue
        instances, other = found
        listing.not_images += other
        for inst in instances:
            url = client.instance_url(inst)
            if url not in listing.sops:
                listing.urls.append(url)
                listing.sops[url] = inst.sop
    return listing


@dataclass
class SeriesListing:
    """What :func:`list_series` found: the series that can be volumes, the studies whose
    series could not be listed, and how many series were too short to be one."""

    series: list[Series] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)
    short: int = 0
    #: studies the study search returned, before a shard kept its part
    studies: int = 0


def list_series(client: DicomWeb, min_instances: int, threads: int = LIST_THREADS,
                keep: Callable[[str], bool] | None = None) -> SeriesListing:
    """Every series the source's study search reaches with at least ``min_instances``
    instances by the server's count (a series it does not count is kept: the reader decides).
    ``keep``: as in :func:`list_instances`.

    Raises:
        DicomWebError: the study search itself fails.
    """
    studies, total = _studies(client, keep)
    listing = SeriesListing(studies=total)
    for study, found in _each(client.series_of, studies, threads):
        if isinstance(found, DicomWebError):
            listing.problems.append(_study_problem(client, study, found))
            continue
        for s in found:
            if s.instances is not None and s.instances < min_instances:
                listing.short += 1
            else:
                listing.series.append(s)
    return listing
