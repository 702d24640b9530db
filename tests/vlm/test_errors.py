"""Every user-error class survives a pickle round trip (as it must to cross from a worker
process: ImageReadError(path, reason) failed to unpickle in the parent, which broke the whole
process pool and the CLI printed 'internal error: BrokenProcessPool')."""

from __future__ import annotations

import pickle

import pytest

import index.dicomweb
import index.errors
import index.volumes
import vlm.errors as E


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _all_subclasses(sub)
    return out


EXAMPLES = [
    E.RadLensError("plain message"),
    E.ImageReadError("/data/a.dcm", "no pixel data"),
    E.SeriesError("/data/series", "mixed orientations"),
    E.ConfigError("bad config"),
    E.ManifestError("bad manifest"),
    E.MissingDependencyError("nibabel", "NIfTI reading", extra="ct"),
    E.Interrupted("stopped", 143, report={"added": 3}),
    index.errors.IndexBusyError("busy"),
    index.errors.IndexCorruptError("corrupt"),
    index.errors.IndexFormatError("format"),
    index.errors.DimensionError("dim"),
    index.volumes.NoVolumesError("none"),
    index.volumes._Duplicate("dup"),
    index.dicomweb.DicomWebError("http://pacs/dicom-web/studies/1: HTTP 500"),
]


def test_the_examples_cover_every_error_class():
    assert {type(e) for e in EXAMPLES} >= {c for c in _all_subclasses(E.RadLensError)
                                           if c.__module__.split(".")[0] in ("vlm", "index")}


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda e: type(e).__name__)
def test_pickle_round_trip_keeps_class_message_and_fields(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error) and back.args == error.args
    assert vars(back) == vars(error)
    assert back.exit_code == error.exit_code
