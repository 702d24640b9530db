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
