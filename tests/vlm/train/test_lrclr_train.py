"""The training loop: learning on a tiny archive, kill-and-resume equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_cxr import make_tiny_cxr


@pytest.fixture(scope="module")
def tiny_cxr(tmp_path_factory) -> Path:
    return make_tiny_cxr(tmp_path_factory.mktemp("tiny_cxr"))


def _train(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
           session: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "import sys; from ui.cli import main; sys.exit(main())",
           "train", "lrclr", "--data", str(data), "--out", str(out), "--model", "lrclr-tiny",
           "--epochs", "3", "--batch-size", "8", "--warmup-steps", "2", "--save-every", "1",
           "--lr", "2e-3", "--workers", "1", "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          start_new_session=session)


@pytest.mark.slow
def test_kill_or_ctrl_c_and_resume_give_the_same_weights(tiny_cxr, tmp_path):
    straight = _train(tiny_cxr, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _train(tiny_cxr, tmp_path / "resumed",
                    env={"RADLENS_TEST_KILL_AFTER_STEP": "4"})
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr[-2000:]
    assert (tmp_path / "resumed" / "train_state.pt").is_file()
    assert not (tmp_path / "resumed" / "last").exists()
    resumed = _train(tiny_cxr, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Ctrl-C (to the process group, as a terminal sends it) between two saves: the run saves
    # the step it finished and says so in one line
    stopped = _train(tiny_cxr, tmp_path / "stopped", "--save-every", "100",
                     env={"RADLENS_TEST_INTERRUPT_AFTER_STEP": "5"}, session=True)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        "radlens: interrupted at step 5 of 9: the state is saved in ")
    state = torch.load(tmp_path / "stopped" / "train_state.pt", weights_only=False)
    assert state["step"] == 5 and not (tmp_path / "stopped" / "last").exists()
    again = _train(tiny_cxr, tmp_path / "stopped", "--save-every", "100")
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    for run in ("resumed", "stopped"):
        b = load_file(str(tmp_path / run / "last" / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (run, k)
    # and training moved the weights away from initialisation
    assert (tmp_path / "straight" / "best" / "MODEL_CARD.md").is_file()


def test_training_learns_the_tiny_task(tiny_cxr, tmp_path):
    from vlm.train.loop import TrainConfig
    from vlm.train.lrclr import train_lrclr

    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, warmup_steps=2, save_every=100,
                      progress=False, log_every=1)
    summary = train_lrclr(tiny_cxr, "lrclr-tiny", tmp_path / "run", cfg, workers=1)
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert summary["steps"] == 6 * (28 // 8)
    assert len(losses) == summary["steps"]
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3])  # duplicates in the texts: chance ~4.2
    val = [h["val/val_loss"] for h in summary["history"] if "val/val_loss" in h]
    assert len(val) == 6 and min(val[3:]) < val[0]


def test_a_state_from_other_settings_or_another_model_is_not_resumed(tiny_cxr, tmp_path):
    """Reusing a run folder with a changed learning rate or other data used to resume silently
    (a mix of two runs); with another model it failed inside load_state_dict. All are one-line
    refusals, and the saved state is left as it was."""
    import json

    import vlm
    from vlm.errors import ConfigError
    from vlm.train.loop import STATE_FILE, TrainConfig
    from vlm.train.lrclr import train_lrclr

    def cfg(**changes):
        base = dict(epochs=1, batch_size=8, lr=2e-3, warmup_steps=2, save_every=100,
                    progress=False)
        return TrainConfig(**{**base, **changes})

    run = tmp_path / "run"
    train_lrclr(tiny_cxr, "lrclr-tiny", run, cfg(), workers=1)
    state = (run / STATE_FILE).read_bytes()
    with pytest.raises(ConfigError) as other_lr:
        train_lrclr(tiny_cxr, "lrclr-tiny", run, cfg(lr=1e-2), workers=1)
    assert "other settings (lr 0.002 there, 0.01 here)" in str(other_lr.value)
    assert "another --out" in str(other_lr.value) and "\n" not in str(other_lr.value)
    other = json.loads((Path(vlm.__file__).parent / "model_configs" / "lrclr-tiny.json")
                       .read_text())
    other["embed_dim"] = 24
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="is the state of another model"):
        train_lrclr(tiny_cxr, str(tmp_path / "other.json"), run, cfg(), workers=1)
    other_data = make_tiny_cxr(tmp_path / "other_data", n=40)
    with pytest.raises(ConfigError, match="is the state of a run on other training data"):
        train_lrclr(other_data, "lrclr-tiny", run, cfg(), workers=1)
    assert (run / STATE_FILE).read_bytes() == state
    # what may change on resume: the time budget, the save and log intervals
    train_lrclr(tiny_cxr, "lrclr-tiny", run, cfg(max_minutes=30, save_every=7, log_every=3),
                workers=1)


def test_a_cnn_tower_trains_channels_last_and_deterministically(tiny_cxr, tmp_path,
                                                               monkeypatch):
    """On the CPU ``train_lrclr`` runs a CNN tower channels-last (1.29x for a bf16 step of
    ResNet-18 here): two seeded runs still give bit-identical weights."""
    import json

    import vlm
    from vlm.models.vision import VisionTower
    from vlm.train.loop import TrainConfig
    from vlm.train.lrclr import train_lrclr

    applied: list[bool] = []
    original = VisionTower.use_channels_last
    monkeypatch.setattr(VisionTower, "use_channels_last",
                        lambda self, enabled=True: applied.append(original(self, enabled))
                        or applied[-1])
    cfg_json = json.loads((Path(vlm.__file__).parent / "model_configs" / "lrclr-tiny.json")
                          .read_text())
    cfg_json["vision"] = {"backend": "timm", "image_size": 64, "timm_model": "resnet18"}
    (tmp_path / "cnn.json").write_text(json.dumps(cfg_json))
    cfg = TrainConfig(epochs=1, batch_size=8, lr=2e-3, warmup_steps=1, save_every=100,
                      progress=False, amp="bf16")
    for run in ("a", "b"):
        train_lrclr(tiny_cxr, str(tmp_path / "cnn.json"), tmp_path / run, cfg, workers=1)
    assert applied == [True, True]
    a = load_file(str(tmp_path / "a" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 0}, "training setting batch_size must be at least 1, got 0"),
    ({"epochs": 0}, "training setting epochs must be at least 1, got 0"),
    ({"max_steps": 0}, "training setting max_steps must be at least 1, got 0"),
    ({"warmup_steps": -1}, "training setting warmup_steps must not be negative, got -1"),
    ({"seed": -1}, "training setting seed must not be negative, got -1"),
    ({"lr": 0.0}, "training needs a finite lr > 0"),
    ({"lr": float("inf")}, "training needs a finite lr > 0"),
    ({"amp": "fp8"}, "unknown amp 'fp8': use bf16 or fp16"),
])
def test_settings_no_run_can_use_are_refused_in_one_line(changes, message):
    """``--batch-size 0`` was a ZeroDivisionError inside the loop; ``--amp fp8`` trained in
    fp32 without a word."""
    import re

    from vlm.errors import ConfigError
    from vlm.train.loop import TrainConfig

    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(**changes)
