"""A DICOMweb server as an ingestion source (index/dicomweb.py): QIDO-RS listing, WADO-RS
fetching in the decode processes, bad instances listed once, reruns that fetch nothing again,
credentials kept out of URLs, and the same path against a real Orthanc where one is installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from index import dicomweb as dw
from tests.index.dicomweb_server import SR_CLASS, Archive, Server
from tests.tiny_cxr import make_tiny_cxr
from vlm.errors import RadLensError

N = 12  # good images in the archive


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    root = make_tiny_cxr(tmp_path_factory.mktemp("web"), n=N, size=64)
    return sorted((root / "dicom").glob("*.dcm"))


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from vlm.inference import Encoder

    return Encoder(str(tiny_model))


def _archive(files: list[Path]) -> Archive:
    """The good files, plus: one instance the server answers with HTTP 500, one truncated
    object, one structured report (no pixels), and a study whose instances cannot be listed."""
    a = Archive()
    for f in files:
        a.add_file(f)
    broken = a.add_file(files[0], sop="1.2.826.0.1.3680043.10.1.1")
    a.fail_instances.add(broken.sop)
    a.add_file(files[1], sop="1.2.826.0.1.3680043.10.1.2", data=files[1].read_bytes()[:600])
    report = a.add_file(files[2], sop="1.2.826.0.1.3680043.10.1.3")
    report.sop_class = SR_CLASS
    hidden = a.add_file(files[3], sop="1.2.826.0.1.3680043.10.1.4")
    hidden.study = "1.2.826.0.1.3680043.10.9"
    a.fail_studies.add(hidden.study)
    return a


# ------------------------------------------------------------------ the protocol pieces


def test_multipart_reply_gives_its_first_part() -> None:
    body = b"\r\n--b1\r\nContent-Type: application/dicom\r\n\r\nDICM-BYTES\r\n--b1--\r\n"
    assert dw.first_part(body, 'multipart/related; type="application/dicom"; boundary=b1',
                         "x") == b"DICM-BYTES"
    assert dw.first_part(b"RAW", "application/dicom", "x") == b"RAW"
    with pytest.raises(dw.DicomWebError, match="x: the server sent text/html, not DICOM"):
        dw.first_part(b"<html>", "text/html; charset=utf-8", "x")
    with pytest.raises(dw.DicomWebError, match="without a boundary"):
        dw.first_part(body, "multipart/related", "x")
    with pytest.raises(dw.DicomWebError, match="cut short"):
        dw.first_part(body[:40], "multipart/related; boundary=b1", "x")


def test_non_image_sop_classes_are_told_apart() -> None:
    for sop_class in (SR_CLASS, "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.11.1",
                      "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.481.3"):
        assert not dw.holds_image(sop_class), sop_class
    for sop_class in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
                      "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7",
                      "1.2.840.10008.5.1.4.1.1.481.2", "", "1.3.6.1.4.1.9999.1"):
        assert dw.holds_image(sop_class), sop_class


def test_urls_never_carry_credentials_and_auth_comes_from_the_environment() -> None:
    with pytest.raises(RadLensError, match=r"must not hold credentials.*RADLENS_DICOMWEB_TOKEN"):
        dw.DicomWeb("https://alice:s3cret@pacs.example.org/dicom-web")
    with pytest.raises(RadLensError, match="not a DICOMweb URL"):
        dw.DicomWeb("ftp://pacs.example.org/dicom-web")
    web = dw.DicomWeb("https://PACS.example.org:8443/dicom-web/?ModalitiesInStudy=CR",
                      environ={dw.USER_ENV: "alice", dw.PASSWORD_ENV: "s3cret"})
    assert web.display == "https://pacs.example.org:8443/dicom-web?ModalitiesInStudy=CR"
    assert web.headers == {"Authorization": "Basic YWxpY2U6czNjcmV0"}
    assert "s3cret" not in repr(web) and "YWxp" not in repr(web)
    bearer = dw.DicomWeb("http://h/dw", environ={dw.TOKEN_ENV: "tok", dw.USER_ENV: "bob"})
    assert bearer.headers == {"Authorization": "Bearer tok"}
    again = dw.DicomWeb.from_config(bearer.config())
    assert again.root == "http://h/dw" and again.headers == bearer.headers
    assert again.owns("http://h/dw/studies/1/series/2/instances/3")
    assert not again.owns("/data/studies/1.dcm")


def test_listing_pages_through_studies_and_leaves_out_reports(files, monkeypatch) -> None:
    monkeypatch.setattr(dw, "PAGE", 5)  # N + 3 studies take several pages of five
    archive = _archive(files)
    with Server(archive) as url:
        listing = dw.list_instances(dw.DicomWeb(url + "?ModalitiesInStudy=DX"))
    assert len(listing.urls) == N + 2  # the good ones, the HTTP-500 one and the truncated one
    assert listing.not_images == 1
    assert [p["reason"] for p in listing.problems] == ["instance search: HTTP 500 Internal "
                                                       "Server Error"]
    assert all(q.get("ModalitiesInStudy") == "DX" for q in archive.queries)
    assert [q["offset"] for q in archive.queries] == ["0", "5", "10"]


# ------------------------------------------------------------------ ingestion


def test_build_over_dicomweb_lists_bad_instances_once_and_a_rerun_fetches_nothing(
        files, encoder, tmp_path) -> None:
    from index.folder import IndexFolder
    from index.ingest import ingest

    archive = _archive(files)
    out = tmp_path / "idx"
    with Server(archive) as url:
        report = ingest(encoder, url, out, batch_size=4, workers=1, progress=False)
        assert report.added == N and report.not_images == 1 and report.source == url
        reasons = sorted(f["reason"] for f in report.failed)
        assert len(reasons) == 3, reasons
        assert any("HTTP 500" in r for r in reasons)  # the instance the server failed
        assert any("instance search" in r for r in reasons)  # the study it would not list
        assert any("truncated" in r or "DICOM" in r for r in reasons), reasons
        assert not any(r.startswith("http") for r in reasons)  # the path is in "path"
        assert archive.fetched["1.2.826.0.1.3680043.10.1.3"] == 0  # the report: never fetched
        fetched_once = sum(archive.fetched.values())
        assert fetched_once == N + 2
        assert set(archive.encodings) == {"identity"}  # pixel data is not gzipped

        again = ingest(encoder, url, out, batch_size=4, workers=0, progress=False)
        assert again.added == 0 and again.already_indexed == N
        # only the two instances that failed are asked for again
        assert sum(archive.fetched.values()) == fetched_once + 2

    ix = IndexFolder.open(out)
    try:
        items = [ix.catalog.get(i) for i in range(ix.catalog.next_id())]
        images = [it for it in items if it is not None and it.collection == "image"]
        assert len(images) == N
        assert all(it.source_uri.startswith("src-") for it in images)  # no UIDs by default
        assert all(it.instance and it.instance.startswith("im-") for it in images)
        assert all(it.thumbnail and (out / it.thumbnail).is_file() for it in images)
    finally:
        ix.close()
    saved = json.loads((out / "ingest_report.json").read_text())
    assert saved["source"] == url and len(saved["failed"]) == 3


def test_keep_paths_stores_the_instance_url(files, encoder, tmp_path) -> None:
    from index.folder import IndexFolder
    from index.ingest import ingest

    archive = Archive()
    for f in files[:3]:
        archive.add_file(f)
    with Server(archive) as url:
        ingest(encoder, url, tmp_path / "idx", workers=0, progress=False, keep_paths=True)
    ix = IndexFolder.open(tmp_path / "idx")
    try:
        uris = {ix.catalog.get(i).source_uri for i in range(3)}  # type: ignore[union-attr]
    finally:
        ix.close()
    assert uris == {f"{url}/studies/{it.study}/series/{it.series}/instances/{it.sop}"
                    for it in archive.items}


def test_unreachable_or_unauthorised_server_is_one_line_and_creates_nothing(
        files, encoder, tmp_path, monkeypatch) -> None:
    from index.ingest import ingest

    monkeypatch.setattr(dw, "BACKOFF_S", 0.0)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RadLensError, match=r"study search: cannot connect") as err:
        ingest(encoder, f"http://127.0.0.1:{port}/dicom-web", tmp_path / "a", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "a").exists()

    archive = Archive(token="t0k")
    archive.add_file(files[0])
    with Server(archive) as url:
        monkeypatch.delenv(dw.TOKEN_ENV, raising=False)
        with pytest.raises(RadLensError, match=r"HTTP 401 .*RADLENS_DICOMWEB_TOKEN"):
            ingest(encoder, url, tmp_path / "b", progress=False)
        assert not (tmp_path / "b").exists()
        monkeypatch.setenv(dw.TOKEN_ENV, "t0k")
        assert ingest(encoder, url, tmp_path / "b", workers=1, progress=False).added == 1

    with Server(Archive()) as url, pytest.raises(RadLensError,  # an empty server
                                                 match="no image instances to index"):
        ingest(encoder, url, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_a_busy_server_is_asked_again(files, encoder, tmp_path, monkeypatch) -> None:
    """HTTP 503 (with Retry-After) is tried again: twice busy is fetched on the third try,
    always busy is one failure after RETRIES + 1 attempts."""
    from index.ingest import ingest

    monkeypatch.setattr(dw, "BACKOFF_S", 0.0)
    archive = Archive()
    for f in files[:3]:
        archive.add_file(f)
    twice, always = archive.items[0].sop, archive.items[1].sop
    archive.busy[twice], archive.busy[always] = 2, 10**6
    with Server(archive) as url:
        report = ingest(encoder, url, tmp_path / "idx", workers=0, progress=False)
    assert report.added == 2 and archive.fetched[twice] == 3
    assert [f["reason"] for f in report.failed] == [
        f"HTTP 503 Service Unavailable ({dw.RETRIES + 1} attempts)"]
    assert archive.fetched[always] == dw.RETRIES + 1


def test_interrupted_build_resumes_with_one_row_per_instance(files, encoder, tmp_path,
                                                             monkeypatch) -> None:
    from index.folder import IndexFolder
    from index.ingest import ingest
    from vlm.errors import Interrupted

    archive = Archive()
    for f in files:
        archive.add_file(f)
    out = tmp_path / "idx"
    with Server(archive) as url:
        monkeypatch.setenv("RADLENS_TEST_INTERRUPT_AFTER_BATCHES", "1")
        with pytest.raises(Interrupted):
            ingest(encoder, url, out, batch_size=4, workers=0, progress=False)
        monkeypatch.delenv("RADLENS_TEST_INTERRUPT_AFTER_BATCHES")
        first = sum(archive.fetched.values())
        rest = ingest(encoder, url, out, batch_size=4, workers=0, progress=False)
    ix = IndexFolder.open(out)
    try:
        count = ix.catalog.count("image")
        instances = ix.catalog.pseudonyms("instance", "image")
    finally:
        ix.close()
    assert count == N == len(instances)
    assert rest.already_indexed == N - rest.added and 0 < rest.added < N
    assert sum(archive.fetched.values()) - first == rest.added  # nothing saved is refetched


def test_cli_build_from_dicomweb_exits_3_and_lists_each_failure_once(files, tiny_model,
                                                                      tmp_path) -> None:
    archive = _archive(files)
    cmd = [sys.executable, "-c", "import sys; from ui.cli import main; sys.exit(main())",
           "index", "build", "--model", str(tiny_model), "--out", str(tmp_path / "idx"),
           "--no-progress", "--workers", "1"]
    with Server(archive) as url:
        run = subprocess.run([*cmd, "--source", url], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 3, run.stderr[-1500:]
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        assert summary["added"] == N and summary["failed"] == 3
        assert summary["not_images"] == 1
        assert sum(line.startswith("radlens: skipped: http") for line in
                   run.stderr.splitlines()) == 3
        # radiographs only: a volume model finds nothing to index, in one line
        volumes = subprocess.run([*cmd, "--source", url, "--volume-model", "random:lecl-tiny"],
                                 capture_output=True, text=True, timeout=300)
    assert volumes.returncode == 2
    assert volumes.stderr.strip().splitlines()[-1] == (
        f"radlens: error: {url}: no volumes to index (series of at least 3 instances; "
        f"{N} shorter series passed over); 1 passed over, the first: {url}/studies/"
        "1.2.826.0.1.3680043.10.9: series search: HTTP 500 Internal Server Error")


# ------------------------------------------------------------------ volumes (CT series)


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    from vlm.data.phantom_ct import generate_phantom_ct

    root = tmp_path_factory.mktemp("ct")
    generate_phantom_ct(root, n=3, shape=(32, 32, 32), seed=5, workers=1)
    return root


def _series_files(ct: Path) -> list[list[Path]]:
    from vlm.data.manifest import read_jsonl

    return [sorted((ct / r["dicom_dir"]).glob("*.dcm")) for r in read_jsonl(ct / "manifest.jsonl")]


def _radlens_temp_folders() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("radlens-series-*")}


def test_ct_series_over_dicomweb_become_volumes_like_the_same_folder(ct, files, tmp_path
                                                                     ) -> None:
    """Each CT series becomes one volume with the vector a folder build gives the same files;
    radiographs (one-instance series) are counted, not fetched; a series with an instance the
    server fails is one failure, named by its URL; a rerun fetches nothing; the fetched
    slices do not stay on disk."""
    from index.folder import IndexFolder
    from index.volumes import VOLUME, ingest_volumes
    from vlm.volume_encoder import VolumeEncoder

    encoder = VolumeEncoder.load("random:lecl-tiny@0")
    series = _series_files(ct)
    archive = Archive()
    for group in series:
        for f in group:
            archive.add_file(f)
    for f in files[:2]:
        archive.add_file(f)  # two radiographs
    broken = archive.add_file(series[2][0], sop="1.2.826.0.1.3680043.10.2.1")
    archive.fail_instances.add(broken.sop)  # one more slice of series 2, which the server fails
    before = _radlens_temp_folders()
    with Server(archive) as url:
        report = ingest_volumes(encoder, url, tmp_path / "web", progress=False)
        assert report.added == 2 and report.short_series == 2, report.failed
        assert [f["path"] for f in report.failed] == [
            f"{url}/studies/{broken.study}/series/{broken.series}"]
        assert "HTTP 500" in report.failed[0]["reason"]
        fetched = sum(archive.fetched.values())
        assert fetched == sum(len(g) for g in series) + 1  # no radiograph asked for
        again = ingest_volumes(encoder, url, tmp_path / "web", progress=False)
        assert again.added == 0 and again.already_indexed == 2
        assert sum(archive.fetched.values()) - fetched == len(series[2]) + 1  # the failed one
    assert _radlens_temp_folders() == before
    ingest_volumes(encoder, ct, tmp_path / "folder", progress=False)

    def vectors(path: Path) -> dict[str, list[float]]:
        ix = IndexFolder.open(path)
        try:
            items = [ix.catalog.get(int(i)) for i in ix.catalog.filter_ids(VOLUME)]
            return {it.series: ix.collection(VOLUME).vectors([it.id])[0].tolist()
                    for it in items if it is not None and it.series}
        finally:
            ix.close()

    web, folder = vectors(tmp_path / "web"), vectors(tmp_path / "folder")
    assert len(web) == 2 and set(web) < set(folder)
    for key, vec in web.items():
        assert vec == pytest.approx(folder[key], abs=1e-5)


def test_ctrl_c_during_a_dicomweb_volume_build_leaves_no_fetched_slices(ct, tmp_path,
                                                                       monkeypatch) -> None:
    """Series are fetched one ahead of the encoder; a stop after the first volume saves it,
    drops the series fetched ahead (its folder removed), and a rerun fetches only the rest."""
    import signal

    from index.volumes import ingest_volumes
    from vlm.errors import Interrupted
    from vlm.volume_encoder import VolumeEncoder

    enc = VolumeEncoder.load("random:lecl-tiny@0")
    encode, calls = enc.encode, []

    def encode_then_ctrl_c(volume):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return encode(volume)

    monkeypatch.setattr(enc, "encode", encode_then_ctrl_c)
    series = _series_files(ct)
    archive = Archive()
    for group in series:
        for f in group:
            archive.add_file(f)
    before = _radlens_temp_folders()
    with Server(archive) as url:
        with pytest.raises(Interrupted) as stopped:
            ingest_volumes(enc, url, tmp_path / "idx", progress=False)
        assert stopped.value.report.added == 1 and stopped.value.report.unread == 2
        assert _radlens_temp_folders() == before
        first = sum(archive.fetched.values())
        assert first <= sum(len(g) for g in series[:2])  # at most one series ahead
        monkeypatch.setattr(enc, "encode", encode)
        rest = ingest_volumes(enc, url, tmp_path / "idx", progress=False)
    assert rest.added == 2 and rest.already_indexed == 1
    assert _radlens_temp_folders() == before


def test_cli_indexes_images_and_volumes_from_one_dicomweb_source(ct, files, tiny_model,
                                                                 tmp_path) -> None:
    archive = Archive()
    for group in _series_files(ct):
        for f in group:
            archive.add_file(f)
    for f in files[:3]:
        archive.add_file(f)
    with Server(archive) as url:
        run = subprocess.run(
            [sys.executable, "-c", "import sys; from ui.cli import main; sys.exit(main())",
             "index", "build", "--model", str(tiny_model), "--volume-model",
             "random:lecl-tiny@0", "--source", url, "--out", str(tmp_path / "idx"),
             "--no-progress", "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-1500:]
    images, volumes = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert images["added"] == len(archive.items)  # every slice and radiograph is an image
    assert volumes["added"] == 3 and volumes["short_series"] == 3


# ------------------------------------------------------------------ a real Orthanc


@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc with its DICOMweb plugin on this machine only (tests/orthanc.py)."""
    from tests import orthanc as server

    if not server.available():
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (CI installs it)")
    with server.running(tmp_path / "orthanc") as base:
        yield base


