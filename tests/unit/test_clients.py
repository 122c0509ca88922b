"""Loader lifecycle rules: backoff, startsecs, FATAL, with real short-lived processes."""

import os
import re
import subprocess
import sys
import time

import pytest

from gpu_orchestrator.loaders import states
from gpu_orchestrator.supervisor.clients import LoaderProcess, Policy


def test_backoff_doubles_from_half_a_second_to_thirty():
    policy = Policy()
    assert [policy.restart_delay(n) for n in (1, 2, 3, 4, 7, 20)] == [0.5, 1.0, 2.0, 4.0, 30.0, 30.0]


def test_illegal_transition_is_asserted():
    with pytest.raises(AssertionError, match="STOPPED -> RUNNING"):
        states.check_transition(states.STOPPED, states.RUNNING)


def run_and_exit(loader: LoaderProcess, code: int, now: float, reached_running: bool = False,
                 words: str | None = None) -> None:
    """Stand a real process in for the loader and record its real exit status."""
    loader.to(states.STARTING)
    say = f"sys.stderr.write('why {code}\\n'); " if words is None else f"sys.stderr.write({words!r}); "
    loader.started(subprocess.Popen([sys.executable, "-c", f"import sys; {say}sys.exit({code})"],
                                    stdin=subprocess.PIPE, stderr=subprocess.PIPE), now)
    if reached_running:
        loader.to(states.RUNNING)
    _, status = os.waitpid(loader.proc.pid, 0)
    loader.read_stderr()
    loader.read_stderr()
    loader.exited(status, now + 0.1)


def new_loader():
    return LoaderProcess("a", 1, [], dict(os.environ), Policy())


def test_cannot_boot_exit_goes_straight_to_fatal_with_the_reason():
    loader = new_loader()
    run_and_exit(loader, 78, 0.0)
    assert loader.state == states.FATAL
    assert re.fullmatch(r"cannot boot: the last run exited with status 78 at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ; "
                        r"its last line: why 78", loader.fatal_reason), loader.fatal_reason


def test_a_fatal_reason_never_quotes_an_earlier_run():
    loader = new_loader()
    run_and_exit(loader, 1, 0.0, reached_running=True)  # an earlier run that said something
    for attempt in range(5):
        run_and_exit(loader, 1, 1.0 + attempt, words="")  # runs that die saying nothing
    assert loader.state == states.FATAL
    assert "why 1" not in loader.fatal_reason
    assert "the last run exited with status 1 at " in loader.fatal_reason


def test_a_kill_by_the_supervisor_says_why_in_the_exit():
    loader = new_loader()
    loader.to(states.STARTING)
    loader.started(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                    stdin=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0), 0.0)
    loader.kill("heartbeat lost: silent for 31.0 s")
    _, status = os.waitpid(loader.proc.pid, 0)
    loader.exited(status, 1.0)
    assert loader.last_exit == "killed by SIGKILL (heartbeat lost: silent for 31.0 s)"
    assert loader.last_exit_at is not None


def test_silence_counts_from_the_last_heartbeat_seen_never_from_spawn_after_a_failed_read():
    loader = new_loader()
    loader.started_at = 0.0
    assert loader.silent_for(None, 10.0) == 10.0 - Policy().startsecs  # never heard from
    assert loader.silent_for(100.0, 100.5) == 0.5
    assert loader.silent_for(None, 101.0) == 1.0  # a read that found nothing is not silence since spawn
    assert loader.silent_for(99.0, 101.5) == 1.5  # an older copy never moves the heartbeat back


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


