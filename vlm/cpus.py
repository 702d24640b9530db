"""How many CPUs this process may use.

``os.cpu_count()`` counts the machine's CPUs. A process restricted to fewer (by Slurm,
``taskset``, ``docker --cpuset-cpus``, or the local engine of ``radlens index build --shards``,
which gives each concurrent shard its own CPUs) that sized its decode processes and encoder
threads by it would run more threads than it has CPUs. RadLens sizes them by the process's
affinity mask instead. (A CPU quota without a cpuset, as Kubernetes CPU limits set, leaves the
mask whole and is not seen.)
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs in this process's affinity mask (the machine's count where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1
