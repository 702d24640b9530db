"""``tools/device/prune_fatbin.py``: on a synthetic fat binary, it zeroes every payload but
the kept architecture's SASS, keeps the layout byte for byte, and leaves a container that
lacks that SASS untouched."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "device" / "prune_fatbin.py"


def _tool():
    spec = importlib.util.spec_from_file_location("prune_fatbin", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x0101, len(header), len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def _container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


def test_zeroes_all_but_the_kept_sass():
    tool = _tool()
    a = _container(_entry(2, 80, b"\x80" * 40), _entry(2, 90, b"\x90" * 24),
                   _entry(1, 90, b"P" * 32))
    b = _container(_entry(2, 75, b"\x75" * 16))  # no sm_90 SASS: left alone
    blob = bytearray(b"HOSTCODE" + a + b + b"TAIL....")
    before = bytes(blob)
    report = tool.prune(blob, 8, len(a) + len(b), 90, zero=True)
    assert report["containers"] == 2 and report["without_sass_sm90"] == 1
    assert report["zeroed"] == 40 + 32
    assert report["bytes"] == {"ptx_sm90": 32, "sass_sm75": 16, "sass_sm80": 40,
                               "sass_sm90": 24}
    assert len(blob) == len(before) and blob[:8] == before[:8] and blob[-8:] == before[-8:]
    assert b"\x90" * 24 in blob and b"\x75" * 16 in blob
    assert b"\x80" not in blob and b"P" * 32 not in blob
    listed = bytearray(before)
    assert tool.prune(listed, 8, len(a) + len(b), 90, zero=False)["zeroed"] == 0
    assert bytes(listed) == before
