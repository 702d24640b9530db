"""Indiana University chest X-ray reports (Open-i, via torchxrayvision) and their MeSH labels.

The 3,955 radiology reports ship inside the installed ``torchxrayvision`` package as
``data/NLMCXR_reports.tgz`` (one XML file per report). They are licensed CC BY-NC-ND 4.0, so
RadLens reads them at run time and never copies report text into the repository.

Each report carries NLM MeSH "major" terms written as ``Head/qualifier/qualifier...``, e.g.
``Pleural Effusion/left/small`` or ``Opacity/lung/base/left``. :data:`FINDING_VOCABULARY` maps
head terms (optionally requiring one qualifier) onto RadLens finding names; the remaining
qualifiers give the side (:data:`SIDES`), zone (:data:`ZONES`) and severity (:data:`SEVERITIES`).

Finding vocabulary (finding: MeSH head terms [required qualifier]):

- cardiomegaly: Cardiomegaly
- pleural_effusion: Pleural Effusion
- lung_opacity: Opacity, Airspace Disease, Infiltrate, Consolidation, Pneumonia
- atelectasis: Pulmonary Atelectasis
- nodule: Nodule, Mass
- calcified_granuloma: Calcified Granuloma, Granuloma
- pulmonary_edema: Pulmonary Edema, Pulmonary Congestion
- emphysema: Emphysema, Pulmonary Emphysema, Bullous Emphysema, Lung [hyperdistention]
- pneumothorax: Pneumothorax, Hydropneumothorax, Hemopneumothorax
- scoliosis: Scoliosis
- fracture: Fractures, Bone
- support_devices: Catheters, Indwelling; Tube, Inserted; Surgical Instruments;
  Implanted Medical Device; Medical Device; Stents; Sutures

``normal`` (and every unmapped term, e.g. ``Calcinosis`` or ``Granulomatous Disease``) gives no
finding.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import logging
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

REPORTS_ARCHIVE = "NLMCXR_reports.tgz"
IMAGE_METADATA = "nlmcxr_dicom_metadata.csv.gz"
LUNG_MASKS = "semantic_masks_v7labs_lungs.zip"
REPORT_LICENSE = "CC BY-NC-ND 4.0"

# finding -> tuple of (MeSH head term, required qualifier or None). Heads compare case-insensitive.
FINDING_VOCABULARY: dict[str, tuple[tuple[str, str | None], ...]] = {
    "cardiomegaly": (("Cardiomegaly", None),),
    "pleural_effusion": (("Pleural Effusion", None),),
    "lung_opacity": (("Opacity", None), ("Airspace Disease", None), ("Infiltrate", None),
                     ("Consolidation", None), ("Pneumonia", None)),
    "atelectasis": (("Pulmonary Atelectasis", None),),
    "nodule": (("Nodule", None), ("Mass", None)),
    "calcified_granuloma": (("Calcified Granuloma", None), ("Granuloma", None)),
    "pulmonary_edema": (("Pulmonary Edema", None), ("Pulmonary Congestion", None)),
    "emphysema": (("Emphysema", None), ("Pulmonary Emphysema", None),
                  ("Bullous Emphysema", None), ("Lung", "hyperdistention")),
    "pneumothorax": (("Pneumothorax", None), ("Hydropneumothorax", None),
                     ("Hemopneumothorax", None)),
    "scoliosis": (("Scoliosis", None),),
    "fracture": (("Fractures, Bone", None),),
    "support_devices": (("Catheters, Indwelling", None), ("Tube, Inserted", None),
                        ("Surgical Instruments", None), ("Implanted Medical Device", None),
                        ("Medical Device", None), ("Stents", None), ("Sutures", None)),
}
FINDINGS = tuple(sorted(FINDING_VOCABULARY))
SIDES = ("left", "right", "bilateral")
# Zone qualifiers -> canonical zone (vertical level in the lung or, for bones/devices, a site).
ZONES = {
    "apex": "apex", "upper lobe": "upper", "hilum": "middle", "middle lobe": "middle",
    "lingula": "middle", "retrocardiac": "lower", "lower lobe": "lower", "base": "base",
    "costophrenic angle": "base", "ribs": "ribs", "clavicle": "clavicle",
    "thoracic vertebrae": "spine", "lumbar vertebrae": "spine", "cervical vertebrae": "spine",
    "spine": "spine", "sternum": "spine", "humerus": "shoulder", "shoulder": "shoulder",
    "mediastinum": "mediastinum", "heart": "mediastinum", "aortic valve": "mediastinum",
    "mitral valve": "mediastinum", "trachea": "mediastinum", "trachea, carina": "mediastinum",
    "abdomen": "abdomen", "neck": "neck",
}
# Severity qualifiers, mildest first (the order is used to pick the stronger one).
SEVERITIES = ("borderline", "small", "mild", "moderate", "large", "severe")
MULTIPLICITY = ("multiple", "scattered")

_IMAGE_ID = re.compile(r"^(CXR\d+)_\d+_(IM-.*)$")


@dataclass(frozen=True)
class Finding:
    """One labelled finding taken from a MeSH major term."""

    finding: str
    side: str | None
    zone: str | None
    severity: str | None
    multiple: bool
    term: str


@dataclass(frozen=True)
class Report:
    """One IU chest X-ray report (text sections, image ids, raw MeSH major terms)."""

    uid: str
    comparison: str
    indication: str
    findings: str
    impression: str
    image_ids: tuple[str, ...]
    mesh_major: tuple[str, ...]
    extra_sections: dict[str, str] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Sorted unique finding names of this report."""
        return sorted({f.finding for f in map_mesh_terms(self.mesh_major)})


