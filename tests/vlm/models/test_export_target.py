"""``radlens export-model`` replaces only an earlier export: never the checkpoint it exports,
a folder holding it, or a folder of other files; a damaged eval.json is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm.errors import ConfigError
from vlm.models import create_model, get_tokenizer, save_checkpoint
from vlm.models.checkpoint import export_checkpoint, is_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    save_checkpoint(create_model("lrclr-tiny"), root / "best", get_tokenizer("lrclr-tiny"),
                    card="#")
    (root / "train_state.pt").write_bytes(b"optimiser state")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_targets_it_would_destroy(run, tmp_path):
    before = _files(run)
    for dest in (run, run / "best"):  # both used to be deleted, train_state.pt with them
        with pytest.raises(ConfigError, match="is, or holds, the model being exported"):
            export_checkpoint(run / "best", dest)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")  # --out ~ deleted everything in it
    with pytest.raises(ConfigError, match="holds other files and is not a RadLens image"):
        export_checkpoint(run / "best", home)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        export_checkpoint(run / "best", tmp_path / "a_file")
    assert _files(run) == before and _files(home) == {"notes.txt": b"precious"}


def test_a_damaged_eval_json_is_one_line_before_anything_is_written(run, tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    for content in ('{"auc": ', "[1, 2]"):
        (ev / "eval.json").write_text(content)
        with pytest.raises(ConfigError, match=r"eval\.json: not"):
            export_checkpoint(run / "best", tmp_path / "out", eval_dir=ev)
        assert not (tmp_path / "out").exists()


def test_an_earlier_export_is_replaced_whole(run, tmp_path):
    dest = export_checkpoint(run / "best", tmp_path / "ship")
    (dest / "stale.txt").write_text("from the first export")
    export_checkpoint(run / "best", dest)
    assert is_checkpoint(dest) and not (dest / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ship"], "temporary folders left"
