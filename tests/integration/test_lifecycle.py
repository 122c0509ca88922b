"""Loader deaths, a loader that cannot boot, and supervisor stops, with real signals."""

import os
import signal
import sys
import time

from support import Orchestrator, children_of, wait_for, write_config

from gpu_orchestrator.loaders import channel
from gpu_orchestrator.supervisor.mps import process_alive


def test_killed_loader_is_restarted_and_ready_again(orchestrator):
    orchestrator.wait_settled()
    old_pid = orchestrator.loader_pid("alpha")
    os.kill(old_pid, signal.SIGKILL)

    def alpha_back():
        status = orchestrator.status()
        alpha = status["clients"]["alpha"]
        if alpha["pid"] == old_pid:
            return None
        return status if alpha["ready"] and alpha["restarts"] == 1 else None

    status = wait_for(alpha_back, what="alpha restarted and ready")
    alpha = status["clients"]["alpha"]
    assert alpha["last_exit"] == "killed by SIGKILL"
    assert all(m["status"] == "ready" for m in alpha["models"])
    assert "loader exited" in orchestrator.output() and "SIGKILL" in orchestrator.output()


def test_loader_that_cannot_boot_ends_fatal_with_its_reason_and_refresh_revives_it(orchestrator, store):
    orchestrator.wait_settled()
    hidden = store.with_name("store-away")
    store.rename(hidden)
    os.kill(orchestrator.loader_pid("gamma"), signal.SIGKILL)

    def gamma_fatal():
        status = orchestrator.status()
        return status if status["clients"]["gamma"]["state"] == "FATAL" else None

    status = wait_for(gamma_fatal, what="gamma FATAL")
    errors = [e for e in status["errors"] if e["agent"] == "gamma"]
    assert [e["model"] for e in errors] == ["org/g1"]
    assert "FATAL" in errors[0]["error"] and "cannot boot" in errors[0]["error"]
    assert "is not a directory" in errors[0]["error"]
    assert status["clients"]["gamma"]["pid"] is None

    hidden.rename(store)
    assert orchestrator.post("/models/preload", {"refresh": True})[0] == 202
    wait_for(lambda: orchestrator.status()["clients"]["gamma"]["ready"], what="gamma revived")


