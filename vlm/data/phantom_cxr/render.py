"""Turn anatomy + finding layers into stored detector values, with exact per-finding truth.

Pipeline (patient frame -> image): every layer (the normal anatomy and each finding) is blurred
on its own, then warped with the same small rotation/scale/shift. Finding layers are cut to zero
below ``LAYER_FLOOR`` of their peak, so a layer's support *is* its mask. The sum is then passed
through pointwise operations only (exponential detector response, exposure, gamma, a fixed
heel-effect gain, noise from a fixed per-study field, quantisation), whose constants depend only
on the normal anatomy. Hence the image with a finding differs from the image without it exactly
inside that finding's mask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

SHOULDER, WHITE = 0.8, 0.97  # display shoulder start and asymptote (see Transfer.display)
LAYER_FLOOR = 0.04  # fraction of a layer's peak |value| below which it is set to zero
INTERNAL_MAX = 320  # anatomy and finding layers are drawn at most this size, then resampled
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
BITS_STORED = (12, 14, 16)
NATIVE_SPACING_MM = (0.139, 0.143, 0.148, 0.15, 0.16, 0.168, 0.175, 0.2)
NATIVE_FOV_MM = (350.0, 430.0)  # detector width range (35 x 43 cm cassettes)


def item_rng(seed: int, key: str) -> np.random.Generator:
    """Per-item generator from (seed, key), independent of worker count and order."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "big") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


@dataclass
class Acquisition:
    """Header-level and detector parameters of one synthetic exposure."""

    modality: str
    view: str
    photometric: str
    bits_stored: int
    pixel_spacing: float
    native_spacing: float
    k: float  # detector response steepness
    gamma: float
    noise: float  # noise sd as a fraction of the full display range
    heel: float  # left-right gain gradient
    angle: float  # degrees
    scale: float
    shift: tuple[float, float]  # fraction of size (x, y)
    noise_seed: int
    extra: dict[str, float] = field(default_factory=dict)


def sample_params(rng: np.random.Generator) -> dict[str, float]:
    """Anatomy parameters of one patient (see ``anatomy.build_anatomy``)."""
    return {
        "mid_x": float(rng.uniform(0.48, 0.52)),
        "lung_w": float(rng.uniform(0.64, 0.74)),
        "lung_aspect": float(rng.uniform(0.9, 1.1)),
        "lung_top": float(rng.uniform(0.1, 0.15)),
        "body_w": float(rng.uniform(0.84, 0.92)),
        "air_depth": float(rng.uniform(0.72, 0.82)),
        "ctr": float(rng.uniform(0.40, 0.47)),
        "spine_w": float(rng.uniform(0.075, 0.09)),
        "rib_spacing": float(rng.uniform(0.95, 1.08)),
        "bone": float(rng.uniform(0.45, 0.6)),
        "texture_seed": float(rng.integers(0, 2**31 - 1)),
    }


def sample_acquisition(rng: np.random.Generator, size: int, view: str) -> Acquisition:
    """Exposure, geometry and header parameters (view '' = unknown -> drawn)."""
    native = float(rng.choice(NATIVE_SPACING_MM))
    fov = float(rng.uniform(*NATIVE_FOV_MM))
    if view not in ("PA", "AP"):
        view = "PA" if rng.random() < 0.8 else "AP"
    return Acquisition(
        modality="DX" if rng.random() < 0.5 else "CR",
        view=view,
        photometric=PHOTOMETRICS[int(rng.random() < 0.35)],
        bits_stored=int(rng.choice(BITS_STORED)),
        pixel_spacing=round(fov / size, 4),
        native_spacing=native,
        k=float(rng.uniform(1.4, 1.9)),
        gamma=float(rng.uniform(0.85, 1.15)),
        noise=float(rng.uniform(0.006, 0.014)),
        heel=float(rng.uniform(-0.04, 0.04)),
        angle=float(rng.uniform(-3.5, 3.5)),
        scale=float(rng.uniform(0.94, 1.04)),
        shift=(float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.02, 0.03))),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def warp(layer: np.ndarray, acq: Acquisition, out_size: int | None = None) -> np.ndarray:
    """Rotate/scale/shift a patient-frame layer into the ``out_size`` image (zeros stay zeros).

    The patient frame may be smaller than the image (see ``INTERNAL_MAX``); the zoom is part of
    the same bilinear resampling.
    """
    size = layer.shape[0]
    out_size = out_size or size
    zoom = out_size / size
    c_in, c_out = size / 2.0, out_size / 2.0
    a = np.deg2rad(acq.angle)
    # output (x, y) -> input: centre, undo shift, rotate and scale back.
    cos, sin = np.cos(a) / (acq.scale * zoom), np.sin(a) / (acq.scale * zoom)
    tx, ty = c_out + acq.shift[0] * out_size, c_out + acq.shift[1] * out_size
    coeffs = (cos, -sin, c_in - cos * tx + sin * ty, sin, cos, c_in - sin * tx - cos * ty)
    img = Image.fromarray(np.ascontiguousarray(layer, dtype=np.float32), mode="F")
    out = img.transform((out_size, out_size), Image.Transform.AFFINE, data=coeffs,
                        resample=Image.Resampling.BILINEAR, fillcolor=0.0)
    return np.asarray(out, dtype=np.float32).copy()