def data_path(name: str) -> Path:
    """Path of a file in torchxrayvision's ``data`` folder (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torchxrayvision is not installed; it ships the IU reports")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "data" / name
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"torchxrayvision has no data/{name}")


def map_mesh_term(term: str) -> Finding | None:
    """Map one MeSH major term (``Head/qual/...``) onto the finding vocabulary, or ``None``."""
    parts = [p.strip() for p in term.split("/")]
    head = parts[0].lower()
    quals = [q.lower() for q in parts[1:] if q]
    name = None
    for finding, synonyms in FINDING_VOCABULARY.items():
        for syn_head, required in synonyms:
            if head == syn_head.lower() and (required is None or required in quals):
                name = finding
                break
        if name:
            break
    if name is None:
        return None
    side = next((q for q in quals if q in SIDES), None)
    zone = next((ZONES[q] for q in quals if q in ZONES), None)
    sev = [q for q in quals if q in SEVERITIES]
    severity = max(sev, key=SEVERITIES.index) if sev else None
    multiple = any(q in MULTIPLICITY for q in quals)
    return Finding(name, side, zone, severity, multiple, term.strip())


def map_mesh_terms(terms: tuple[str, ...] | list[str]) -> list[Finding]:
    """Map all terms of one report; duplicates (same finding, side and zone) are merged."""
    out: dict[tuple[str, str | None, str | None], Finding] = {}
    for term in terms:
        f = map_mesh_term(term)
        if f is None:
            continue
        key = (f.finding, f.side, f.zone)
        if key not in out:
            out[key] = f
    return sorted(out.values(), key=lambda f: (f.finding, f.side or "", f.zone or "", f.term))


def normalise_image_id(image_id: str) -> str:
    """``CXR1_1_IM-0001-3001`` (report XML) -> ``CXR1_IM-0001-3001`` (DICOM metadata table)."""
    m = _IMAGE_ID.match(image_id)
    return f"{m.group(1)}_{m.group(2)}" if m else image_id


def _text(el: ET.Element | None) -> str:
    return "" if el is None or el.text is None else " ".join(el.text.split())


def parse_report_xml(data: bytes) -> Report:
    """Parse one report XML document."""
    root = ET.fromstring(data)
    uid_el = root.find("uId")
    uid = uid_el.get("id", "") if uid_el is not None else ""
    sections: dict[str, str] = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").upper()
        sections[label] = _text(el)
    images = tuple(el.get("id", "") for el in root.findall("parentImage"))
    mesh = tuple((el.text or "").strip() for el in root.findall("MeSH/major")
                 if (el.text or "").strip())
    known = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
    return Report(
        uid=uid, comparison=sections.get("COMPARISON", ""),
        indication=sections.get("INDICATION", ""), findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""), image_ids=images, mesh_major=mesh,
        extra_sections={k: v for k, v in sections.items() if k not in known},
    )


def iter_reports(archive: str | Path | None = None) -> Iterator[Report]:
    """Stream the reports from the tgz (no extraction), ordered by their numeric file name."""
    path = Path(archive) if archive is not None else data_path(REPORTS_ARCHIVE)
    with tarfile.open(path, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")]
        members.sort(key=lambda m: int(re.sub(r"\D", "", Path(m.name).stem) or 0))
        for member in members:
            fh = tar.extractfile(member)
            if fh is None:
                continue
            yield parse_report_xml(fh.read())


@lru_cache(maxsize=1)
def load_reports() -> tuple[Report, ...]:
    """All reports (parsed once per process)."""
    reports = tuple(iter_reports())
    logger.info("parsed %d IU reports", len(reports))
    return reports


@lru_cache(maxsize=1)
def image_views() -> dict[str, str]:
    """Image id (normalised) -> DICOM ViewPosition from the IU metadata table ('' if blank)."""
    with gzip.open(data_path(IMAGE_METADATA), "rb") as gz:
        reader = csv.DictReader(io.TextIOWrapper(gz, encoding="utf-8"))
        return {row["imageid"]: (row.get("View Position") or "").strip().upper()
                for row in reader}


FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LARGE LATERAL")


def frontal_image(report: Report) -> tuple[str, str] | None:
    """Pick the frontal image: ``(image id, view)`` where view is 'PA'/'AP' or '' if unknown.

    Known frontal views win; an image whose view is blank or missing from the table counts as
    possibly frontal (most IU studies are a PA plus a lateral). ``None`` if every image is a
    known lateral or the report has no image.
    """
    views = image_views()
    unknown = None
    for image_id in sorted(report.image_ids):
        view = views.get(normalise_image_id(image_id), "")
        if view in FRONTAL_VIEWS:
            return image_id, view
        if view not in LATERAL_VIEWS and unknown is None:
            unknown = image_id
    return (unknown, "") if unknown is not None else None
