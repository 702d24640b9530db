from __future__ import annotations

import collections

import pytest

from vlm.data.manifest import read_jsonl, split_for, write_jsonl


def test_split_is_deterministic_and_balanced():
    keys = [f"patient-{i}" for i in range(5000)]
    first = [split_for(k, seed=3) for k in keys]
    assert first == [split_for(k, seed=3) for k in keys]
    counts = collections.Counter(first)
    assert abs(counts["train"] / 5000 - 0.7) < 0.03
    assert abs(counts["val"] / 5000 - 0.1) < 0.02
    assert abs(counts["test"] / 5000 - 0.2) < 0.03
    # another seed reshuffles
    assert first != [split_for(k, seed=4) for k in keys]


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError):
        split_for("x", fractions=(0.5, 0.5, 0.5))


def test_jsonl_roundtrip_is_byte_stable(tmp_path):
    rows = [{"b": 1, "a": [1.5, "x"]}, {"a": None, "é": "ü"}]
    p1 = write_jsonl(tmp_path / "m1.jsonl", rows)
    p2 = write_jsonl(tmp_path / "m2.jsonl", [dict(reversed(list(r.items()))) for r in rows])
    assert p1.read_bytes() == p2.read_bytes()
    assert list(read_jsonl(p1)) == rows
    assert not list(tmp_path.glob(".*.tmp"))


def test_worker_count_means_what_the_option_says(monkeypatch):
    from vlm.data import manifest
    from vlm.data.manifest import worker_count
    from vlm.errors import RadLensError

    monkeypatch.setattr(manifest, "available_cpus", lambda: 8)
    assert worker_count(None, 100) == 8 and worker_count(None, 3) == 3
    assert worker_count(0, 100) == 1  # this process (it meant all cores)
    assert worker_count(4, 100) == 4 and worker_count(4, 0) == 1
    with pytest.raises(RadLensError, match="got -2"):  # it ran one worker in silence
        worker_count(-2, 100)