def cut_floor(layer: np.ndarray) -> np.ndarray:
    """Zero a layer below LAYER_FLOOR of its peak so its support is its (visible) extent."""
    peak = float(np.abs(layer).max()) if layer.size else 0.0
    if peak == 0.0:
        return layer
    out = layer.copy()
    out[np.abs(out) < LAYER_FLOOR * peak] = 0.0
    return out


@dataclass
class Transfer:
    """Pointwise attenuation -> display value in [0, 1] (MONOCHROME2 sense) with fixed noise."""

    k: float
    lo: float
    hi: float
    gamma: float
    gain: np.ndarray
    noise: np.ndarray

    @classmethod
    def from_base(cls, base: np.ndarray, acq: Acquisition) -> Transfer:
        """Fix the constants from the normal anatomy only (never from a finding)."""
        size = base.shape[0]
        d = 1.0 - np.exp(-acq.k * base[::2, ::2])
        lo = float(np.percentile(d, 1.0))
        hi = float(np.percentile(d, 99.9)) * 1.01 + 1e-3
        xs = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        gain = (1.0 + acq.heel * xs)[None, :].repeat(size, 0)
        noise = np.random.default_rng(acq.noise_seed).standard_normal((size, size))
        noise = ndi.gaussian_filter(noise.astype(np.float32), 0.6) * 1.8 * acq.noise
        return cls(acq.k, lo, hi, acq.gamma, gain.astype(np.float32), noise.astype(np.float32))

    def display(self, atten: np.ndarray) -> np.ndarray:
        """Noise-free display value in [0, 1] (pointwise)."""
        d = 1.0 - np.exp(-self.k * np.maximum(atten, 0.0))
        v = np.maximum((d - self.lo) / (self.hi - self.lo), 0.0)
        # Soft shoulder (like a film/processing curve): dense stacks approach but never reach
        # white, so findings on bone or mediastinum stay visible instead of clipping.
        over = np.maximum(v - SHOULDER, 0.0)
        v = np.where(v > SHOULDER,
                     SHOULDER + (WHITE - SHOULDER) * (1.0 - np.exp(-over / (WHITE - SHOULDER))), v)
        v = v ** self.gamma
        return np.clip(v * self.gain, 0.0, 1.0).astype(np.float32)

    def stored(self, atten: np.ndarray, bits: int, photometric: str) -> np.ndarray:
        """Stored uint16 values (MONOCHROME1 stores the inverted scale)."""
        return self.stored_from_display(self.display(atten), bits, photometric)

    def stored_from_display(self, shown: np.ndarray, bits: int, photometric: str) -> np.ndarray:
        """Add the fixed noise to a noise-free display image and quantise it."""
        top = float(2**bits - 1)
        v = np.clip(shown + self.noise, 0.0, 1.0)
        q = np.rint(v * top).astype(np.uint16)
        if photometric == "MONOCHROME1":
            q = (np.uint16(top) - q).astype(np.uint16)
        return q