def test_orthanc_archive_is_indexed_and_a_rerun_adds_nothing(files, ct, encoder, orthanc,
                                                             tmp_path) -> None:
    """Radiographs and CT series stored in a real Orthanc: the radiographs (and every CT
    slice) as images, each CT series as a volume; reruns add nothing."""
    from index.ingest import ingest
    from index.volumes import ingest_volumes
    from tests.orthanc import upload
    from vlm.volume_encoder import VolumeEncoder

    slices = [f for group in _series_files(ct) for f in group]
    upload(orthanc, files + slices)
    url = f"{orthanc}/dicom-web"
    first = ingest(encoder, url, tmp_path / "idx", batch_size=4, progress=False)
    assert first.added == N + len(slices) and not first.failed, first.failed
    again = ingest(encoder, url, tmp_path / "idx", batch_size=4, progress=False)
    assert again.added == 0 and again.already_indexed == N + len(slices)
    volumes = VolumeEncoder.load("random:lecl-tiny@0")
    vol = ingest_volumes(volumes, url, tmp_path / "idx", progress=False)
    assert vol.added == 3 and vol.short_series == N and not vol.failed, vol.failed
    assert ingest_volumes(volumes, url, tmp_path / "idx", progress=False).already_indexed == 3
    # a study query on the URL goes to the server: no study has modality MR
    with pytest.raises(RadLensError, match="no image instances to index"):
        ingest(encoder, url + "?ModalitiesInStudy=MR", tmp_path / "mr", progress=False)


