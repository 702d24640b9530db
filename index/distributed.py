"""Build one index over many machines: shard builds run by an existing distributed engine,
then one merge (:mod:`index.shard`, :mod:`index.merge`).

:func:`build_distributed` cuts the source into ``shards`` parts, has an *engine* run one
``radlens index build --shard I/N`` per part, each into its own folder under ``work_dir``, and
merges the finished shards into ``out``. Each shard runs as a subprocess of the engine's worker
(:func:`run_shard`), so it gets RadLens's own decode processes and signal handling whatever the
engine's worker is (a daemonic Dask worker may not start processes itself), and a crash in a
shard fails that task, not the worker. Engines:

* ``local`` or ``local:P``: P shards at a time on this machine (default 1), each pinned to
  its own share of the CPUs (:func:`vlm.cpus.available_cpus` then sizes its work by it);
* ``dask:ADDRESS``: a running Dask distributed scheduler (``tcp://host:8786``); ``dask:local``
  starts a local cluster, one single-threaded worker process per core;
* ``ray`` or ``ray:ADDRESS``: a Ray cluster (``ray.init(address)``; ``ray`` alone: the one
  named by ``RAY_ADDRESS``, or a local one);
* ``spark`` or ``spark:MASTER``: Spark (``local[*]``, ``spark://host:7077``, ``yarn``), one
  partition per shard.

What every worker needs: RadLens installed, the checkpoint folder(s) and the source (a folder
on shared storage, or the DICOMweb server) at the paths given, ``work_dir`` on storage the
driver can read, and the same site secret (``RADLENS_SITE_SECRET``; a shard built under
another one is refused by the merge). The secret is never put into the tasks: engines log and
store task payloads.

Rerunning the same command resumes: a shard that finished is not rebuilt from scratch (its
build adds only what is missing, i.e. nothing), a shard that was cut off continues, and the
merge adds only rows ``out`` does not hold.

Public API: :class:`ShardTask`, :func:`run_shard`, :func:`runner`, :func:`build_distributed`,
:class:`DistributedReport`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from index.dicomweb import is_dicomweb
from index.merge import MergeReport, merge_indexes
from index.shard import Shard
from vlm.cpus import available_cpus
from vlm.errors import RadLensError

logger = logging.getLogger(__name__)

#: exit codes of a shard build whose index is complete (3: some files could not be read)
COMPLETE = (0, 3)
#: characters of a failed shard's stderr kept in the report
STDERR_TAIL = 2000

Runner = Callable[[Callable[[dict[str, Any]], dict[str, Any]], list[dict[str, Any]]],
                  list[dict[str, Any]]]


@dataclass(frozen=True)
class ShardTask:
    """One shard build: what :func:`run_shard` runs on a worker (plain, picklable values)."""

    shard: str  # "I/N"
    source: str
    out: str
    model: str | None = None
    volume_model: str | None = None
    device: str = "cpu"
    amp: str | None = None
    keep_paths: bool = False
    batch_size: int = 32
    workers: int | None = None
    save_every: int = 512
    #: CPUs the build is pinned to (the local engine's share of this machine); None: all
    cpus: list[int] | None = None

    def argv(self) -> list[str]:
        """The ``radlens`` arguments of this build."""
        args = ["index", "build", "--source", self.source, "--out", self.out, "--shard",
                self.shard, "--no-progress", "--device", self.device,
                "--batch-size", str(self.batch_size), "--save-every", str(self.save_every)]
        if self.model:
            args += ["--model", self.model]
        if self.volume_model:
            args += ["--volume-model", self.volume_model]
        if self.amp:
            args += ["--amp", self.amp]
        if self.keep_paths:
            args.append("--keep-paths")
        if self.workers is not None:
            args += ["--workers", str(self.workers)]
        return args


def run_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Build one shard in a ``radlens`` subprocess of this (worker) process; never raises.

    Returns:
        ``{"shard", "out", "rc", "summaries", "stderr", "seconds", "host", "cpus"}``: the exit
        code, the JSON summary lines the build printed (images, then volumes), for a failed
        build the end of its stderr, and the CPUs it was pinned to.
    """
    t = ShardTask(**task)
    start = time.time()
    # pinned before anything is imported, so that every thread the build starts inherits it
    pin = f"import os; os.sched_setaffinity(0, {sorted(t.cpus)!r}); " if t.cpus else ""
    cmd = [sys.executable, "-c", f"{pin}import sys; from ui.cli import main; sys.exit(main())",
           *t.argv()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except OSError as exc:  # no Python at that path on the worker, ...
        rc, out, err = 127, "", f"could not start the shard build: {exc}"
    summaries = []
    for line in out.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            summaries.append(obj)
    return {"shard": t.shard, "out": t.out, "rc": rc, "summaries": summaries,
            "stderr": "" if rc in COMPLETE else err[-STDERR_TAIL:],
            "seconds": round(time.time() - start, 3), "host": os.uname().nodename,
            "cpus": t.cpus}


def _local(processes: int) -> Runner:
    """P shard builds at a time, each pinned to its own share of this process's CPUs (so
    that each sizes its decode processes and encoder threads by its share instead of all P
    oversubscribing the machine)."""
    def run(fn: Callable[[dict[str, Any]], dict[str, Any]], tasks: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
        p = max(1, min(processes, len(tasks)))
        cpus = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else [])
        shares: list[list[int] | None] = ([cpus[i::p] for i in range(p)] if len(cpus) >= p
                                          else [None] * p)
        free: queue.Queue[int] = queue.Queue()
        for slot in range(p):
            free.put(slot)

        def one(task: dict[str, Any]) -> dict[str, Any]:
            slot = free.get()
            try:
                return fn({**task, "cpus": shares[slot]})
            finally:
                free.put(slot)

        with ThreadPoolExecutor(max_workers=p) as pool:
            return list(pool.map(one, tasks))
    return run


def _dask(address: str) -> Runner:
    def run(fn: Callable[[dict[str, Any]], dict[str, Any]], tasks: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise RadLensError("the dask engine needs Dask distributed: pip install "
                               "'radlens[distributed]'") from None
        cluster = None
        if address == "local":
            cluster = LocalCluster(n_workers=available_cpus(), threads_per_worker=1,
                                   processes=True, dashboard_address=None)
            client = Client(cluster)
        else:
            try:
                client = Client(address, timeout=30)
            except (OSError, TimeoutError) as exc:
                raise RadLensError(f"cannot reach the Dask scheduler at {address}: "
                                   f"{exc}") from None
        try:
            # pure=False: a rerun must run the build again, not reuse a cached result
            futures = client.map(fn, tasks, pure=False,
                                 key=[f"radlens-shard-{t['shard'].replace('/', '-of-')}"
                                      f"-{time.time_ns()}" for t in tasks])
            return list(client.gather(futures))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    return run


def _ray(address: str | None) -> Runner:
    def run(fn: Callable[[dict[str, Any]], dict[str, Any]], tasks: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
        try:
            import ray
        except ImportError:
            raise RadLensError("the ray engine needs Ray: pip install ray") from None
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        try:
            remote = ray.remote(num_cpus=1, max_retries=0)(fn)
            return list(ray.get([remote.remote(t) for t in tasks]))
        finally:
            if started:
                ray.shutdown()
    return run


def _spark(master: str | None) -> Runner:
    def run(fn: Callable[[dict[str, Any]], dict[str, Any]], tasks: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise RadLensError("the spark engine needs PySpark: pip install pyspark") from None
        started = SparkSession.getActiveSession() is None
        builder = SparkSession.builder.appName("radlens-index-build")
        if master:
            builder = builder.master(master)
        spark = builder.getOrCreate()
        try:
            # one partition per shard; run_shard never raises, so Spark does not retry a
            # failed shard (its result says why)
            return spark.sparkContext.parallelize(tasks, len(tasks)).map(fn).collect()
        finally:
            if started:
                spark.stop()
    return run


def runner(engine: str) -> Runner:
    """The runner for an engine name (see the module docstring).

    Raises:
        RadLensError: an unknown engine or a malformed ``local:P``.
    """
    kind, _, arg = engine.partition(":")
    kind = kind.strip().lower()
    if kind == "local":
        try:
            processes = int(arg) if arg else 1
        except ValueError:
            processes = 0
        if processes < 1:
            raise RadLensError(f"--engine local:P takes a number of shards at a time, not "
                               f"{arg!r}")
        return _local(processes)
    if kind == "dask":
        if not arg:
            raise RadLensError("--engine dask needs the scheduler: dask:tcp://host:8786, or "
                               "dask:local for a cluster on this machine")
        return _dask(arg)
    if kind == "ray":
        return _ray(arg or None)
    if kind == "spark":
        return _spark(arg or None)
    raise RadLensError(f"unknown --engine {engine!r}: use local[:P], dask:ADDRESS, "
                       "ray[:ADDRESS] or spark[:MASTER]")


@dataclass
class DistributedReport:
    """What :func:`build_distributed` did: the shard builds, then the merge."""

    engine: str
    shards: list[dict[str, Any]] = field(default_factory=list)
    #: shards whose build did not finish (exit code other than 0 or 3): not merged this time
    unfinished: list[str] = field(default_factory=list)
    #: shards that finished but could not read some files (listed in the merge report)
    with_failures: list[str] = field(default_factory=list)
    merge: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shard_tasks(source: str | os.PathLike[str], work_dir: str | os.PathLike[str], shards: int,
                **options: Any) -> list[ShardTask]:
    """One task per shard; folder paths made absolute (the workers' view of shared storage)."""
    if shards < 1:
        raise RadLensError(f"--shards must be at least 1, not {shards}")
    src = str(source) if is_dicomweb(source) else str(Path(source).resolve())
    work = Path(work_dir).resolve()
    for key in ("model", "volume_model"):
        value = options.get(key)
        if value and Path(value).exists():
            options[key] = str(Path(value).resolve())
    width = max(5, len(str(shards)))
    return [ShardTask(shard=str(Shard(i, shards)), source=src,
                      out=str(work / f"shard-{i:0{width}d}-of-{shards:0{width}d}"), **options)
            for i in range(shards)]


def build_distributed(source: str | os.PathLike[str], out: str | os.PathLike[str], *,
                      shards: int, work_dir: str | os.PathLike[str], engine: str = "local",
                      progress: bool = False, run: Runner | None = None,
                      **options: Any) -> DistributedReport:
    """Build ``shards`` shard indexes of ``source`` under ``work_dir`` through ``engine`` and
    merge the finished ones into ``out``. ``options``: :class:`ShardTask` fields (model,
    volume_model, device, amp, keep_paths, batch_size, workers, save_every).

    Raises:
        RadLensError: no model given, an unknown engine, or no shard finished.
    """
    if not options.get("model") and not options.get("volume_model"):
        raise RadLensError("give --model (2-D images), --volume-model (volumes) or both")
    start = time.time()
    tasks = shard_tasks(source, work_dir, shards, **options)
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    execute = run or runner(engine)
    logger.info("building %d shards with %s under %s", shards, engine, work_dir)
    results = execute(run_shard, [asdict(t) for t in tasks])
    report = DistributedReport(engine=engine, shards=sorted(results, key=lambda r: r["out"]))
    done: list[str] = []
    for r in report.shards:
        if r["rc"] in COMPLETE:
            done.append(r["out"])
            if r["rc"] == 3:
                report.with_failures.append(r["shard"])
        else:
            report.unfinished.append(r["shard"])
    if not done:
        first = report.shards[0] if report.shards else {"shard": "-", "stderr": "no result"}
        last = (first["stderr"].strip().splitlines() or ["no message"])[-1]
        raise RadLensError(f"no shard build finished; shard {first['shard']}: {last}")
    merged: MergeReport = merge_indexes(done, out, progress=progress)
    report.merge = merged.to_dict()
    report.seconds = round(time.time() - start, 3)
    return report
