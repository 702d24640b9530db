"""Tissue labels of the internal organ map and their Hounsfield units."""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Labels of the internal organ map (uint8)."""

    AIR = 0
    MUSCLE = 1  # skin, body-wall, paraspinal and psoas muscle, diaphragm
    SUBCUT_FAT = 2
    MEDIASTINAL_FAT = 3
    ABDOMINAL_FAT = 4  # visceral / retroperitoneal / pelvic fat
    LUNG = 5  # parenchyma; pulmonary vessels are drawn into it as partial volume
    VESSEL = 6  # aorta, pulmonary trunk and arteries, SVC, iliac arteries (unenhanced blood)
    AIRWAY = 7  # trachea and main bronchi lumen
    HEART = 8
    LIVER = 9
    SPLEEN = 10
    KIDNEY = 11
    BOWEL = 12  # bowel wall and contents
    GAS = 13  # bowel and stomach gas
    STOMACH = 14  # gastric fluid
    CORTICAL_BONE = 15
    CANCELLOUS_BONE = 16
    DISC = 17  # intervertebral disc
    CSF = 18  # spinal canal
    CARTILAGE = 19  # costal cartilage
    TABLE = 20  # CT couch top (outside the body)


#: (mean HU, between-subject standard deviation) per tissue.
HU_TABLE: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, 0.0),
    Tissue.MUSCLE: (50.0, 4.0),
    Tissue.SUBCUT_FAT: (-105.0, 6.0),
    Tissue.MEDIASTINAL_FAT: (-95.0, 6.0),
    Tissue.ABDOMINAL_FAT: (-98.0, 6.0),
    Tissue.LUNG: (-855.0, 12.0),
    Tissue.VESSEL: (42.0, 3.0),
    Tissue.AIRWAY: (-1000.0, 0.0),
    Tissue.HEART: (40.0, 3.0),
    Tissue.LIVER: (60.0, 5.0),
    Tissue.SPLEEN: (47.0, 3.0),
    Tissue.KIDNEY: (32.0, 3.0),
    Tissue.BOWEL: (32.0, 5.0),
    Tissue.GAS: (-1000.0, 0.0),
    Tissue.STOMACH: (15.0, 4.0),
    Tissue.CORTICAL_BONE: (1250.0, 100.0),
    Tissue.CANCELLOUS_BONE: (340.0, 20.0),
    Tissue.DISC: (85.0, 6.0),
    Tissue.CSF: (12.0, 3.0),
    Tissue.CARTILAGE: (150.0, 15.0),
    Tissue.TABLE: (180.0, 20.0),
}

#: Expected HU range of the median of each tissue in the final (blurred, noisy) volume,
#: measured away from borders. Used by the tests and documented in the data card.
HU_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1024.0, -950.0),
    Tissue.MUSCLE: (20.0, 80.0),
    Tissue.SUBCUT_FAT: (-130.0, -70.0),
    Tissue.MEDIASTINAL_FAT: (-130.0, -60.0),
    Tissue.ABDOMINAL_FAT: (-130.0, -60.0),
    Tissue.LUNG: (-950.0, -700.0),
    Tissue.VESSEL: (20.0, 80.0),
    Tissue.HEART: (20.0, 80.0),
    Tissue.LIVER: (20.0, 80.0),
    Tissue.SPLEEN: (20.0, 80.0),
    Tissue.KIDNEY: (20.0, 80.0),
    Tissue.CANCELLOUS_BONE: (300.0, 450.0),
}

#: The eight DeepLesion coarse lesion types used by CLEAR's location tasks (fixed order).
LOCATION_CLASSES: tuple[str, ...] = (
    "bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft_tissue", "pelvis",
)


def body_mask(labels: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: voxels inside the patient (not air, not the couch)."""
    return (labels != Tissue.AIR) & (labels != Tissue.TABLE)


def sample_hu(rng: np.random.Generator) -> np.ndarray:
    """Per-subject HU lookup table: index with a label map to get HU (float32, 256 entries)."""
    lut = np.full(256, -1000.0, dtype=np.float32)
    for tissue, (mean, sd) in HU_TABLE.items():
        lut[int(tissue)] = mean + (rng.normal(0.0, sd) if sd > 0 else 0.0)
    return lut
