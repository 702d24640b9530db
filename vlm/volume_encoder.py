"""Volume encoder: one unit vector per CT volume (the index's ``volume`` collection) and one
saliency score per axial slice (the app's attention-slice strip).

Where the model comes from (:meth:`VolumeEncoder.load`):

* a LeCL checkpoint folder written by ``radlens train lecl`` (a run folder: ``best/`` first):
  the CLEAR slice encoder embeds every axial slice; **volume vector = mean over the slices of
  the air-referenced slice embeddings ``e_k - e_air``, L2-normalised**, where ``e_air`` is the
  embedding of an all-air slice (-1024 HU) of the same size. The reference removes the tower's
  input-independent offset: without it the mean embeddings of all volumes point the same way
  (pairwise cosine > 0.997 on PhantomCT for random and briefly trained towers, so rankings
  drown in float16 rounding); with it the cosines spread over about 0.73-0.99. Subtracting a
  constant does not change which slices differ from which. When the folder also holds a CLEAR
  ABMIL checkpoint
  (``clear_mil.pt``, see :func:`save_clear_mil`; or pass ``attention=``), its attention over the
  slices gives the slice scores. The vector stays the mean either way, so vectors do not depend
  on a downstream task head and one index can mix volumes scored with and without ABMIL.
* a DrasCLR checkpoint folder written by ``radlens train drasclr``: volume vector = mean of the
  lattice patch features (``DrasCLR.volume_embedding``), L2-normalised, with the anatomical
  frame taken from the body's bounding box (:func:`vlm.train.drasclr.real_ct_frame`) for every
  volume, so PhantomCT and real CT are encoded the same way.
* a lesion-seg checkpoint folder written by ``radlens train lesion-seg`` (**supervised** on
  PhantomCT lesion masks, :mod:`vlm.models.lesionseg`): the volume is resampled to the model's
  grid, segmented, and its **volume vector is the per-location lesion profile** (top-k mean
  lesion probability of each location plus a "no lesion" component ``1 - max``, L2-normalised,
  :func:`vlm.models.lesionseg.profile_vector`); slice scores are the largest lesion probability
  on each slice and :attr:`VolumeEncoding.findings` holds the per-location scores. This is a
  finding-level similarity (same kind of lesion, same organ), not a task-agnostic one.
* ``random:<lecl|drasclr>-<tiny|small>[@seed]``: a seeded randomly initialised tower, the
  "random tower" baseline and the model of fast tests.

Slice scores without ABMIL (``score_kind == "distinct"``): ``1 - cos(e_k - e_air, v)`` for the
volume vector ``v``, i.e. the slices least like the volume's average slice.
This is not learned attention and not a lesion detector: it points at atypical slices (often the
ends of the scan, or slices with unusual content). For DrasCLR, a slice's score is the largest
``1 - cos(f_p, mean_p f_p)`` over the lattice patches whose extent covers it (0 where none does).

Identity: :attr:`VolumeEncoder.name` (``lecl``, ``drasclr``, ``lecl-tiny-random@0``, ...) and
:attr:`VolumeEncoder.config_hash`, a sha256 fingerprint of the tower's config *and weights*
(two trainings of the same config make different vectors, so they must not share a collection).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm.errors import ConfigError, RadLensError
from vlm.io.types import Volume
from vlm.models.checkpoint import (
    check_export_target,
    load_torch_state,
    read_json_object,
    replace_folder,
    update_with_weights,
)
from vlm.models.clear import ClearConfig, ClearMIL, LeCL
from vlm.models.drasclr import DrasCLR
from vlm.models.lesionseg import LesionSeg3D

logger = logging.getLogger(__name__)

CLEAR_MIL_CHECKPOINT = "clear_mil.pt"
RANDOM_PREFIX = "random:"
SCORE_ATTENTION, SCORE_DISTINCT, SCORE_LESION = "attention", "distinct", "lesion"
AIR_HU = -1024.0
EMPTY_TOLERANCE = 1e-4  # |mean(e_k - e_air)| below this fraction of |e_air|: an empty volume
#: Versions of the vector definitions; part of the fingerprint, so a change refuses old indexes.
VECTOR_DEFINITION = {"lecl": "mean(e_k - e_air)/v1", "drasclr": "mean(patch features)/v1",
                     "lesionseg": "profile(top-k mean per location, 1 - max)/v1"}
#: What each slice-score kind means, for captions and model cards.
SCORE_MEANING = {
    SCORE_ATTENTION: "CLEAR ABMIL attention over the slices",
    SCORE_DISTINCT: "1 - cosine to the volume vector (the least typical slices; not learned "
                    "attention)",
    SCORE_LESION: "largest lesion probability on the slice (supervised lesion segmenter)",
}


@dataclass
class VolumeEncoding:
    """What the encoder gives for one volume."""

    vector: np.ndarray  # (D,) float32, unit length
    slice_scores: np.ndarray  # (Z,) float32, higher = more salient
    score_kind: str  # SCORE_ATTENTION | SCORE_DISTINCT | SCORE_LESION
    #: per-location lesion scores in [0, 1] (lesion-seg models only)
    findings: dict[str, float] | None = None

    def top_slices(self, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` highest-scoring slices as ``(slice index, score)``, best first."""
        order = np.argsort(-self.slice_scores, kind="stable")[: max(int(k), 0)]
        return [(int(i), float(self.slice_scores[i])) for i in order]


