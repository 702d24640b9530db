"""Both CT encoders on real CT: seconds and peak memory per volume.

Inputs:

* InVesalius ``Cranium.inv3`` (Debian ``invesalius-examples``): a gzip tar holding
  ``main.plist`` (matrix dtype/shape, spacing x, y, z) and ``matrix.dat``, raw little-endian
  int16 HU in C order (108, 256, 256) = (slice, row, column), spacing 0.957 x 0.957 x 1.5 mm.
  Slice 0 is the skull base side and the last slice the vertex (k inferior->superior, as the
  canonical grid); rows run posterior->anterior (the face at high rows), so they are flipped to
  the canonical anterior->posterior. The file has no direction cosines: left/right is assumed
  radiological (i right->left) and cannot be checked from the file.
* A DICOM series of the real CT slice ``CT_small.dcm`` (pydicom-data), written as a short
  series by ``ui.demo.build_demo_series`` and read back with :func:`vlm.io.read_volume`.

Encoders (weights random unless checkpoints are given; timing does not depend on them):
LeCL slice encoder (embeddings of every axial slice) and DrasCLR (patch features on the body
frame lattice). Without registration the DrasCLR frame is
:func:`vlm.train.drasclr.real_ct_frame`: the bounding box of the largest connected HU > -500
component, [-1, 1] on every axis.

Usage: ``python benchmarks/real_ct.py [--inv3 PATH] [--threads 1] [--official] [--out F]``;
prints one JSON object. Peak memory = the highest resident set size sampled every 2 ms during
the encoder call, minus the resident size just before it (model and volume already loaded,
freed heap returned to the system first with glibc ``malloc_trim``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import plistlib
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

INV3 = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back (glibc), so that the next call's peak is
    not hidden by memory the previous call left in the allocator."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` and return (result, {seconds, peak_mib, rss_before_mib})."""
    _release_free_memory()
    before, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return out, {"seconds": round(seconds, 3), "peak_mib": round((peak[0] - before) / 2**20, 1),
                 "rss_before_mib": round(before / 2**20, 1)}


def read_inv3(path: Path) -> Any:
    """An InVesalius project's CT matrix as a canonical :class:`vlm.io.Volume` (HU)."""
    from vlm.io import ImageMeta, Volume

    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        main = plistlib.load(tar.extractfile(members["main.plist"]))  # type: ignore[arg-type]
        spec = main["matrix"]
        raw = tar.extractfile(members[spec["filename"]]).read()  # type: ignore[union-attr]
    shape = tuple(int(s) for s in spec["shape"])
    arr = np.frombuffer(raw, dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: matrix has {arr.size} values, expected {shape}")
    hu = arr.reshape(shape)[:, ::-1, :].astype(np.float32)  # rows posterior->anterior: flip
    sx, sy, sz = (float(v) for v in main["spacing"])
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, 0.0, sx], [0.0, sy, 0.0], [sz, 0.0, 0.0]]  # (k, j, i) -> LPS
    meta = ImageMeta(source_format="invesalius", modality=main.get("modality"),
                     frames=shape[0], rows=shape[1], columns=shape[2],
                     pixel_spacing=(sy, sx), spacing_source="affine", slice_thickness=sz,
                     units="HU")
    return Volume(array=np.ascontiguousarray(hu), affine=affine, meta=meta)


def run_volume(name: str, vol: Any, lecl: Any, dras: list[tuple[str, Any, tuple[int, int, int]]]
               ) -> dict[str, Any]:
    import torch

    from vlm.data.drasclr_patches import bbox_frame
    from vlm.train.drasclr import real_ct_frame, volume_patch_features
    from vlm.train.lecl import embed_volume

    hu = torch.from_numpy(vol.array)
    frame, frame_cost = measure(lambda: real_ct_frame(vol.array))
    row: dict[str, Any] = {
        "volume": name, "shape": list(vol.shape), "spacing_mm": [round(s, 4) for s in vol.spacing],
        "hu_range": [float(vol.array.min()), float(vol.array.max())],
        "body_frame": {k: frame[k] for k in ("lo", "hi", "definition")},
        "plain_bbox_frame": {k: bbox_frame(vol.array)[k] for k in ("lo", "hi")},
        "frame_seconds": frame_cost["seconds"], "encoders": {}}
    emb, cost = measure(lambda: embed_volume(lecl, hu))
    row["encoders"]["lecl"] = {**cost, "output": list(emb.shape),
                               "seconds_per_slice": round(cost["seconds"] / vol.shape[0], 4)}
    for label, model, lattice in dras:
        def encode(m: Any = model, lat: tuple[int, int, int] = lattice) -> Any:
            return volume_patch_features(m, hu, frame, lat)

        (feats, loc), cost = measure(encode)
        row["encoders"][label] = {**cost, "patches": len(loc), "output": list(feats.shape),
                                  "lattice": list(lattice), "patch": model.cfg.patch_size}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inv3", type=Path, default=INV3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lecl", type=Path, default=None, help="LeCL checkpoint folder")
    ap.add_argument("--drasclr", type=Path, default=None, help="DrasCLR checkpoint folder")
    ap.add_argument("--official", action="store_true",
                    help="also time the official DrasCLR encoder (32^3 patches, 9^3 lattice)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    import vlm  # noqa: F401  (torchvision shim before open_clip/timm)
    from vlm.io import read_volume
    from vlm.models.clear import LeCL
    from vlm.models.drasclr import DrasCLR, DrasCLRConfig
    from vlm.train import drasclr as dr
    from vlm.train import lecl as lc

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lecl = lc.load_lecl(args.lecl) if args.lecl else LeCL(lc.lecl_config("small")).eval()
    if args.drasclr:
        model, lattice = dr.load_drasclr(args.drasclr)
    else:
        lattice = dr.DEFAULT_LATTICE
        model = DrasCLR(dr.drasclr_config("small", lattice=lattice)).eval()
    dras = [("drasclr", model, lattice)]
    if args.official:
        steps = (9, 9, 9)
        dras.append(("drasclr_official", DrasCLR(DrasCLRConfig(
            n_locations=int(np.prod(steps)), queue_size=1)).eval(), steps))

    volumes = []
    if args.inv3.is_file():
        vol, cost = measure(lambda: read_inv3(args.inv3))
        volumes.append(("invesalius_cranium", vol, cost))
    else:
        print(f"{args.inv3}: not found (apt-get install invesalius-examples); skipped",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="real_ct_") as tmp:
        from ui.demo import build_demo_series

        folder = build_demo_series(Path(tmp) / "series")
        vol, cost = measure(lambda: read_volume(folder))
        volumes.append(("pydicom_ct_small_series", vol, cost))
        rows = []
        for name, vol, read_cost in volumes:
            row = run_volume(name, vol, lecl, dras)
            row["read"] = read_cost
            rows.append(row)
    import resource

    result = {"benchmark": "real_ct", "threads": args.threads, "torch": torch.__version__,
              "lecl": {"preset": None if args.lecl else "small (random init)",
                       "image_size": lecl.cfg.vision.image_size},
              "volumes": rows,
              "process_max_rss_mib": round(
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
