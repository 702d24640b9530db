"""``radlens eval`` with unreadable masks: a garbage mask PNG was 'internal error:
UnidentifiedImageError' after all the other scoring, a missing one a one-line error at the very
end. Such findings are now left out of grounding, counted in eval.json and eval.md, and named in
one warning; every other score is still reported."""

from __future__ import annotations

import json
import logging

import numpy as np
from PIL import Image

from tests.tiny_cxr import make_tiny_cxr
from vlm.data.manifest import read_jsonl, write_jsonl
from vlm.models import create_model, get_tokenizer, save_checkpoint


def test_unreadable_masks_are_left_out_of_grounding_and_counted(tmp_path, capsys, caplog):
    from ui.cli import main

    data = make_tiny_cxr(tmp_path / "data", n=20, size=64)
    rows = list(read_jsonl(data / "manifest.jsonl"))
    with_mask = []
    for i, r in enumerate(rows):
        for f in r["findings"]:
            x0, y0, x1, y1 = f["box"]
            mask = np.zeros((r["size"], r["size"]), np.uint8)
            mask[max(y0, 0):y1, max(x0, 0):x1] = 255
            f["mask"] = f"masks/m{i:03d}.png"
            (data / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask).save(data / f["mask"])
            if r["split"] == "test":
                with_mask.append(f["mask"])
    write_jsonl(data / "manifest.jsonl", rows)
    assert len(with_mask) >= 3
    (data / with_mask[0]).write_bytes(b"not a png at all")
    (data / with_mask[1]).unlink()
    save_checkpoint(create_model("lrclr-tiny"), tmp_path / "ckpt", get_tokenizer("lrclr-tiny"),
                    card="# tiny")
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        code = main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(data), "--out",
                     str(tmp_path / "eval"), "--json"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err and "internal error" not in err
    warned = [r.getMessage() for r in caplog.records if "mask cannot be read" in r.getMessage()]
    assert len(warned) == 1
    assert f"{with_mask[0]}: not an image file; {with_mask[1]}: no such file" in warned[0]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["grounding_skipped_masks"] == 2 and result["unreadable_images"] == 0
    for key in ("grounding", "grounding_patch"):
        assert result[key]["instances"] == len(with_mask) - 2
        assert result[key]["skipped_masks"] == 2 and result[key]["pointing_game"] is not None
    assert result["retrieval"]["report_to_image"]["R@1"] is not None
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "2 findings are left out of grounding: their mask cannot be read." in md
