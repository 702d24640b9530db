"""Zero every GPU code object but one architecture's in a CUDA shared library, in place.

Usage: ``python tools/device/prune_fatbin.py LIB.so OUT.so [--keep 90]``; ``--list`` only
prints what the library holds.

The faiss-gpu wheel's ``libfaiss.so`` carries SASS for sm_70 ... sm_90 plus PTX (about 176 MB
of the 199 MB file). A lent H200 needs only sm_90, and the device tool carries at most 64 MiB,
so the other entries' bytes are overwritten with zeros; the file keeps its size and layout
(no offset changes, nothing to relink) and then compresses to about 20 MB. A fat-binary
container without SASS for ``--keep`` is left as it is. Entries are walked by their own
headers: a container starts with magic 0xBA55ED50, then (kind, header size, payload size,
architecture at byte 28) per entry.
"""

from __future__ import annotations

import argparse
import collections
import struct
import subprocess
import sys
from pathlib import Path

MAGIC = 0xBA55ED50


def section(path: Path, name: str = ".nv_fatbin") -> tuple[int, int]:
    """File offset and size of ``name`` (read with readelf)."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        if f" {name} " in line:
            cols = line.split("]", 1)[1].split()
            return int(cols[3], 16), int(cols[4], 16)
    raise SystemExit(f"{path}: no {name} section")


def prune(data: bytearray, start: int, size: int, keep: int, zero: bool) -> dict[str, object]:
    """Walk the fat binaries in ``data[start:start+size]``; with ``zero``, overwrite every
    payload but sm_``keep`` SASS. Returns bytes per (kind, arch) and the bytes zeroed."""
    seen: collections.Counter[str] = collections.Counter()
    pos, end, zeroed, containers, without = start, start + size, 0, 0, 0
    while pos + 16 <= end:
        magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:
            pos += 8  # containers are 8-byte aligned
            continue
        containers += 1
        entries, e = [], pos + hsize
        while e < pos + hsize + fsize:
            kind, _, ehs, psize = struct.unpack_from("<HHIQ", data, e)
            arch = struct.unpack_from("<I", data, e + 28)[0]
            entries.append((kind, arch, e + ehs, psize))
            seen[f"{'ptx' if kind == 1 else 'sass'}_sm{arch}"] += psize
            e += ehs + psize
        if not any(k == 2 and a == keep for k, a, _, _ in entries):
            without += 1
        elif zero:
            for k, a, p, n in entries:
                if not (k == 2 and a == keep):
                    data[p:p + n] = bytes(n)
                    zeroed += n
        pos += hsize + fsize
    return {"containers": containers, f"without_sass_sm{keep}": without,
            "bytes": dict(sorted(seen.items())), "zeroed": zeroed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("lib", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--keep", type=int, default=90, help="SASS architecture to keep (sm_NN)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    data = bytearray(args.lib.read_bytes())
    start, size = section(args.lib)
    report = prune(data, start, size, args.keep, zero=not args.list)
    print(report)
    if not args.list:
        if args.out is None:
            ap.error("OUT is needed unless --list")
        args.out.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
