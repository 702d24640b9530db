"""Keyed pseudonyms for patient, study, series, instance and accession identifiers.

A pseudonym is ``<kind>-`` + the first 20 hex digits of HMAC-SHA256(site secret, kind, value):
stable for one site, unlinkable across sites, and not reversible without the secret. The secret
comes from (in order) an explicit argument, the ``RADLENS_SITE_SECRET`` environment variable, or
a random secret created once in ``$RADLENS_HOME/site_secret`` (mode 0600). It is never logged
or written anywhere else; ``repr`` hides it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from vlm.errors import ConfigError

logger = logging.getLogger(__name__)

SECRET_ENV = "RADLENS_SITE_SECRET"
HOME_ENV = "RADLENS_HOME"

#: DICOM keywords whose values identify a person or a visit. They never leave the reader
#: except as pseudonyms (or verbatim in ``ImageMeta.identifiers`` when explicitly asked for).
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber",
    "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician",
    "StationName", "DeviceSerialNumber", "StudyDate", "StudyTime", "AcquisitionDateTime",
    "MedicalRecordLocator", "IssuerOfPatientID",
)

# (ImageMeta field, DICOM keyword) pairs that become pseudonyms.
PSEUDONYM_FIELDS = (
    ("patient_pseudonym", "PatientID", "pt"),
    ("study_pseudonym", "StudyInstanceUID", "st"),
    ("series_pseudonym", "SeriesInstanceUID", "se"),
    ("instance_pseudonym", "SOPInstanceUID", "im"),
    ("accession_pseudonym", "AccessionNumber", "acc"),
)


def radlens_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".radlens")


class Pseudonymizer:
    """Turns identifiers into keyed pseudonyms with a site secret."""

    def __init__(self, secret: bytes | str) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(key) < 16:
            raise ConfigError("the site secret must be at least 16 bytes long")
        self._key = key

    def __repr__(self) -> str:
        return "Pseudonymizer(secret=<hidden>)"

    @property
    def key_id(self) -> str:
        """A fingerprint of the secret (``key-`` + 16 hex digits of an HMAC of a fixed text): two
        pseudonymizers give the same pseudonyms exactly when their key ids agree. Indexes record
        it, so that shards or additions made under another secret are refused; it reveals
        nothing about the secret or the identifiers."""
        mac = hmac.new(self._key, b"radlens pseudonym key id", hashlib.sha256)
        return f"key-{mac.hexdigest()[:16]}"

    def __call__(self, kind: str, value: object) -> str | None:
        text = "" if value is None else str(value).strip()
        if not text:
            return None
        mac = hmac.new(self._key, f"{kind}\x00{text}".encode(), hashlib.sha256)
        return f"{kind}-{mac.hexdigest()[:20]}"

    @classmethod
    def from_environment(cls, secret: bytes | str | None = None) -> Pseudonymizer:
        """Secret from the argument, ``RADLENS_SITE_SECRET``, or ``$RADLENS_HOME/site_secret``."""
        if secret is not None:
            return cls(secret)
        env = os.environ.get(SECRET_ENV)
        if env:
            return cls(env)
        path = radlens_home() / "site_secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            logger.info("created a new site secret for pseudonyms under RADLENS_HOME")
        return cls(path.read_text().strip())


_DEFAULT: dict[tuple[str | None, str], Pseudonymizer] = {}


def default_pseudonymizer() -> Pseudonymizer:
    """The process-wide pseudonymizer for the current environment (cached per env values)."""
    key = (os.environ.get(SECRET_ENV), str(radlens_home()))
    if key not in _DEFAULT:
        _DEFAULT[key] = Pseudonymizer.from_environment()
    return _DEFAULT[key]
