"""vlm.allocator: glibc keeps freed large blocks for reuse instead of mapping them anew."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from vlm import allocator
from vlm.allocator import tune_allocator

GLIBC = platform.libc_ver()[0] == "glibc"

# 20 mallocs of 64 MB (as a torch activation: plain malloc, no huge-page advice), each written
# and freed: with glibc's defaults every one is a fresh mmap (64 MB / 4 KiB = 16,384 page
# faults each); reused from the heap, only the first one faults.
PROBE = """
import ctypes, json, resource
from vlm.allocator import tune_allocator
t = tune_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = libc.malloc(64 << 20); ctypes.memset(a, 1, 64 << 20); libc.free(a)
r1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": t.applied, "reason": t.reason, "faults": r1 - r0}))
"""


def _probe(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env={**os.environ, allocator.ENV: setting})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt settings are glibc's")
def test_tuned_process_reuses_freed_blocks_instead_of_faulting_them_in_again():
    default, tuned = _probe("default"), _probe("tuned")
    assert not default["applied"] and "defaults kept" in default["reason"]
    assert tuned["applied"], tuned["reason"]
    pages = (64 << 20) // 4096
    assert default["faults"] >= 15 * pages  # each allocation mapped and faulted anew
    assert tuned["faults"] <= 3 * pages  # the first one, then reuse
    assert tuned["faults"] * 5 < default["faults"]


def test_unknown_setting_and_other_c_libraries_are_left_alone(monkeypatch):
    called = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: called.append(a))
    t = tune_allocator({allocator.ENV: "fast"})
    assert not t.applied and "not understood" in t.reason
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    t = tune_allocator({})
    assert not t.applied and "musl" in t.reason
    assert called == []  # mallopt never looked up


def test_cli_applies_it_at_start(monkeypatch, capsys):
    from ui import cli

    seen = []

    def fake(environ=None):
        seen.append(True)
        return allocator.AllocatorTuning(False, "test")

    monkeypatch.setattr(allocator, "tune_allocator", fake)
    assert cli.main(["index", "info", "/nonexistent/index"]) != 0
    assert seen == [True]
    capsys.readouterr()
