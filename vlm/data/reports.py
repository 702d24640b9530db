"""Report text helpers shared by training, zero-shot and search: sections and sentences."""

from __future__ import annotations

import re

# Split after . ! ? ; when followed by whitespace, but not inside decimals ("1.5 cm") or after
# common abbreviations seen in radiology reports.
_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "approx.", "dr.", "no.", "cm.", "mm.")
_SPLIT = re.compile(r"(?<=[.!?;])\s+")


def split_sentences(text: str, max_sentences: int | None = None) -> list[str]:
    """Split report text into sentences (empty pieces and bare punctuation dropped)."""
    pieces: list[str] = []
    for chunk in _SPLIT.split(" ".join(text.split())):
        chunk = chunk.strip()
        if not chunk or not any(c.isalnum() for c in chunk):
            continue
        if pieces and pieces[-1].lower().endswith(_ABBREVIATIONS):
            pieces[-1] = f"{pieces[-1]} {chunk}"
        else:
            pieces.append(chunk)
    return pieces[:max_sentences] if max_sentences else pieces


def report_text(findings: str | None, impression: str | None) -> str:
    """The text a model reads for a study: FINDINGS then IMPRESSION."""
    parts = [p.strip() for p in (findings, impression) if p and p.strip()]
    return " ".join(parts)
