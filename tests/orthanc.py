"""Start a real Orthanc with its DICOMweb plugin (Debian ``orthanc``, ``orthanc-dicomweb``) for
the DICOMweb tests and ``benchmarks/dicomweb_ingest.py``: on free high ports, this machine
only (``RemoteAccessAllowed`` false; Orthanc has no bind-address option), storage in a given
folder, stopped by its own pid."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def available() -> bool:
    return shutil.which("Orthanc") is not None and PLUGIN.exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(folder: Path, start_s: float = 30.0) -> Iterator[str]:
    """``with running(tmp) as base:`` Orthanc's REST root (``base + "/dicom-web"`` is the
    DICOMweb service)."""
    import requests

    binary = shutil.which("Orthanc")
    if binary is None or not PLUGIN.exists():
        raise RuntimeError("Orthanc with the DICOMweb plugin is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    http, dicom = free_port(), free_port()
    config = folder / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "radlens-test", "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"), "HttpPort": http, "DicomPort": dicom,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    proc = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=folder)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            try:
                if requests.get(f"{base}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def upload(base: str, files: list[Path]) -> None:
    """Store ``files`` through Orthanc's REST API (one keep-alive connection)."""
    import requests

    with requests.Session() as s:
        for f in files:
            reply = s.post(f"{base}/instances", data=f.read_bytes(), timeout=60)
            reply.raise_for_status()
