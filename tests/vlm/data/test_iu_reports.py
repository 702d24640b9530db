"""IU report parsing and MeSH -> finding labels, checked against an independent re-reading."""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET

import pytest

from vlm.data import iu_reports
from vlm.data.iu_reports import (
    FINDINGS,
    data_path,
    frontal_image,
    load_reports,
    map_mesh_term,
    map_mesh_terms,
    normalise_image_id,
)

N_REPORTS = 3955


def _independent_majors() -> dict[str, list[str]]:
    """Re-read the archive with this test's own code: report uid -> MeSH major terms."""
    out: dict[str, list[str]] = {}
    with tarfile.open(data_path("NLMCXR_reports.tgz")) as tar:
        for member in tar:
            if not member.name.endswith(".xml"):
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            root = ET.parse(fh).getroot()
            uid = root.find("uId").get("id")  # type: ignore[union-attr]
            out[uid] = [(el.text or "").strip() for el in root.iter("major")
                        if (el.text or "").strip()]
    return out


def _keyword_labels(terms: list[str]) -> set[str]:
    """Labels from plain keyword checks on the MeSH head (no use of the vocabulary table)."""
    labels: set[str] = set()
    for term in terms:
        parts = [p.strip().lower() for p in term.split("/")]
        head, quals = parts[0], parts[1:]
        words = set(re.findall(r"[a-z]+", head))
        if "cardiomegaly" in words:
            labels.add("cardiomegaly")
        if {"pleural", "effusion"} <= words:
            labels.add("pleural_effusion")
        if words & {"opacity", "airspace", "infiltrate", "consolidation", "pneumonia"}:
            labels.add("lung_opacity")
        if "atelectasis" in words:
            labels.add("atelectasis")
        if words & {"nodule", "mass"}:
            labels.add("nodule")
        if "granuloma" in words:
            labels.add("calcified_granuloma")
        if words & {"edema", "congestion"}:
            labels.add("pulmonary_edema")
        if ("emphysema" in words and not words & {"subcutaneous", "mediastinal"}) or (
                head == "lung" and "hyperdistention" in quals):
            labels.add("emphysema")
        if any(w.endswith("pneumothorax") for w in words):
            labels.add("pneumothorax")
        if "scoliosis" in words:
            labels.add("scoliosis")
        if "fractures" in words:
            labels.add("fracture")
        if words & {"catheters", "tube", "surgical", "device", "stents", "sutures"}:
            labels.add("support_devices")
    return labels


@pytest.fixture(scope="module")
def reports():
    return load_reports()


def test_parses_every_report_with_sections(reports):
    assert len(reports) == N_REPORTS
    assert len({r.uid for r in reports}) == N_REPORTS
    assert sum(bool(r.findings) for r in reports) > 3300
    assert sum(bool(r.impression) for r in reports) > 3900
    assert sum(len(r.image_ids) for r in reports) > 7400
    assert all(r.mesh_major for r in reports)


def test_labels_agree_with_mesh_for_every_report(reports):
    majors = _independent_majors()
    assert len(majors) == N_REPORTS
    mismatches = []
    for r in reports:
        assert list(r.mesh_major) == majors[r.uid], r.uid
        expected = _keyword_labels(majors[r.uid])
        if set(r.labels) != expected:
            mismatches.append((r.uid, majors[r.uid], r.labels, sorted(expected)))
    assert not mismatches, mismatches[:5]
    # "normal" alone means no finding at all.
    normal = [r for r in reports if [t.lower() for t in r.mesh_major] == ["normal"]]
    assert len(normal) > 1000
    assert all(r.labels == [] for r in normal)
    # every vocabulary entry is used by the archive
    used = {label for r in reports for label in r.labels}
    assert used == set(FINDINGS)


@pytest.mark.parametrize(
    ("term", "finding", "side", "zone", "severity", "multiple"),
    [
        ("Pleural Effusion/left/small", "pleural_effusion", "left", None, "small", False),
        ("Opacity/lung/base/left", "lung_opacity", "left", "base", None, False),
        ("Cardiomegaly/mild", "cardiomegaly", None, None, "mild", False),
        ("Calcified Granuloma/lung/upper lobe/right", "calcified_granuloma", "right", "upper",
         None, False),
        ("Nodule/lung/bilateral/multiple", "nodule", "bilateral", None, None, True),
        ("Lung/hyperdistention/mild", "emphysema", None, None, "mild", False),
        ("Pneumothorax/apex/right/small", "pneumothorax", "right", "apex", "small", False),
        ("Fractures, Bone/ribs/left/healed", "fracture", "left", "ribs", None, False),
        ("Catheters, Indwelling/right", "support_devices", "right", None, None, False),
        ("Pulmonary Congestion/mild", "pulmonary_edema", None, None, "mild", False),
    ],
)
def test_map_mesh_term(term, finding, side, zone, severity, multiple):
    f = map_mesh_term(term)
    assert f is not None
    assert (f.finding, f.side, f.zone, f.severity, f.multiple) == (
        finding, side, zone, severity, multiple)
    assert f.term == term


@pytest.mark.parametrize("term", ["normal", "Lung/hypoinflation", "Calcinosis/lung/hilum",
                                  "Subcutaneous Emphysema/right", "Tuberculosis",
                                  "Granulomatous Disease", "Pericardial Effusion"])
def test_unmapped_terms(term):
    assert map_mesh_term(term) is None


def test_duplicates_merge_and_order_is_stable():
    terms = ["Opacity/lung/base/left", "Airspace Disease/lung/base/left", "Cardiomegaly"]
    found = map_mesh_terms(terms)
    assert [f.finding for f in found] == ["cardiomegaly", "lung_opacity"]
    assert map_mesh_terms(list(reversed(terms)))[0].finding == "cardiomegaly"


def test_vocabulary_is_documented():
    doc = iu_reports.__doc__ or ""
    for name, synonyms in iu_reports.FINDING_VOCABULARY.items():
        assert f"- {name}:" in doc
        for head, _ in synonyms:
            assert head in doc, head


def test_image_ids_and_frontal_choice(reports):
    assert normalise_image_id("CXR1_1_IM-0001-3001") == "CXR1_IM-0001-3001"
    assert normalise_image_id("CXR2_IM-0652-1001") == "CXR2_IM-0652-1001"
    picked = [frontal_image(r) for r in reports]
    with_image = [p for p, r in zip(picked, reports, strict=True) if r.image_ids]
    assert sum(p is None for p in with_image) < 100  # lateral-only studies are rare
    assert sum(1 for p in with_image if p and p[1] == "PA") > 2000
    assert all(p is None for p, r in zip(picked, reports, strict=True) if not r.image_ids)
