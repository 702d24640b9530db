"""vlm/cpus.py: a process pinned to fewer CPUs than the machine has sizes its work by them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vlm.cpus import available_cpus


def test_available_cpus_follows_the_affinity_mask() -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mine = sorted(os.sched_getaffinity(0))
    assert available_cpus() == len(mine)
    out = subprocess.run(
        [sys.executable, "-c", "from vlm.cpus import available_cpus; print(available_cpus())"],
        capture_output=True, text=True, check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, mine[:1]))
    assert out.stdout.strip() == "1"
