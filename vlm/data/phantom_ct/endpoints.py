"""Volume-level endpoints: multi-label lesion locations and a simulated time to event.

Survival model (documented in data_cards/phantom_ct.md):
    hazard h(t) = lambda * k * t**(k - 1)  (Weibull, shape k = 1.3, t in months)
    log lambda = log(0.002) + 0.45 * (emphysema_score / 10) + 0.35 * n_lesions
    event time T = (-log U / lambda) ** (1 / k),  U ~ Uniform(0, 1)
    censoring C ~ Uniform(6, 120) months, independent of everything else
    time = min(T, C), event = 1 if T <= C else 0
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vlm.data.phantom_ct.tissues import LOCATION_CLASSES

WEIBULL_SHAPE = 1.3
BASE_RATE = 0.002
BETA_EMPHYSEMA_PER_10 = 0.45
BETA_LESION = 0.35
CENSOR_RANGE_MONTHS = (6.0, 120.0)


def location_labels(locations: Iterable[str]) -> dict[str, int]:
    """Multi-label 0/1 dict over the eight location classes (fixed key set)."""
    present = set(locations)
    return {c: int(c in present) for c in LOCATION_CLASSES}


def simulate_survival(emphysema_score: float, n_lesions: int, rng: np.random.Generator
                      ) -> tuple[float, int]:
    """(time in months, event 0/1) from the Weibull proportional-hazards model above."""
    lam = BASE_RATE * np.exp(BETA_EMPHYSEMA_PER_10 * emphysema_score / 10.0
                             + BETA_LESION * n_lesions)
    u = rng.uniform(1e-12, 1.0)
    t_event = float((-np.log(u) / lam) ** (1.0 / WEIBULL_SHAPE))
    t_censor = float(rng.uniform(*CENSOR_RANGE_MONTHS))
    return round(min(t_event, t_censor), 2), int(t_event <= t_censor)
