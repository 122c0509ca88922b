"""Loader lifecycle rules: backoff, startsecs, FATAL, with real short-lived processes."""

import os
import subprocess
import sys

import pytest

from gpu_orchestrator.supervisor import states
from gpu_orchestrator.supervisor.clients import LoaderProcess, Policy


def test_backoff_doubles_from_half_a_second_to_thirty():
    policy = Policy()
    assert [policy.restart_delay(n) for n in (1, 2, 3, 4, 7, 20)] == [0.5, 1.0, 2.0, 4.0, 30.0, 30.0]


def test_illegal_transition_is_asserted():
    with pytest.raises(AssertionError, match="STOPPED -> RUNNING"):
        states.check_transition(states.STOPPED, states.RUNNING)


def run_and_exit(loader: LoaderProcess, code: int, now: float, reached_running: bool = False) -> None:
    """Stand a real process in for the loader and record its real exit status."""
    loader.to(states.STARTING)
    loader.proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.stderr.write('why {code}\\n'); sys.exit({code})"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    if reached_running:
        loader.to(states.RUNNING)
    _, status = os.waitpid(loader.proc.pid, 0)
    os.set_blocking(loader.proc.stderr.fileno(), False)
    loader.read_stderr()
    loader.read_stderr()
    loader.exited(status, now + 0.1)


def new_loader():
    return LoaderProcess("a", 1, [], dict(os.environ), Policy())


def test_cannot_boot_exit_goes_straight_to_fatal_with_the_reason():
    loader = new_loader()
    run_and_exit(loader, 78, 0.0)
    assert loader.state == states.FATAL
    assert loader.fatal_reason == "cannot boot: why 78"


def test_five_failed_starts_within_the_window_are_fatal():
    loader = new_loader()
    for attempt in range(4):
        run_and_exit(loader, 1, float(attempt))
        assert loader.state == states.BACKOFF
        assert loader.restart_at == pytest.approx(attempt + 0.1 + 0.5 * 2**attempt)
    run_and_exit(loader, 1, 4.0)
    assert loader.state == states.FATAL
    assert "failed to start 5 times" in loader.fatal_reason and "why 1" in loader.fatal_reason


def test_failures_outside_the_window_are_forgotten():
    loader = new_loader()
    for attempt in range(4):
        run_and_exit(loader, 1, attempt * 100.0)
    run_and_exit(loader, 1, 400.0)
    assert loader.state == states.BACKOFF
    assert loader.restart_at == pytest.approx(400.1 + 0.5)


def test_death_after_running_backs_off_but_is_not_a_failed_start():
    loader = new_loader()
    for attempt in range(6):
        run_and_exit(loader, 1, attempt * 2.0, reached_running=True)
        assert loader.state == states.BACKOFF
    assert len(loader.failed_starts) == 0
    assert loader.restart_at == pytest.approx(10.1 + 16.0)  # sixth death in the window
