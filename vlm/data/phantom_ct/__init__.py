"""PhantomCT: synthetic chest-abdomen CT volumes with lesions, emphysema and endpoints.

Entry points: :func:`generate_phantom_ct` and :func:`make_contact_sheet`.
"""

from __future__ import annotations

from vlm.data.phantom_ct.contact_sheet import make_contact_sheet
from vlm.data.phantom_ct.coords import body_frame, from_body_frame, patch_centres, to_body_frame
from vlm.data.phantom_ct.emphysema import EMPHYSEMA_CLASSES, emphysema_class, emphysema_score
from vlm.data.phantom_ct.generate import generate_phantom_ct
from vlm.data.phantom_ct.tissues import LOCATION_CLASSES

__all__ = [
    "EMPHYSEMA_CLASSES", "LOCATION_CLASSES", "body_frame", "emphysema_class", "emphysema_score",
    "from_body_frame", "generate_phantom_ct", "make_contact_sheet", "patch_centres",
    "to_body_frame",
]
