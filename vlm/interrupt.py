"""Stopping a long run cleanly: the first Ctrl-C (or SIGTERM) asks it to stop at its next safe
point, where it saves what it has done; a second one stops it at once.

An index build or a training run can take hours. Python's default turns Ctrl-C into a
``KeyboardInterrupt`` wherever the run happens to be, so everything since the last periodic
save was lost (up to 511 encoded images, or the steps since the last checkpoint), and a
scheduler's SIGTERM killed the run without any save. With :func:`stop_on_signal` the run checks
``stop`` at each safe point (a recorded batch, a finished optimiser step), saves, and raises
:class:`vlm.errors.Interrupted`; the saved state is what a rerun of the same command continues
from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


class StopRequest:
    """Truthy once a stop has been asked for; ``signum`` says by which signal."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


@contextlib.contextmanager
def stop_on_signal(what: str) -> Iterator[StopRequest]:
    """While inside, SIGINT and SIGTERM set the yielded :class:`StopRequest` instead of
    stopping the process; a second signal stops it at once (``KeyboardInterrupt`` for Ctrl-C,
    ``SystemExit(143)`` for SIGTERM, so that the exit code still names the signal). ``what`` is
    the log line's description of what happens next ("saving the index after this batch").

    Outside the main thread, and for a signal whose handler is not Python's default (ignored,
    as in a background job, or set by the host application), nothing is changed.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop:
            if signum == signal.SIGTERM:
                raise SystemExit(128 + signum)
            raise KeyboardInterrupt
        stop.signum = signum
        logger.warning("%s: %s (press Ctrl-C again to stop at once)",
                       signal.Signals(signum).name, what)

    previous: dict[signal.Signals, Any] = {}
    for sig, default in ((signal.SIGINT, signal.default_int_handler),
                         (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(sig) is default:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def ignore_stop_signals(sigterm: bool = True) -> None:
    """For worker processes of a run that handles the signals itself: a terminal's Ctrl-C
    reaches the whole process group, and the run (not each worker) decides when to stop; a
    worker that died of it would print a traceback and break the pool under the run.
    ``sigterm=False`` for workers that nothing else stops when their parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interrupt_for_test() -> None:
    """Tests: send SIGINT as a terminal's Ctrl-C does (SIGTERM, as a service manager stopping
    a job, with ``RADLENS_TEST_INTERRUPT_SIGNAL=TERM``), to the process group when this
    process leads it (started in its own session), else to this process alone."""
    sig = (signal.SIGTERM if os.environ.get("RADLENS_TEST_INTERRUPT_SIGNAL") == "TERM"
           else signal.SIGINT)
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), sig)
    else:
        os.kill(os.getpid(), sig)
