"""A small DICOMweb server for tests: QIDO-RS study, series and instance search (paged),
WADO-RS instance retrieval as multipart/related, from a list of DICOM files. Faults can be
switched on per study or instance; every request is recorded."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import pydicom

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR: no pixel data
ROOT = "/dicom-web"


@dataclass
class Stored:
    study: str
    series: str
    sop: str
    sop_class: str
    data: bytes
    modality: str = ""


@dataclass
class Archive:
    items: list[Stored] = field(default_factory=list)
    fail_instances: set[str] = field(default_factory=set)  # SOP UIDs answered with HTTP 500
    fail_studies: set[str] = field(default_factory=set)  # instance search answers HTTP 500
    token: str | None = None  # a bearer token every request must carry
    fetched: Counter[str] = field(default_factory=Counter)  # SOP UID -> WADO-RS requests
    queries: list[dict[str, str]] = field(default_factory=list)  # the study searches' params
    encodings: Counter[str] = field(default_factory=Counter)  # WADO-RS Accept-Encoding values
    busy: Counter[str] = field(default_factory=Counter)  # SOP UID -> 503s before it is served
    latency_s: float = 0.0  # added to every WADO-RS answer: a PACS across a network
    in_flight: int = 0  # WADO-RS requests being answered now
    most_in_flight: int = 0  # the most at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_file(self, path: Path, sop: str | None = None, data: bytes | None = None) -> Stored:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        item = Stored(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                      sop or str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                      path.read_bytes() if data is None else data, str(ds.get("Modality", "")))
        self.items.append(item)
        return item


def _uid(tag: str, value: str) -> dict[str, dict[str, object]]:
    return {tag: {"vr": "UI", "Value": [value]}}


class _Handler(BaseHTTPRequestHandler):
    archive: Archive

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "application/dicom+json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        a = self.archive
        if a.token and self.headers.get("Authorization") != f"Bearer {a.token}":
            self._send(401, b"{}")
            return
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query))
        parts = [unquote(p) for p in url.path.removeprefix(ROOT).strip("/").split("/")]
        offset, limit = int(params.get("offset", 0)), int(params.get("limit", 10**9))
        if parts == ["studies"]:
            a.queries.append(params)
            studies = list(dict.fromkeys(it.study for it in a.items))
            page = [_uid("0020000D", s) for s in studies[offset:offset + limit]]
            self._send(200 if page else 204, json.dumps(page).encode() if page else b"")
        elif len(parts) == 3 and parts[0] == "studies" and parts[2] == "series":
            if parts[1] in a.fail_studies:
                self._send(500, b"{}")
                return
            counts = Counter(it.series for it in a.items if it.study == parts[1])
            mods = {it.series: it.modality for it in a.items}
            found = [{**_uid("0020000E", se), "00080060": {"vr": "CS", "Value": [mods[se]]},
                      "00201209": {"vr": "IS", "Value": [n]}} for se, n in counts.items()]
            self._send(200, json.dumps(found[offset:offset + limit]).encode())
        elif (len(parts) == 5 and parts[0] == "studies" and parts[2] == "series"
              and parts[4] == "instances"):
            found = [{**_uid("00080018", it.sop), **_uid("00080016", it.sop_class)}
                     for it in a.items if it.study == parts[1] and it.series == parts[3]]
            self._send(200, json.dumps(found[offset:offset + limit]).encode())
        elif len(parts) == 3 and parts[0] == "studies" and parts[2] == "instances":
            if parts[1] in a.fail_studies:
                self._send(500, b"{}")
                return
            found = [{**_uid("0020000E", it.series), **_uid("00080018", it.sop),
                      **_uid("00080016", it.sop_class)} for it in a.items
                     if it.study == parts[1]][offset:offset + limit]
            self._send(200, json.dumps(found).encode())
        elif len(parts) == 6 and parts[0] == "studies" and parts[4] == "instances":
            sop = parts[5]
            with a._lock:
                a.fetched[sop] += 1
                a.in_flight += 1
                a.most_in_flight = max(a.most_in_flight, a.in_flight)
            try:
                if a.latency_s:
                    time.sleep(a.latency_s)
                self._instance(a, sop, parts)
            finally:
                with a._lock:
                    a.in_flight -= 1
        else:
            self._send(404, b"")

    def _instance(self, a: Archive, sop: str, parts: list[str]) -> None:
        a.encodings[self.headers.get("Accept-Encoding", "")] += 1
        match = [it for it in a.items if it.sop == sop and it.series == parts[3]]
        if a.busy[sop] > 0:
            a.busy[sop] -= 1
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif sop in a.fail_instances:
            self._send(500, b"")
        elif not match:
            self._send(404, b"")
        else:
            boundary = "radlens-test-boundary"
            body = (b"preamble\r\n--" + boundary.encode() + b"\r\n"
                    b"Content-Type: application/dicom\r\n\r\n" + match[0].data
                    + b"\r\n--" + boundary.encode() + b"--\r\n")
            self._send(200, body, f'multipart/related; type="application/dicom"; '
                                  f'boundary="{boundary}"')


class Server:
    """``with Server(archive) as url:`` serves ``archive`` at ``url`` (the service root)."""

    def __init__(self, archive: Archive) -> None:
        handler = type("Handler", (_Handler,), {"archive": archive})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{ROOT}"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