def test_a_distant_server_gets_more_fetches_at_once(files, encoder, tmp_path) -> None:
    """With every answer 60 ms away, the decoder keeps widening its fetch window (it waits
    far longer than a decode), so several requests are on the way at once, and every
    instance still arrives once and is indexed once."""
    from index import ingest as ing

    archive = Archive(latency_s=0.06)
    for f in files:
        archive.add_file(f)
    ing._WINDOW = 1
    with Server(archive) as url:
        report = ing.ingest(encoder, url, tmp_path / "idx", workers=0, progress=False)
    assert report.added == N and not report.failed
    assert archive.most_in_flight >= 4 and ing._WINDOW >= 4
    assert sorted(archive.fetched.values()) == [1] * N


def test_an_erased_instance_is_never_fetched_again(files, encoder, tmp_path) -> None:
    """``radlens index remove`` withholds an erased instance from later pulls by its
    pseudonym: the server is not even asked for it."""
    from index.ingest import ingest
    from index.remove import remove_items

    archive = Archive()
    stored = [archive.add_file(f) for f in files[:4]]
    out = tmp_path / "idx"
    with Server(archive) as url:
        assert ingest(encoder, url, out, batch_size=4, workers=0, progress=False).added == 4
        erased = remove_items(out, instances=[stored[1].sop])
        assert erased.matched["image"] == 1 and erased.withheld == 2
        before = sum(archive.fetched.values())
        again = ingest(encoder, url, out, batch_size=4, workers=0, progress=False)
        assert (again.added, again.withheld, again.already_indexed) == (0, 1, 3)
        assert sum(archive.fetched.values()) == before  # nothing was fetched
