"""Ctrl-C and SIGTERM during long runs: the first asks for a stop, the second stops at once."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from vlm.errors import Interrupted, RadLensError
from vlm.interrupt import stop_on_signal


def test_first_signal_asks_for_a_stop_and_a_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signal("saving") as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)
        assert stop and stop.signum == signal.SIGINT and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_asks_for_a_stop_with_its_own_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signal("saving") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.exit_code == 143
        with pytest.raises(SystemExit) as second:  # at once, still exiting 128 + SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
        assert second.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_handlers_that_are_not_the_default_are_left_alone():
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with stop_on_signal("saving") as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == [signal.SIGINT] and not stop  # the host application's handler ran
    finally:
        signal.signal(signal.SIGINT, previous)


def test_outside_the_main_thread_nothing_changes():
    result: dict[str, object] = {}

    def run() -> None:
        with stop_on_signal("saving") as stop:
            result["handler"] = signal.getsignal(signal.SIGINT)
            result["stop"] = bool(stop)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert result == {"handler": signal.default_int_handler, "stop": False}


def test_interrupted_is_a_one_line_user_error_with_the_signal_exit_code():
    error = Interrupted("interrupted: 3 new images\nsaved", 143, report={"added": 3})
    assert isinstance(error, RadLensError)
    assert str(error) == "interrupted: 3 new images saved"
    assert error.exit_code == 143 and error.report == {"added": 3}
