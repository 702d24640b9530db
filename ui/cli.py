"""The ``radlens`` command line. Errors a user can cause print one line, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="radlens",
    help="Query radiology archives with language.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

logger = logging.getLogger("radlens")


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Log progress to stderr.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
def inspect(
    files: Annotated[list[Path], typer.Argument(help="DICOM / PNG / JPEG files, NIfTI volumes or "
                                                     "DICOM series folders.")],
    out: Annotated[Path | None, typer.Option(help="Write a windowed PNG preview per file here.")
                   ] = None,
    window: Annotated[str | None, typer.Option(
        help="lung|mediastinum|bone|brain|abdomen|liver|subdural or CENTRE,WIDTH; default: the "
             "file's own VOI window")] = None,
    frame: Annotated[int, typer.Option(help="Frame of a multi-frame image to preview.")] = 0,
    with_identifiers: Annotated[bool, typer.Option(
        "--with-identifiers", help="Also print raw patient/study identifiers (off by default).")
    ] = False,
) -> None:
    """Print de-identified metadata (one JSON object per line) and write windowed previews."""
    from ui.inspect import inspect_paths

    failures = inspect_paths(files, out=out, window=window, frame=frame,
                             keep_identifiers=with_identifiers)
    if failures:
        raise typer.Exit(code=2)


data_app = typer.Typer(help="Proving-ground data sets (real report text, synthetic pixels).",
                       no_args_is_help=True)
train_app = typer.Typer(help="Training recipes.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")


@data_app.command("phantom-cxr")
def data_phantom_cxr(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    n: Annotated[int | None, typer.Option(help="Number of studies (default: all reports).")
                 ] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 512,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: all cores).")
                       ] = None,
    contact_sheet: Annotated[bool, typer.Option(help="Also write contact_sheet.png.")] = True,
) -> None:
    """PhantomCXR: real IU reports and MeSH labels, rendered radiographs, exact masks."""
    from vlm.data.phantom_cxr import generate_phantom_cxr, make_contact_sheet

    summary = generate_phantom_cxr(out, n=n, size=size, seed=seed, workers=workers)
    if contact_sheet:
        summary["contact_sheet"] = str(make_contact_sheet(out))
    print(json_line(summary))


@data_app.command("phantom-ct")
def data_phantom_ct(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    n: Annotated[int, typer.Option(help="Number of volumes.")] = 100,
    shape: Annotated[str, typer.Option(help="Z,Y,X voxels.")] = "128,128,128",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data).")] = 0,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: all cores).")
                       ] = None,
    contact_sheet: Annotated[bool, typer.Option(help="Also write contact_sheet.png.")] = True,
) -> None:
    """PhantomCT: chest-abdomen CT volumes with lesions, emphysema and anatomical coordinates."""
    from vlm.data.phantom_ct import generate_phantom_ct, make_contact_sheet
    from vlm.errors import RadLensError

    try:
        zyx = tuple(int(v) for v in shape.split(","))
    except ValueError:
        raise RadLensError(f"--shape must be Z,Y,X integers, got '{shape}'") from None
    if len(zyx) != 3 or min(zyx) < 16:
        raise RadLensError(f"--shape must be three sizes >= 16, got '{shape}'")
    summary = generate_phantom_ct(out, n=n, shape=zyx, seed=seed, workers=workers)
    if contact_sheet:
        summary["contact_sheet"] = str(make_contact_sheet(out))
    print(json_line(summary))


@train_app.command("lrclr")
def train_lrclr_cmd(
    data: Annotated[Path, typer.Option(help="PhantomCXR-style folder with manifest.jsonl.")],
    out: Annotated[Path, typer.Option(help="Run folder (best/, last/, train_state.pt).")],
    model: Annotated[str, typer.Option(help="Model config name or JSON.")] = "lrclr-small",
    pretrained: Annotated[str | None, typer.Option(
        help="Start from weights: RadLens checkpoint or open_clip weights (path, local-dir:, "
             "hf-hub:).")] = None,
    epochs: Annotated[int, typer.Option()] = 10,
    batch_size: Annotated[int, typer.Option()] = 32,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    lr: Annotated[float, typer.Option()] = 5e-4,
    warmup_steps: Annotated[int, typer.Option()] = 50,
    max_steps: Annotated[int | None, typer.Option()] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this wall time.")
                           ] = None,
    save_every: Annotated[int, typer.Option(help="Steps between resumable states.")] = 50,
    val_every: Annotated[int, typer.Option(help="Steps between validations (0: per epoch).")
                         ] = 0,
    amp: Annotated[str | None, typer.Option(help="bf16 or fp16 mixed precision.")] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    workers: Annotated[int | None, typer.Option(help="Decode workers.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train LRCLR (or the plain-CLIP baseline config); resumes if OUT has a saved state."""
    from vlm.train.loop import TrainConfig
    from vlm.train.lrclr import train_lrclr

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      warmup_steps=warmup_steps, max_steps=max_steps, max_minutes=max_minutes,
                      save_every=save_every, val_every=val_every, amp=amp, device=device,
                      seed=seed, progress=progress)
    summary = train_lrclr(data, model, out, cfg, pretrained=pretrained, workers=workers)
    print(json_line({k: v for k, v in summary.items() if k != "history"}))


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option(help="Checkpoint folder (or config name).")],
    data: Annotated[Path, typer.Option(help="PhantomCXR-style folder with manifest.jsonl.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    out: Annotated[Path | None, typer.Option(help="Write eval.json, eval.md and plots here.")
                   ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt-set JSON (default: built-in).")
                       ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")
                       ] = False,
) -> None:
    """Zero-shot AUC, retrieval recall@K (exact and label-matched) and grounding scores."""
    from vlm.eval.lrclr import evaluate, markdown_table
    from vlm.zeroshot import PromptSet

    result = evaluate(model, data, split=split, out_dir=out,
                      prompts=PromptSet.load(prompts) if prompts else None)
    print(json_line(result) if as_json else markdown_table(result))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo outputs.")] = Path("data/demo"),
) -> None:
    """Run the end-to-end demo on the bundled real sample files."""
    from ui.demo import run_demo

    failures = run_demo(out)
    if failures:
        raise typer.Exit(code=2)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line per user error, exit codes 0 ok / 1 internal / 2 user error."""
    from typer.exceptions import Abort, Exit, TyperException

    from vlm.errors import RadLensError

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="radlens", standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            return result
    except Exit as exc:
        return int(exc.exit_code)
    except TyperException as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"radlens: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except Abort:
        print("radlens: aborted", file=sys.stderr)
        return 130
    except RadLensError as exc:
        print(f"radlens: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("radlens: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("RADLENS_DEBUG"):
            raise
        text = " ".join(str(exc).split())[:300]
        print(f"radlens: internal error: {type(exc).__name__}: {text} "
              "(set RADLENS_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


def json_line(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=False, default=str)


if __name__ == "__main__":
    sys.exit(main())
