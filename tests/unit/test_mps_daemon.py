"""The MPS daemon's checked machine, with the fake nvidia-cuda-mps-control first on PATH."""

import os
from pathlib import Path

import pytest

from gpu_orchestrator.loaders import states
from gpu_orchestrator.supervisor.mps import MpsDaemon
from gpu_orchestrator.supervisor.mps_control import MpsSettings

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"


@pytest.fixture
def settings(tmp_path):
    return MpsSettings(str(tmp_path / "pipe"), str(tmp_path / "log"), probe_interval=0.3, command_timeout=2,
                       start_timeout=30)


def test_a_start_checks_spawns_answers_and_a_stop_quits(settings, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKES}:{os.environ['PATH']}")
    daemon = MpsDaemon(settings)
    assert daemon.state == states.MPS_OFF and not daemon.settled
    try:
        assert daemon.start()
        assert daemon.state == states.MPS_UP and daemon.settled and daemon.managed
        assert daemon.settings_in_force() == settings and daemon.report()["error"] is None
    finally:
        daemon.stop(5)
    assert daemon.state == states.MPS_OFF and daemon.proc is None


def test_a_missing_binary_is_settled_down_and_never_retried(settings, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    daemon = MpsDaemon(settings)
    daemon.begin_start(0.0)
    assert daemon.state == states.MPS_MISSING and daemon.settled and daemon.next_deadline() is None
    assert daemon.settings_in_force() is None and "not found on PATH" in daemon.report()["error"]


def test_a_folder_that_cannot_be_made_backs_off_and_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKES}:{os.environ['PATH']}")
    (tmp_path / "file").write_text("in the way")
    daemon = MpsDaemon(MpsSettings(str(tmp_path / "file" / "pipe"), str(tmp_path / "log")))
    daemon.begin_start(100.0)
    assert daemon.state == states.MPS_BACKOFF and daemon.settled
    assert daemon.next_deadline() == 100.5 and "cannot create the MPS folder" in daemon.report()["error"]
    daemon.supervise(100.5)  # due: tried again, refused again
    assert daemon.state == states.MPS_BACKOFF and daemon.restarts == 1 and daemon.next_deadline() > 100.5


def test_a_probe_that_began_before_the_spawn_names_the_daemon_that_answered_it(settings, monkeypatch):
    """The probe thread may start a probe just before the loop spawns the daemon, and the daemon
    can answer that very probe: the pid it reports is the answering daemon's, read after the
    answer, never the "no daemon" seen before the spawn (/gpu/info said control_pid null)."""
    from types import SimpleNamespace

    from gpu_orchestrator.supervisor import mps

    daemon = MpsDaemon(settings)

    def answer_after_a_spawn(settings, command, timeout=None):
        daemon.proc = SimpleNamespace(pid=4242)  # the loop's spawn, while the query waits
        return "" if command == "get_server_list" else "100"

    monkeypatch.setattr(mps, "query", answer_after_a_spawn)
    assert daemon.record_probe() is False
    assert daemon.report()["control_pid"] == 4242 and daemon.report()["control_process"]


@pytest.mark.parametrize("binary", ["gone", "not a program"])
def test_a_daemon_that_cannot_be_started_is_a_failed_start_retried_with_backoff(settings, monkeypatch, tmp_path,
                                                                                 binary):
    """Its binary removed (a driver upgrade) or broken before a restart: Popen was handed None (or
    raised), the exception left the loop and the supervisor exited; the probe thread ended silently."""
    import time

    from gpu_orchestrator.supervisor.mps_control import BINARY

    monkeypatch.setenv("PATH", f"{FAKES}:{os.environ['PATH']}")
    daemon = MpsDaemon(settings)  # found at start-up
    folder = tmp_path / "bin"
    folder.mkdir()
    if binary == "not a program":  # on PATH and executable, but exec fails (ENOEXEC)
        (folder / BINARY).write_bytes(b"\x00\x01 not a program")
        (folder / BINARY).chmod(0o755)
    monkeypatch.setenv("PATH", str(folder))
    base = time.monotonic() - 10  # before any probe this test's thread makes
    daemon.to(states.MPS_CHECKING, base)
    try:
        assert daemon.record_probe() is True  # a failure recorded, not an exception ending the thread
        assert daemon.probe.failures == 1 and not daemon.probe.answering
        assert daemon.supervise(base) is False
        assert daemon.state == states.MPS_BACKOFF and daemon.proc is None and daemon.next_deadline() == base + 0.5
        error = daemon.report()["error"]
        assert "cannot start the control daemon" in error and f"reinstall the NVIDIA driver's {BINARY}" in error
        # Due: tried again, and (the probe above is newer than this start's check) failed again, later.
        daemon.supervise(base + 0.5)
        assert daemon.restarts == 1 and daemon.state == states.MPS_BACKOFF
        assert daemon.next_deadline() == base + 0.5 + 1.0
    finally:
        daemon.stop(1)


def test_a_probe_that_raises_anything_is_a_failed_probe_not_the_end_of_the_probe_thread(settings, monkeypatch):
    # Only MpsError was caught: anything else ended the thread silently, and the MPS state froze.
    from gpu_orchestrator.supervisor import mps

    def broken(settings, command, timeout=None):
        raise ValueError("an answer nobody expected")

    monkeypatch.setattr(mps, "query", broken)
    daemon = MpsDaemon(settings)
    assert daemon.record_probe() is True
    assert daemon.report()["error"] == "the probe failed: ValueError: an answer nobody expected"
