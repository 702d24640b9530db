"""PhantomCXR: frontal chest radiographs with synthetic pixels for real IU reports.

The report text and MeSH labels are real (Indiana University chest X-ray collection, read at
run time from torchxrayvision); the pixels are rendered so that every labelled finding has an
exact mask and box. See ``data_cards/phantom_cxr.md``.
"""

from __future__ import annotations

from vlm.data.phantom_cxr.contact_sheet import make_contact_sheet
from vlm.data.phantom_cxr.generate import generate_phantom_cxr
from vlm.data.phantom_cxr.study import CONTRAST_RANGE, StudyRender, render_study

__all__ = ["CONTRAST_RANGE", "StudyRender", "generate_phantom_cxr", "make_contact_sheet",
           "render_study"]