# --------------------------------------------------------------------------- ABMIL checkpoints

def save_clear_mil(model: ClearMIL, folder: str | os.PathLike[str]) -> Path:
    """Write a CLEAR ABMIL (config + weights) as ``folder/clear_mil.pt`` (atomically).

    Put it in a LeCL checkpoint folder to give :class:`VolumeEncoder` attention slice scores.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CLEAR_MIL_CHECKPOINT}.tmp"
    torch.save({"kind": "clear_mil", "config": dataclasses.asdict(model.cfg),
                "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, folder / CLEAR_MIL_CHECKPOINT)
    return folder / CLEAR_MIL_CHECKPOINT


def load_clear_mil(path: str | os.PathLike[str]) -> ClearMIL:
    """A CLEAR ABMIL from ``clear_mil.pt`` or a folder holding it, in eval mode."""
    p = Path(path)
    if p.is_dir():
        p = p / CLEAR_MIL_CHECKPOINT
    if not p.is_file():
        raise ConfigError(f"{p}: no CLEAR ABMIL checkpoint; write one with save_clear_mil")
    state = load_torch_state(p, "CLEAR ABMIL checkpoint", "write it again with radlens "
                                                           "train clear")
    if state.get("kind") != "clear_mil":
        raise ConfigError(f"{p} is not a CLEAR ABMIL checkpoint")
    model = ClearMIL(ClearConfig(**state["config"]))
    model.load_state_dict(state["state_dict"])
    return model.eval()


# --------------------------------------------------------------------------- fingerprints

def _fingerprint(config: dict[str, Any], modules: dict[str, torch.nn.Module]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode())
    for prefix, module in sorted(modules.items()):
        update_with_weights(h, module, prefix=f"{prefix}.")
    return h.hexdigest()[:16]


def _find(folder: Path, filename: str) -> Path | None:
    for cand in (folder / filename, folder / "best" / filename, folder / "last" / filename):
        if cand.is_file():
            return cand
    return None


# --------------------------------------------------------------------------- the encoder

class VolumeEncoder:
    """A volume model ready for inference (eval mode asserted). Use :meth:`load`.

    Args:
        model: a :class:`LeCL`, :class:`DrasCLR` or :class:`LesionSeg3D` (put into eval mode
            here).
        name: model name recorded in the index.
        source: what :meth:`load` reloads it from (checkpoint path or ``random:`` name).
        attention: optional CLEAR ABMIL over the LeCL slice embeddings.
        lattice: DrasCLR lattice steps (z, y, x).
        device: torch device for the model.
        batch_size: slices (LeCL) or patches (DrasCLR) per forward pass.
    """

    def __init__(self, model: LeCL | DrasCLR | LesionSeg3D, name: str, source: str, *,
                 attention: ClearMIL | None = None,
                 lattice: tuple[int, int, int] = (4, 4, 4), device: str = "cpu",
                 batch_size: int = 64) -> None:
        if attention is not None and not isinstance(model, LeCL):
            raise ConfigError("CLEAR ABMIL attention needs a LeCL slice encoder, not "
                              f"{type(model).__name__}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.attention = attention.to(self.device).eval() if attention is not None else None
        assert not self.model.training, "inference needs eval mode"
        self.name, self.source = name, source
        self.lattice = lattice
        self.batch_size = int(batch_size)
        self._air: dict[tuple[int, int], torch.Tensor] = {}
        if isinstance(model, LeCL):
            self.kind = "lecl"
            self.dim = int(model.cfg.embed_dim)
            self.config_hash = _fingerprint(
                {**dataclasses.asdict(model.cfg), "vector": VECTOR_DEFINITION["lecl"]},
                {"encoder": model.encoder})
            if attention is not None and attention.cfg.in_dim != self.dim:
                raise ConfigError(f"the CLEAR ABMIL expects {attention.cfg.in_dim}-d slice "
                                  f"embeddings, the LeCL encoder gives {self.dim}-d: train the "
                                  "ABMIL on this encoder's embeddings")
        elif isinstance(model, LesionSeg3D):
            self.kind = "lesionseg"
            self.dim = int(model.cfg.n_classes) + 1
            self.config_hash = _fingerprint(
                {**model.cfg.to_dict(), "vector": VECTOR_DEFINITION["lesionseg"]},
                {"segmenter": model})
        else:
            self.kind = "drasclr"
            self.dim = int(model.cfg.repr_dim)
            self.config_hash = _fingerprint(
                {**dataclasses.asdict(model.cfg), "lattice": list(lattice),
                 "vector": VECTOR_DEFINITION["drasclr"]},
                {"encoder": model.encoder})
        self.score_kind = (SCORE_LESION if self.kind == "lesionseg" else
                           SCORE_ATTENTION if self.attention is not None else SCORE_DISTINCT)

    def __repr__(self) -> str:
        return (f"VolumeEncoder({self.name!r}, dim={self.dim}, config_hash={self.config_hash!r}, "
                f"scores={self.score_kind!r})")

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, source: str | os.PathLike[str], *,
             attention: str | os.PathLike[str] | None = None, device: str = "cpu"
             ) -> VolumeEncoder:
        """A LeCL, DrasCLR or lesion-seg checkpoint folder, or
        ``random:<kind>-<preset>[@seed]``.

        Raises:
            ConfigError: no checkpoint there, an unknown random name, or a mismatched ABMIL.
        """
        text = str(source)
        if text.startswith(RANDOM_PREFIX):
            if attention is not None:
                raise ConfigError("a random tower has no trained attention: drop attention=")
            return cls.random(text, device=device)
        from vlm.train.drasclr import CHECKPOINT as DRAS_FILE
        from vlm.train.drasclr import load_drasclr
        from vlm.train.lecl import CHECKPOINT as LECL_FILE
        from vlm.train.lecl import load_lecl

        folder = Path(source)
        lecl_file = _find(folder, LECL_FILE)
        if lecl_file is not None:
            # the ABMIL that goes with this encoder sits beside it (a run's best/ and last/
            # are different encoders), or in the run folder itself
            beside = [p / CLEAR_MIL_CHECKPOINT for p in (lecl_file.parent, folder)]
            found = next((p for p in beside if p.is_file()), None)
            mil_path = Path(attention) if attention is not None else found
            mil = load_clear_mil(mil_path) if mil_path is not None else None
            return cls(load_lecl(lecl_file.parent), "lecl", str(folder.resolve()),
                       attention=mil, device=device)
        from vlm.train.lesionseg import CHECKPOINT as LESION_FILE
        from vlm.train.lesionseg import load_lesionseg

        if _find(folder, LESION_FILE) is not None:
            if attention is not None:
                raise ConfigError("CLEAR ABMIL attention needs a LeCL slice encoder, not a "
                                  "lesion segmenter")
            return cls(load_lesionseg(folder), "lesionseg", str(folder.resolve()), device=device)
        if _find(folder, DRAS_FILE) is not None:
            if attention is not None:
                raise ConfigError("CLEAR ABMIL attention needs a LeCL slice encoder, not DrasCLR")
            model, lattice = load_drasclr(folder)
            return cls(model, "drasclr", str(folder.resolve()), lattice=lattice, device=device)
        raise ConfigError(f"{folder}: no {LECL_FILE}, {DRAS_FILE} or {LESION_FILE}; train one "
                          "with 'radlens train lecl|drasclr|lesion-seg' or use random:lecl-tiny")

    @classmethod
    def random(cls, name: str = "random:lecl-tiny", *, device: str = "cpu") -> VolumeEncoder:
        """A seeded randomly initialised tower: ``random:lecl-small@3``, ``random:drasclr-tiny``."""
        spec = name.removeprefix(RANDOM_PREFIX)
        base, _, seed_text = spec.partition("@")
        kind, _, preset = base.partition("-")
        try:
            seed = int(seed_text) if seed_text else 0
        except ValueError:
            raise ConfigError(f"random tower '{name}': the seed after '@' must be an integer"
                              ) from None
        from vlm.train.drasclr import DEFAULT_LATTICE, drasclr_config
        from vlm.train.drasclr import PRESETS as DRAS_PRESETS
        from vlm.train.lecl import PRESETS as LECL_PRESETS
        from vlm.train.lecl import lecl_config

        presets = {"lecl": LECL_PRESETS, "drasclr": DRAS_PRESETS}.get(kind, {})
        if preset not in presets:
            raise ConfigError(f"unknown random tower '{name}': use random:lecl-tiny, "
                              "random:lecl-small, random:drasclr-tiny or random:drasclr-small "
                              "(optionally @SEED)")
        canonical = f"{RANDOM_PREFIX}{kind}-{preset}@{seed}"
        label = f"{kind}-{preset}-random@{seed}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind == "lecl":
                return cls(LeCL(lecl_config(preset)), label, canonical, device=device)
            gen = torch.Generator().manual_seed(seed)
            model = DrasCLR(drasclr_config(preset, lattice=DEFAULT_LATTICE), gen)
            return cls(model, label, canonical, lattice=DEFAULT_LATTICE, device=device)

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def encode(self, volume: Volume | np.ndarray) -> VolumeEncoding:
        """One volume, (Z, Y, X) in HU on the canonical grid -> vector and slice scores.

        A lesion-seg model resamples a :class:`Volume` to its training grid first (a bare
        array is taken to be on that grid already)."""
        hu = np.asarray(volume.array if isinstance(volume, Volume) else volume, np.float32)
        if hu.ndim != 3 or min(hu.shape) < 1:
            raise ConfigError(f"a volume must be a (Z, Y, X) array, got shape {hu.shape}")
        assert not self.model.training, "inference needs eval mode"
        if isinstance(self.model, LesionSeg3D):
            spacing = volume.spacing if isinstance(volume, Volume) else None
            return self._encode_lesionseg(self.model, hu, spacing)
        if isinstance(self.model, LeCL):
            return self._encode_lecl(self.model, torch.from_numpy(hu))
        return self._encode_drasclr(self.model, hu)

    def _encode_lecl(self, model: LeCL, hu: torch.Tensor) -> VolumeEncoding:
        from vlm.train.lecl import embed_volume

        emb = embed_volume(model, hu.to(self.device), self.batch_size).float()  # (Z, E)
        air = self._air_embedding(model, tuple(hu.shape[1:]))  # (E,)
        centred = emb - air[None]  # (Z, E)
        mean = centred.mean(0)  # (E,)
        if float(mean.norm()) <= EMPTY_TOLERANCE * float(air.norm()):
            raise RadLensError("the volume looks like empty air to the slice encoder: nothing "
                               "to index")
        if self.attention is not None:
            scores = self.attention(emb[None]).attention[0]  # (Z,), sums to 1
        else:
            scores = 1.0 - F.cosine_similarity(centred, mean[None], dim=1)  # (Z,)
        return VolumeEncoding(_unit(mean), scores.cpu().numpy().astype(np.float32),
                              self.score_kind)

    def _air_embedding(self, model: LeCL, size: tuple[int, ...]) -> torch.Tensor:
        """(E,) embedding of an all-air slice of ``size`` (cached per size)."""
        key = (int(size[0]), int(size[1]))
        if key not in self._air:
            from vlm.train.lecl import embed_volume

            air = torch.full((1, *key), AIR_HU, device=self.device)
            self._air[key] = embed_volume(model, air)[0].float()
        return self._air[key]

    def _encode_drasclr(self, model: DrasCLR, hu: np.ndarray) -> VolumeEncoding:
        from vlm.data.drasclr_patches import extract_patches, preprocess_hu
        from vlm.train.drasclr import real_ct_frame, volume_grid

        mc = model.cfg
        try:
            frame = real_ct_frame(hu)
        except ValueError:
            raise ConfigError("no voxel above -500 HU: DrasCLR needs a CT volume in HU") from None
        x = preprocess_hu(torch.from_numpy(hu), mc.hu_min, mc.hu_max)  # (Z, Y, X) in [-1, 1]
        grid = volume_grid(tuple(x.shape), frame, self.lattice, mc.n_neighbours)
        if len(grid) == 0:
            raise ConfigError("no DrasCLR lattice patch falls inside this volume")
        patches = extract_patches(x, grid.centres, mc.patch_size).to(self.device)
        feats = model.patch_features(patches, torch.from_numpy(grid.coords).to(self.device),
                                     self.batch_size).float()  # (N, R)
        mean = feats.mean(0)  # (R,) = DrasCLR.volume_embedding
        distinct = (1.0 - F.cosine_similarity(feats, mean[None], dim=1)).cpu().numpy()
        scores = np.zeros(hu.shape[0], np.float32)
        half = mc.patch_size / 2.0
        for k_centre, d in zip(grid.centres[:, 0], distinct, strict=True):
            lo, hi = max(0, round(k_centre - half)), min(hu.shape[0], round(k_centre + half))
            scores[lo:hi] = np.maximum(scores[lo:hi], d)
        return VolumeEncoding(_unit(mean), scores, SCORE_DISTINCT)

    def _encode_lesionseg(self, model: LesionSeg3D, hu: np.ndarray,
                          spacing: tuple[float, float, float] | None) -> VolumeEncoding:
        from vlm.models.lesionseg import predict, profile_vector, slice_scores, volume_scores

        grid = hu if spacing is None else resample_to_spacing(hu, spacing,
                                                               model.cfg.spacing_mm)
        prob = predict(model, grid, device=self.device)
        scores = volume_scores(prob, model.cfg.top_k)
        on_grid = slice_scores(prob, grid.shape[0])
        # back to the input's slices: nearest model-grid slice of each input slice
        pick = np.minimum((np.arange(hu.shape[0]) * grid.shape[0]) // hu.shape[0],
                          grid.shape[0] - 1)
        findings = {c: round(float(v), 4) for c, v in zip(model.cfg.classes, scores,
                                                           strict=True)}
        return VolumeEncoding(profile_vector(scores), on_grid[pick], SCORE_LESION, findings)


#: voxels of a volume resampled to a lesion-seg model's grid at most: 512^3, 1.5 m of body on
#: each axis at the default 2.7-3.75 mm grid, 0.5 GiB as float32
MAX_RESAMPLED_VOXELS = 512 ** 3
#: a volume wider than this along any axis is not a scan (a whole body is about 2 m): its voxel
#: size is wrong, and resampling it to the model grid would not end
MAX_EXTENT_MM = 4000.0


def resample_to_spacing(hu: np.ndarray, spacing: tuple[float, float, float],
                        target: tuple[float, float, float], tolerance: float = 0.05
                        ) -> np.ndarray:
    """(Z, Y, X) HU resampled (trilinear) from ``spacing`` to ``target`` mm; unchanged when every
    axis is within ``tolerance`` (relative) already.

    Raises:
        RadLensError: a spacing that is not a positive finite number, a volume wider than
            :data:`MAX_EXTENT_MM` along an axis or a resampled grid of more than
            :data:`MAX_RESAMPLED_VOXELS` voxels (a voxel size such as 1e6 mm overflowed the
            interpolation or would not finish).
    """
    for name, values in (("spacing", spacing), ("target spacing", target)):
        if len(values) != 3 or not all(0 < float(v) < math.inf for v in values):
            raise RadLensError(f"cannot resample: the {name} {tuple(values)} mm is not three "
                              "positive finite numbers")
    ratio = [s / t for s, t in zip(spacing, target, strict=True)]
    if all(abs(r - 1.0) <= tolerance for r in ratio):
        return hu
    extent = [n * float(v) for n, v in zip(hu.shape, spacing, strict=True)]
    if max(extent) > MAX_EXTENT_MM:
        axis = "zyx"[int(np.argmax(extent))]
        raise RadLensError(f"a volume of {'x'.join(map(str, hu.shape))} voxels at "
                           f"{'x'.join(f'{float(v):g}' for v in spacing)} mm spans "
                           f"{max(extent):.4g} mm along {axis}, more than any scan "
                           f"({MAX_EXTENT_MM:g} mm): is the voxel size right?")
    exact = [n * r for n, r in zip(hu.shape, ratio, strict=True)]
    if math.prod(max(4.0, e) for e in exact) > MAX_RESAMPLED_VOXELS:
        shown = "x".join(f"{e:.3g}" for e in exact)
        raise RadLensError(f"a volume of {'x'.join(map(str, hu.shape))} voxels at "
                          f"{'x'.join(f'{float(v):g}' for v in spacing)} mm would be {shown} "
                          f"voxels on the model's {'x'.join(f'{float(v):g}' for v in target)} mm "
                          f"grid (at most {MAX_RESAMPLED_VOXELS:,}): is the voxel size right?")
    size = [max(4, round(e)) for e in exact]
    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(hu, np.float32))[None, None],
                        size=size, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def _unit(v: torch.Tensor) -> np.ndarray:
    return F.normalize(v.float(), dim=0).cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------- shipping

def _read_benchmark(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A benchmark JSON object for a model card, or one ConfigError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the benchmark ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: the benchmark is not valid JSON ({exc})") from None
    reps = data.get("representations", {}) if isinstance(data, dict) else None
    if not isinstance(reps, dict) or not all(isinstance(v, dict) for v in reps.values()):
        # valid JSON of another shape was an internal AttributeError half-way through
        raise ConfigError(f"{path}: the benchmark must be a JSON object whose "
                          "'representations' map names to objects (the output of radlens "
                          "eval-volumes or benchmarks/volume_retrieval.py)")
    return data


def export_volume_model(run: str | os.PathLike[str], out: str | os.PathLike[str], *,
                        benchmark: str | os.PathLike[str] | None = None,
                        commands: list[str] | None = None, with_head: bool = True,
                        notes: list[str] | None = None, top_k: int | None = None) -> Path:
    """Package a LeCL run (plus its CLEAR ABMIL, when the run has one) for shipping:
    ``lecl.pt`` with the float16 slice encoder only, ``clear_mil.pt`` / ``clear_mil.json``,
    ``MODEL_CARD.md`` (with the ``radlens eval-volumes`` JSON when ``benchmark`` is given).
    A lesion-seg run goes to :func:`vlm.train.lesionseg.export_lesionseg` (``benchmark``: a
    ``volume_retrieval.json`` for its card; ``top_k``: its volume read-out, see there).

    The export is written into a new folder beside ``out`` and put in place when complete;
    ``out`` must be new, empty or an earlier volume-model export, and neither the run nor a
    folder holding it (see :func:`vlm.models.checkpoint.check_export_target`)."""
    from vlm.train.lecl import CHECKPOINT as LECL_FILE
    from vlm.train.lesionseg import CHECKPOINT as LESION_FILE
    from vlm.train.lesionseg import export_lesionseg

    src, dest = Path(run), Path(out)
    # read before anything is written: a mistyped --benchmark used to fail after the export
    # had replaced the weights, leaving them beside the previous export's model card
    data = _read_benchmark(benchmark) if benchmark is not None else None
    found = _find(src, LESION_FILE)
    lesion = found is not None
    if top_k is not None and not lesion:
        raise ConfigError(f"{src}: --top-k is the read-out of a lesion-seg run, and this is "
                          "not one")
    found = found or _find(src, LECL_FILE)
    if found is None:
        raise ConfigError(f"{src}: no {LECL_FILE}; only LeCL and lesion-seg runs are packaged "
                          "(a DrasCLR run folder is used as it is)")
    # --out set to the run (or its best/) deleted the CLEAR head it was about to copy; a
    # folder of something else (an image checkpoint) got a LeCL config.json over its own
    check_export_target(dest, [src, found.parent],
                        lambda p: (p / LECL_FILE).is_file() or (p / LESION_FILE).is_file(),
                        "a RadLens volume model")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if lesion:
            export_lesionseg(src, tmp, evaluation=data, commands=commands, notes=notes,
                             top_k=top_k)
        else:
            _export_lecl_folder(src, tmp, data, commands, with_head, notes)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp made the folder private to its owner
            path.chmod(0o755 if path.is_dir() else 0o644)
        replace_folder(tmp, dest)  # the previous export stays whole until this one is ready
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _export_lecl_folder(src: Path, dest: Path, data: dict[str, Any] | None,
                        commands: list[str] | None, with_head: bool,
                        notes: list[str] | None) -> None:
    """The LeCL half of :func:`export_volume_model`, written into the new folder ``dest``."""
    from vlm.models.card import volume_model_card
    from vlm.train.lecl import CHECKPOINT as LECL_FILE
    from vlm.train.lecl import export_lecl, read_checkpoint

    export_lecl(src, dest)
    head_summary = None
    mil = _find(src, CLEAR_MIL_CHECKPOINT) if with_head else None
    if mil is not None:
        shutil.copyfile(mil, dest / CLEAR_MIL_CHECKPOINT)
        info = mil.parent / "clear_mil.json"
        if info.is_file():
            shutil.copyfile(info, dest / "clear_mil.json")
            head_summary = read_json_object(info, "a CLEAR head summary")
    state = read_checkpoint(dest, LECL_FILE, "train_lecl")
    bench = None
    if data is not None:
        bench = {"n_volumes": data.get("n_volumes"), "folds": data.get("folds"),
                 "shape": data.get("shape"), "budget_minutes": data.get("budget_minutes"),
                 "representations": {k: v.get("metrics") for k, v in
                                     data.get("representations", {}).items()}}
    enc = VolumeEncoder.load(dest)
    card = volume_model_card("lecl", state["config"], state.get("summary"), head_summary, bench,
                             commands, enc.config_hash, notes)
    (dest / "MODEL_CARD.md").write_text(card)