def test_sigterm_stops_everything_and_leaves_nothing(orchestrator):
    orchestrator.wait_settled()
    loaders = children_of(orchestrator.proc.pid)
    assert len(loaders) == 3
    segment = channel.segment_path(orchestrator.segment)
    assert os.path.exists(segment)
    started = time.monotonic()
    assert orchestrator.stop(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert not any(process_alive(pid) for pid in loaders)
    assert not os.path.exists(segment)


def test_hung_loader_is_killed_after_its_heartbeat_timeout_and_restarted(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--heartbeat-timeout", "3")) as orch:
        wait_for(lambda: orch.status()["clients"]["alpha"]["state"] == "RUNNING", what="alpha running")
        hung = orch.loader_pid("alpha")
        os.kill(hung, signal.SIGSTOP)
        status = wait_for(lambda: (s := orch.status())["clients"]["alpha"]["ready"]
                          and s["clients"]["alpha"]["pid"] != hung and s, what="alpha replaced")
        assert status["clients"]["alpha"]["restarts"] == 1
        assert status["clients"]["alpha"]["last_exit"].startswith("killed by SIGKILL (heartbeat lost: silent for ")
        assert "loader heartbeat lost; killing it" in orch.output()


def test_port_in_use_exits_69_and_starts_nothing(tmp_path, store):
    import socket
    import subprocess
    import sys
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        before = set(os.listdir(channel.SHM_DIR))
        proc = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port", str(port),
                               "--model-store", str(store), "--model-map", str(model_map)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 69
    assert "cannot listen" in proc.stderr and f"port={port}" in proc.stderr
    assert "another orchestrator may be running; pick another --port" in proc.stderr
    assert "loader started" not in proc.stderr
    # Nothing added (other runs on this host may remove their own segments meanwhile).
    assert set(os.listdir(channel.SHM_DIR)) - before == set()


def test_loader_killed_as_soon_as_it_is_ready_is_never_a_failed_start(tmp_path, store):
    # Six deaths within the window, each right after the loader finished its warm-up
    # (often before startsecs): a loader that did its work booted, so none may count
    # towards FATAL, and each restart comes at the shortest delay.
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map) as orch:
        for kill in range(6):
            alpha = wait_for(lambda: (c := orch.status()["clients"]["alpha"])["ready"] and c, what="alpha ready")
            os.kill(alpha["pid"], signal.SIGKILL)
            wait_for(lambda: orch.status()["clients"]["alpha"]["restarts"] == kill + 1, what="restart")
        final = wait_for(lambda: (c := orch.status()["clients"]["alpha"])["ready"] and c, what="alpha ready")
        assert final["state"] != "FATAL" and final["restarts"] == 6
        assert "restart_in_s=0.5 " in orch.output() and "restart_in_s=1.0 " not in orch.output()


def test_the_shortest_heartbeat_timeout_accepted_never_kills_an_idle_loader(tmp_path, store):
    # At 0.5 s with loaders publishing once a second, idle loaders were killed every second, forever.
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--heartbeat-timeout", "0.5")) as orch:
        assert orch.wait_settled()["all_ready"]
        time.sleep(4)  # idle: only heartbeats
        status = orch.status()
        assert status["all_ready"] and all(c["restarts"] == 0 for c in status["clients"].values())
        assert "heartbeat lost" not in orch.output()


def python_that_can_vanish(tmp_path):
    """An interpreter path to serve from that a test can remove, as an upgrade removes the old one:
    a symlink to the real interpreter in a copy of the virtual environment's layout."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    prefix = os.path.dirname(os.path.dirname(sys.executable))
    for name in ("pyvenv.cfg", "lib"):
        if os.path.exists(os.path.join(prefix, name)):
            (venv / name).symlink_to(os.path.join(prefix, name))
    python = venv / "bin" / "python"
    python.symlink_to(os.path.realpath(sys.executable))
    return python


def test_a_loader_that_cannot_be_started_fails_alone_and_the_supervisor_serves_on(tmp_path, store):
    # Popen's FileNotFoundError once escaped the loop: every healthy loader was stopped and the
    # supervisor exited with a traceback.
    python = python_that_can_vanish(tmp_path)
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"]})
    orch = Orchestrator(tmp_path, store, model_map)
    assert orch.argv[0] == sys.executable
    orch.argv[0] = str(python)  # loaders are started from the supervisor's own interpreter path
    with orch:
        assert orch.wait_settled()["all_ready"]
        beta = orch.loader_pid("beta")
        python.unlink()
        os.kill(orch.loader_pid("alpha"), signal.SIGKILL)
        # Its first failed start is enough here: backing off to FATAL is the loop's (test_arbiter_loop).
        alpha = wait_for(lambda: "could not be started" in ((c := orch.status()["clients"]["alpha"])["last_exit"] or "")
                         and c, timeout=60, what="alpha's failed start")
        assert alpha["state"] in ("BACKOFF", "FATAL") and not alpha["ready"]
        assert "could not be started ([Errno 2] No such file or directory" in alpha["last_exit"]
        assert "reinstall or restart gpu-orchestrator" in alpha["last_exit"]
        assert orch.proc.poll() is None and orch.loader_pid("beta") == beta and process_alive(beta)
        assert orch.status()["clients"]["beta"]["ready"]
        assert "loader could not be started" in orch.output() and "Traceback" not in orch.output()


# `serve` with a SIGHUP (and with "term", a SIGTERM too) sent to itself while it starts, before its
# loop runs: as `systemctl reload` (or stop) right after start.
SIGNALLED_WHILE_STARTING = """
import os, signal, sys
from gpu_orchestrator.supervisor import daemon
from gpu_orchestrator.supervisor.commands import cli
open_channel = daemon.open_channel
def signalled(config):
    os.kill(os.getpid(), signal.SIGHUP)
    if sys.argv[-1] == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    return open_channel(config)
daemon.open_channel = signalled
sys.exit(cli.main(sys.argv[1:-1]))
"""


def test_a_sighup_while_starting_is_served_once_the_loop_runs(tmp_path, store):
    # The handler was installed only as the loop began: SIGHUP's default action ended us silently.
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    orch = Orchestrator(tmp_path, store, model_map)
    orch.argv = [sys.executable, "-c", SIGNALLED_WHILE_STARTING, *orch.argv[3:], "hup"]
    with orch:
        assert orch.wait_settled()["all_ready"]
        wait_for(lambda: "reloaded" in orch.output(), what="the held SIGHUP served as a reload")
        assert orch.stop() == 0


def test_a_sigterm_while_starting_stops_cleanly(tmp_path, store):
    import subprocess
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    orch = Orchestrator(tmp_path, store, model_map)
    proc = subprocess.run([sys.executable, "-c", SIGNALLED_WHILE_STARTING, *orch.argv[3:], "term"], env=orch.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stopping signal=SIGTERM" in proc.stderr and "stopped" in proc.stderr
    assert "loader started" not in proc.stderr and "Traceback" not in proc.stderr
    segment = proc.stderr.split("segment=")[1].split()[0]
    assert not os.path.exists(channel.segment_path(segment))