def test_a_loader_busy_in_one_long_call_is_not_idle_and_a_stopped_one_is():
    """No heartbeat for a while, but CPU time growing: working (a long C call holds the GIL)."""
    loader = new_loader()  # heartbeat_timeout 30: CPU time is read once the heartbeat is 15 s old
    loader.started_at = 0.0
    assert loader.idle_for(100.0, 110.0, lambda: 1 / 0) == 10.0  # fresh enough: /proc is not read
    used = iter([5.0, 5.5, 6.0])
    assert loader.idle_for(None, 120.0, lambda: next(used)) == 20.0  # first look: nothing to compare yet
    assert loader.idle_for(None, 125.0, lambda: next(used)) == 0.0  # CPU time grew: busy now
    assert loader.idle_for(None, 140.0, lambda: next(used)) == 0.0
    assert loader.idle_for(None, 160.0, lambda: 6.0) == 20.0  # stopped: 20 s since it was last busy
    assert loader.idle_for(None, 175.0, lambda: 6.0) == 35.0  # past the timeout: the caller kills it
    assert loader.idle_for(174.0, 175.0, lambda: 1 / 0) == 1.0  # a heartbeat again: all forgotten
    assert loader.cpu_seen is None and loader.last_busy is None


class OneState:
    """A SlotReader standing in: the run's slot holds a state with this heartbeat."""

    def __init__(self, heartbeat: float):
        self.heartbeat = heartbeat

    def read_written_by(self, slot, pid):
        from gpu_orchestrator.loaders.wire import WARMING_UP, LoaderState
        return LoaderState("a", pid, 1, WARMING_UP, self.heartbeat, [])


@pytest.mark.parametrize("cpu, killed_at_the_next_look", [([5.0, 10.0], False), ([5.0, 5.0], True),
                                                          ([None, None], None)], ids=["busy", "stopped", "unreadable"])
def test_a_first_look_past_the_timeout_samples_cpu_time_and_judges_at_the_next(cpu, killed_at_the_next_look):
    """The loop, stalled by a long spawn or a reload, first looked 31 s after the last heartbeat: a
    loader burning a core in one long parse was killed without its CPU time compared to anything."""
    from types import SimpleNamespace

    loader = LoaderProcess("a", 0, [], {}, Policy(heartbeat_timeout=30.0), state=states.RUNNING,
                           proc=SimpleNamespace(pid=424242))
    used = iter(cpu)
    loader.cpu_seconds = lambda: next(used)
    reader = OneState(heartbeat=100.0)
    first = loader.heartbeat_lost(reader, 131.0)
    if killed_at_the_next_look is None:  # its CPU time cannot be read: judged on its heartbeat alone
        assert first == 31.0
        return
    assert first is None  # a first sample: nothing to compare with yet
    assert (loader.heartbeat_lost(reader, 136.0) == 36.0) is killed_at_the_next_look


def test_popen_all_starts_every_process_in_order_and_each_can_be_reaped():
    from gpu_orchestrator.supervisor.processes import PROCESSES

    requests = [([sys.executable, "-c", f"import sys; sys.exit({code})"], dict(os.environ)) for code in range(5)]
    before = time.monotonic()
    started = PROCESSES.popen_all(requests, time.monotonic)
    procs = [proc for proc, _ in started]
    assert all(before <= born <= time.monotonic() for _, born in started)  # each dated by its own popen
    assert len({p.pid for p in procs}) == 5
    assert [os.waitstatus_to_exitcode(PROCESSES.reap(p, block=True)) for p in procs] == list(range(5))
    for proc in procs:
        proc.stdin.close()
        proc.stderr.close()


def test_rss_is_read_from_proc_for_a_live_run_and_none_without_one():
    loader = LoaderProcess("a", 0, [], {}, Policy())
    loader.to(states.STARTING)
    loader.started(subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                                    stderr=subprocess.PIPE), 0.0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the interpreter is still starting at first
        loader.measure_rss()
        if loader.rss_bytes > 1024 * 1024:
            break
        time.sleep(0.01)
    assert loader.rss_bytes > 1024 * 1024
    loader.proc.stdin.close()
    loader.proc.wait()
    loader.exited(0, 1.0)
    loader.measure_rss()
    assert loader.rss_bytes is None
