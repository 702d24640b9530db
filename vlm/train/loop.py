"""The training loop shared by every recipe.

What it guarantees: seeded determinism on CPU (data order and augmentation are functions of
(seed, epoch, index), RNG states are checkpointed), resume after interruption from the last
saved step with the same result as an uninterrupted run, gradient accumulation, AMP (bf16 or
fp16 with a grad scaler), periodic validation with best/last checkpoints, a progress bar with
loss and throughput. Distributed-ready: rank and world size are passed to the loss by the
recipe; nothing here is global.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from vlm.amp import AMP_CHOICES, autocast
from vlm.errors import ConfigError, Interrupted
from vlm.interrupt import interrupt_for_test, stop_on_signal
from vlm.models.checkpoint import load_torch_state

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
KILL_ENV = "RADLENS_TEST_KILL_AFTER_STEP"  # tests: SIGKILL self right after saving this step
INTERRUPT_ENV = "RADLENS_TEST_INTERRUPT_AFTER_STEP"  # tests: Ctrl-C right after this step


#: settings a resumed run must share with the saved state: they decide the data order, the
#: schedule and the updates (the time budget, devices, logging and save intervals may change)
RESUME_MUST_MATCH = ("epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps",
                     "min_lr_ratio", "max_steps", "amp", "clip_grad", "seed")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    max_steps: int | None = None  # stop early (budgeted runs)
    max_minutes: float | None = None
    amp: str | None = None  # None | "bf16" | "fp16"
    clip_grad: float | None = 1.0
    val_every: int = 0  # optimiser steps; 0 = once per epoch
    save_every: int = 50  # optimiser steps between resumable states
    seed: int = 0
    device: str = "cpu"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        """One-line refusals for settings no run can use (``--batch-size 0`` was a
        ZeroDivisionError deep in the loop, ``--amp fp8`` silently trained in fp32)."""
        at_least_one = {"epochs": self.epochs, "batch_size": self.batch_size,
                        "grad_accum": self.grad_accum, "save_every": self.save_every,
                        "log_every": self.log_every}
        if self.max_steps is not None:
            at_least_one["max_steps"] = self.max_steps
        for name, value in at_least_one.items():
            if int(value) < 1:
                raise ConfigError(f"training setting {name} must be at least 1, got {value}")
        for name, number in (("warmup_steps", self.warmup_steps),
                             ("val_every", self.val_every), ("seed", self.seed)):
            if int(number) < 0:
                raise ConfigError(f"training setting {name} must not be negative, got {number}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or (
                self.max_minutes is not None and not self.max_minutes > 0):
            raise ConfigError(f"training needs a finite lr > 0 and max_minutes > 0 if given "
                              f"(got lr {self.lr}, max_minutes {self.max_minutes})")
        if self.amp is not None and self.amp not in AMP_CHOICES:
            raise ConfigError(f"unknown amp '{self.amp}': use {' or '.join(AMP_CHOICES)} (or "
                              "leave it off)")


class Task(Protocol):
    """What a recipe provides to the loop."""

    def train_size(self) -> int: ...

    def batch(self, indices: Sequence[int], epoch: int) -> Any: ...

    def loss(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def validate(self) -> dict[str, float]: ...

    def save(self, folder: Path, summary: dict[str, Any]) -> None: ...

    # Optional: ``data_fingerprint() -> str``, the identity of the training data and of the
    # task's own sampling settings; a saved state with another fingerprint is not resumed.


def model_settings(model: torch.nn.Module) -> dict[str, Any] | None:
    """The model's configuration as flat ``{"a.b": value}`` (its ``config`` or ``cfg``: a
    dataclass or anything with ``to_dict``), or None for a model without one. Saved with the
    training state: a resumed run must build the same model, and two configurations can give
    the same parameter shapes (a LeCL run with ``lesion_weight`` 10 and a plain MoCo one)."""
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    if cfg is None:
        return None
    if callable(getattr(cfg, "to_dict", None)):
        tree = cfg.to_dict()
    elif hasattr(cfg, "__dataclass_fields__"):
        tree = asdict(cfg)
    else:
        return None
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("", json.loads(json.dumps(tree, default=str)))  # plain values, as saved and reloaded
    return flat


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class Trainer:
    def __init__(self, model: torch.nn.Module, task: Task, cfg: TrainConfig, out_dir: Path,
                 monitor: str = "val_loss", monitor_mode: str = "min",
                 on_log: Callable[[dict[str, float]], None] | None = None) -> None:
        self.model, self.task, self.cfg = model, task, cfg
        fingerprint = getattr(task, "data_fingerprint", None)  # optional for a Task
        #: the training data's identity, saved with the state and checked on resume
        self.data_fingerprint = str(fingerprint()) if callable(fingerprint) else None
        self.model_settings = model_settings(model)
        self.out = Path(out_dir)
        self.monitor, self.mode = monitor, monitor_mode
        self.on_log = on_log
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.steps_per_epoch = max(1, task.train_size() // (cfg.batch_size * cfg.grad_accum))
        total = self.steps_per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(cfg.amp == "fp16"
                                                           and cfg.device.startswith("cuda")))
        self.step = 0
        self.best: float | None = None
        self.history: list[dict[str, float]] = []

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    # -- state ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "best": self.best, "history": self.history,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
            "config": asdict(self.cfg), "data": self.data_fingerprint,
            "model_config": self.model_settings,
        }



    def save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f".{STATE_FILE}.tmp"
        with open(tmp, "wb") as fh:
            torch.save(self._state(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.out / STATE_FILE)

    def try_resume(self) -> bool:
        path = self.out / STATE_FILE
        if not path.is_file():
            return False
        state = load_torch_state(path, "training state",
                                 "delete it to start over, or use another --out")
        if "model" not in state:
            raise ConfigError(f"{path} is not a RadLens training state: delete it to start "
                              f"over, or use another --out")
        self._check_resumable(path, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), state["best"]
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        logger.info("resumed from step %d", self.step)
        return True

    def _check_resumable(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a state saved by another model or with other settings: resuming it would
        silently mix two runs (or fail deep inside ``load_state_dict``)."""
        fix = "use the same settings, another --out, or delete that file to start over"
        mine = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        saved = {k: tuple(v.shape) for k, v in state["model"].items()}
        if mine != saved:
            differ = sorted(set(mine) ^ set(saved)) or sorted(
                k for k in mine if mine[k] != saved[k])
            raise ConfigError(f"{path} is the state of another model ({len(differ)} "
                              f"parameters differ, e.g. {differ[0]}): {fix}")
        old_model, new_model = state.get("model_config"), self.model_settings
        if old_model is not None and new_model is not None and old_model != new_model:
            keys = sorted(k for k in set(old_model) | set(new_model)
                          if old_model.get(k) != new_model.get(k))
            shown = "; ".join(f"{k} {old_model.get(k)} there, {new_model.get(k)} here"
                              for k in keys[:3]) + ("; ..." if len(keys) > 3 else "")
            raise ConfigError(f"{path} is the state of a run with another model "
                              f"configuration ({shown}): {fix}")
        data = self.data_fingerprint
        if state.get("data") and data and state["data"] != data:
            raise ConfigError(f"{path} is the state of a run on other training data (its "
                              f"files, texts or sampling settings differ): {fix}")
        old, new = state.get("config") or {}, asdict(self.cfg)
        changed = [f"{k} {old[k]} there, {new[k]} here" for k in RESUME_MUST_MATCH
                   if k in old and old[k] != new[k]]
        if changed:
            raise ConfigError(f"{path} is the state of a run with other settings "
                              f"({'; '.join(changed)}): {fix}")

    # -- loop ----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.cfg.amp, self.cfg.device)

    def _batches(self) -> Iterator[tuple[int, list[list[int]]]]:
        """(epoch, micro-batches of one optimiser step), starting after ``self.step``."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.grad_accum
        step = 0
        for epoch in range(cfg.epochs):
            order = epoch_order(self.task.train_size(), cfg.seed, epoch)
            for s in range(self.steps_per_epoch):
                if step >= self.step:
                    chunk = order[s * per_step:(s + 1) * per_step]
                    yield epoch, [chunk[i:i + cfg.batch_size]
                                  for i in range(0, len(chunk), cfg.batch_size)]
                step += 1
                if step >= self.total_steps:
                    return

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.try_resume()
        if not resumed:
            seed_everything(cfg.seed)
        start, seen = time.time(), 0
        bar = _progress(self.total_steps, self.step, cfg.progress)
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        interrupt_at = int(os.environ.get(INTERRUPT_ENV, "0") or 0)
        self.model.train()
        with stop_on_signal("saving the training state after this step") as stop:
            for epoch, micro in self._batches():
                self.optimizer.zero_grad(set_to_none=True)
                parts: dict[str, float] = {}
                for indices in micro:
                    batch = self.task.batch(indices, epoch)
                    with self._autocast():
                        out = self.task.loss(batch)
                    loss = out["loss"] / len(micro)
                    self.scaler.scale(loss).backward()
                    for k, v in out.items():
                        parts[k] = parts.get(k, 0.0) + float(v.detach()) / len(micro)
                    seen += len(indices)
                if cfg.clip_grad:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.step += 1
                rate = seen / max(time.time() - start, 1e-6)
                parts.update(step=self.step, epoch=epoch,
                             lr=float(self.scheduler.get_last_lr()[0]), samples_per_s=rate)
                bar.update(parts)
                if self.step % cfg.log_every == 0:
                    self.history.append(parts)
                    if self.on_log:
                        self.on_log(parts)
                end_of_epoch = self.step % self.steps_per_epoch == 0
                due = (self.step % cfg.val_every == 0) if cfg.val_every else end_of_epoch
                if due or self.step == self.total_steps:
                    self._validate()
                if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                    self.save_state()
                    if kill_at and self.step == kill_at:
                        os.kill(os.getpid(), 9)
                if self.step == interrupt_at:
                    interrupt_for_test()
                if stop:
                    self.save_state()
                    bar.close()
                    raise Interrupted(
                        f"interrupted at step {self.step} of {self.total_steps}: the state is "
                        f"saved in {self.out / STATE_FILE}; run the same command again to "
                        "resume", stop.exit_code)
                if cfg.max_minutes and (time.time() - start) / 60 > cfg.max_minutes:
                    logger.warning("time budget of %.1f min reached at step %d", cfg.max_minutes,
                                   self.step)
                    self._validate()
                    self.save_state()
                    break
        bar.close()
        summary = {"steps": self.step, "best": self.best, "monitor": self.monitor,
                   "seconds": round(time.time() - start, 1), "history": self.history[-50:]}
        self.task.save(self.out / "last", summary)
        return summary

    def _validate(self) -> None:
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.validate()
        self.model.train()
        metrics["step"] = self.step
        self.history.append({f"val/{k}": v for k, v in metrics.items()})
        value = metrics.get(self.monitor)
        if value is None:
            return
        better = self.best is None or (value < self.best if self.mode == "min"
                                       else value > self.best)
        logger.info("step %d: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        if better:
            self.best = float(value)
            self.task.save(self.out / "best", {"step": self.step, self.monitor: value,
                                               "metrics": metrics})


class _progress:
    """A tqdm bar when available and wanted, else periodic log lines."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, parts: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{parts.get('loss', float('nan')):.3f}",
                                 rate=f"{parts['samples_per_s']:.1f}/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
