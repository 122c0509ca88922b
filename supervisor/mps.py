"""The NVIDIA MPS control daemon: start or adopt it, probe it, restart it, quit it.

We talk to it the way operators do: run `nvidia-cuda-mps-control` (whatever is
first on PATH) with the pipe and log folders in its environment and write one
command to its stdin, always with a timeout. The probe runs in its own thread so
a hung daemon never stalls the supervision loop; the loop alone starts, kills
and restarts the daemon.
"""

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.logs import kv
from gpu_orchestrator.supervisor.clients import backoff_delay
from gpu_orchestrator.loaders.files import read_pid
from gpu_orchestrator.supervisor.mps_control import (
    BINARY,
    MpsError,
    MpsSettings,
    ensure_folders,
    mps_env,
    query,
)

log = logging.getLogger("mps")
PID_FILE = "nvidia-cuda-mps-control.pid"
CONTROL_PIPE = "control"


def process_alive(pid: int) -> bool:
    """Running, not merely a zombie nobody has reaped yet. A process whose main thread has exited
    while another still runs (a killed loader's heartbeat thread finishing its exit) shows as a
    zombie but is not dead yet: its parent cannot reap it until the last thread is gone."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return True
    except psutil.NoSuchProcess:
        return False
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


@dataclass
class Probe:
    """The last thing the probe learned; what /gpu/info serves."""

    answering: bool = False
    servers: list[int] = field(default_factory=list)
    default_active_thread_percentage: str | None = None
    error: str | None = None
    probed_at: float | None = None  # wall clock
    failures: int = 0
    control_pid: int | None = None
    started: float | None = None  # monotonic: when this probe began asking


START_POLL_S = 0.1  # how often the probe asks while a daemon is coming up


class MpsDaemon:
    """Lifecycle of one control daemon, a checked machine (loaders/states.py's MPS):
    OFF -> CHECKING (adopt one that answers) -> SPAWNED (ours) -> UP, and BACKOFF between tries.

    The loop drives it (`begin_start`, then each tick `supervise`) and never waits on it: only
    the probe thread talks to the daemon, and the loop acts on what that thread last recorded.
    A daemon that takes 15 s to come up therefore never stalls loader supervision, signals or
    the watchdog.
    """

    def __init__(self, settings: MpsSettings, wake=lambda: None):
        self.settings = settings
        self.wake = wake
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.our_pipe: tuple[int, int] | None = None  # (st_dev, st_ino) of the control pipe our daemon made
        self.available = shutil.which(BINARY) is not None
        self.probe = Probe(error=None if self.available else f"{BINARY} not found on PATH")
        self.state = states.MPS_OFF
        self.since = 0.0  # monotonic: when the current state began; only a probe begun after it counts
        self.failure: str | None = None  # why the last start or daemon failed; the probe's errors do not replace it
        self.restarts = 0
        self.restart_at: float | None = None
        self.deaths: list[float] = []
        self.stopping = threading.Event()
        self.poke = threading.Event()  # probe now, not at the next interval
        self.probed = threading.Event()  # a probe finished
        self.thread: threading.Thread | None = None

    def to(self, new: str, now: float) -> None:
        with self.lock:
            self.state = states.check_transition(self.state, new, "MPS daemon")
            self.since = now

    @property
    def starting(self) -> bool:
        return self.state in states.MPS_STARTING

    @property
    def settled(self) -> bool:
        """Started once and known up or down: loaders may start, each under it or known without it."""
        return self.state not in (states.MPS_OFF, *states.MPS_STARTING)

    # ---- loop side ----------------------------------------------------------

    def start(self, give_up=lambda: False) -> bool:
        """For gpu-check, which has no loop: the loop's own steps, waited on until the daemon answers,
        the start failed or `give_up()`. The supervisor never calls this."""
        self.begin_start(time.monotonic())
        while self.starting and not give_up():
            self.probed.wait(START_POLL_S)
            self.probed.clear()
            self.supervise(time.monotonic())
        return self.healthy

    def begin_start(self, now: float) -> None:
        """Ask whether a daemon already answers (adopt it) before spawning ours."""
        if not self.available:
            log.error(kv(f"ENABLE_MPS=true but {BINARY} is not on PATH: loaders run WITHOUT MPS limits; "
                         "install the NVIDIA compute utilities or fix PATH"))
            self.to(states.MPS_MISSING, now)
            return
        try:
            ensure_folders(self.settings)
        except MpsError as exc:
            # Retried with the daemon's backoff: an operator may provision the folder meanwhile.
            self.fail(str(exc), now)
            return
        self.to(states.MPS_CHECKING, now)
        if self.thread is None:
            self.thread = threading.Thread(target=self.probe_forever, name="mps-probe", daemon=True)
            self.thread.start()
        self.poke.set()

    def supervise(self, now: float) -> bool:
        """One tick: reap, judge health, restart when due, move a start on. True when a daemon has
        just come up: loaders started before it must follow it (their MPS clients need it)."""
        self.reap(now)
        self.check_health(now)
        self.restart_if_due(now)
        return self.advance_start(now)

    def advance_start(self, now: float) -> bool:
        """Move a start on from the probe's verdict; True once a daemon answers."""
        if not self.starting:
            return False
        with self.lock:
            probe = self.probe
        fresh = probe.started is not None and probe.started >= self.since
        if fresh and probe.answering:
            self.answered(probe, now)
            return True
        if fresh and self.state == states.MPS_CHECKING:
            self.spawn(now)
        elif self.state == states.MPS_SPAWNED and now - self.since > self.settings.start_timeout:
            self.kill()
            self.fail(f"the control daemon did not answer within {self.settings.start_timeout:g} s", now)
        return False

    def answered(self, probe: Probe, now: float) -> None:
        if self.state == states.MPS_CHECKING:
            log.info(kv("adopted a running MPS control daemon", pipe_dir=self.settings.pipe_dir,
                        pid=probe.control_pid))
        else:
            log.info(kv("MPS control daemon answering", pid=probe.control_pid, after_s=round(now - self.since, 2)))
        with self.lock:
            self.failure = None
        if self.proc is not None:
            self.our_pipe = self.pipe_made_by(self.proc.pid)
        self.to(states.MPS_UP, now)

    def pipe_made_by(self, pid: int) -> tuple[int, int] | None:
        """The control pipe's identity when the pid file says daemon `pid` made it, else None: only
        that pipe is ever removed (never one of another daemon serving the same folder)."""
        try:
            if read_pid(Path(self.settings.pipe_dir, PID_FILE)) != pid:
                return None
            found = os.stat(Path(self.settings.pipe_dir, CONTROL_PIPE))
        except (OSError, ValueError):
            return None
        return found.st_dev, found.st_ino

    def next_deadline(self) -> float | None:
        """When the loop must look again even if the probe stays silent: a restart due, a hung start."""
        return self.since + self.settings.start_timeout if self.state == states.MPS_SPAWNED else self.restart_at

    def spawn(self, now: float) -> None:
        """Start our daemon (SPAWNED). A binary gone (a driver upgrade under way) or not executable is
        a failed start, retried with backoff, never an exception out of the loop (it would end us)."""
        try:
            self.proc = subprocess.Popen([shutil.which(BINARY) or BINARY, "-f"], stdin=subprocess.DEVNULL,
                                         env={**os.environ, **mps_env(self.settings)}, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, process_group=0)
        except OSError as exc:
            self.fail(f"cannot start the control daemon ({exc}); reinstall the NVIDIA driver's {BINARY} "
                      "(its compute utilities) or fix PATH", now)
            return
        log.info(kv("started the MPS control daemon", pid=self.proc.pid, pipe_dir=self.settings.pipe_dir))
        self.to(states.MPS_SPAWNED, now)
        self.poke.set()

    def fail(self, reason: str, now: float) -> None:
        """The daemon or its start failed: say why and schedule a restart with backoff."""
        with self.lock:
            self.probe.answering = False
            self.failure = reason
        log.error(kv("MPS control daemon failed", reason=reason))
        self.to(states.MPS_BACKOFF, now)
        self.deaths = [t for t in self.deaths if now - t < 60] + [now]
        delay = backoff_delay(len(self.deaths))
        self.restart_at = now + delay
        log.warning(kv("MPS control daemon restart scheduled", in_s=delay))

    def reap(self, now: float) -> bool:
        """True when our daemon has died (it is then scheduled for a restart)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        code, pid = self.proc.returncode, self.proc.pid
        self.proc = None
        if self.stopping.is_set():
            return False
        what = "while starting" if self.starting else ""
        self.remove_pipe_files(pid)
        self.fail(f"the control daemon exited with {code} {what}".strip(), now)
        return True

    def check_health(self, now: float) -> None:
        """Act on the probe thread's verdict: kill a managed daemon that stopped answering."""
        with self.lock:
            failing = self.probe.failures >= self.settings.failures_to_restart
            error = self.probe.error
        if not failing or self.state != states.MPS_UP:
            return
        if self.proc is not None:
            log.error(kv("MPS control daemon stopped answering; killing it", pid=self.proc.pid))
            self.kill()
            self.fail(f"the control daemon stopped answering: {error}", now)
        elif self.control_pid() is None:
            self.fail(f"the adopted control daemon is gone: {error}", now)  # run our own

    def restart_if_due(self, now: float) -> None:
        if self.restart_at is None or now < self.restart_at:
            return
        self.restart_at = None
        self.restarts += 1
        with self.lock:
            self.probe.failures = 0
        self.begin_start(now)

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.remove_pipe_files(self.proc.pid)
        self.proc = None

    def stop(self, grace: float = 5.0) -> None:
        """quit through the control pipe, wait, then TERM and KILL; an adopted daemon is left alone."""
        self.stopping.set()
        self.poke.set()
        if self.state != states.MPS_OFF:
            self.to(states.MPS_OFF, time.monotonic())
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            query(self.settings, "quit")
            self.proc.wait(grace)
        except (MpsError, subprocess.TimeoutExpired):
            log.warning(kv("MPS control daemon ignored quit; terminating it", pid=pid))
            try:
                os.killpg(pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            self.kill()
        self.proc = None
        self.remove_pipe_files(pid)
        log.info(kv("MPS control daemon stopped"))

    def remove_pipe_files(self, pid: int) -> None:
        """Leave no pipe of ours a client would try to reach: a killed daemon cannot clean up, and
        the real one's `quit` leaves its control pipe. Only the pipe our daemon made once it
        answered (same inode) or that its pid file still names, and that pid file: a daemon of ours
        that exited because another already served the folder removes nothing."""
        ours, self.our_pipe = self.our_pipe or self.pipe_made_by(pid), None
        if ours is None:
            return
        folder = Path(self.settings.pipe_dir)
        try:
            found = os.stat(folder / CONTROL_PIPE)
            if (found.st_dev, found.st_ino) == ours:
                os.unlink(folder / CONTROL_PIPE)
        except OSError:
            pass  # gone already, or not ours to remove
        try:
            if read_pid(folder / PID_FILE) == pid:
                os.unlink(folder / PID_FILE)
        except (OSError, ValueError):
            pass

    # ---- probe thread ---------------------------------------------------------

    def probe_forever(self) -> None:
        wait = 0.0  # begin_start pokes us anyway
        while not self.stopping.is_set():
            self.poke.wait(wait)
            self.poke.clear()
            if self.stopping.is_set():
                return
            failed = self.record_probe()
            if failed or self.starting:
                self.wake()
            self.probed.set()
            # Quick while a start waits for an answer; once it answered, the loop will see it.
            wait = START_POLL_S if self.starting and failed else self.settings.probe_interval

    def record_probe(self) -> bool:
        """Ask the daemon (and read its pid file) here, so that report() reads only memory.
        True when it did not answer. Its pid is read after it answered: a probe begun just before
        the loop spawned a daemon can be answered by that daemon, and must name it."""
        started = time.monotonic()
        try:
            servers = [int(p) for p in query(self.settings, "get_server_list").split() if p.isdigit()]
            percentage = query(self.settings, "get_default_active_thread_percentage")
            failure = None
        except Exception as exc:  # an MpsError; anything else too, or this thread would end, the state frozen
            failure = str(exc) if isinstance(exc, MpsError) else f"the probe failed: {type(exc).__name__}: {exc}"
        control_pid = self.control_pid()
        with self.lock:
            if failure is None:
                self.probe = Probe(True, servers, percentage, None, time.time(), 0, control_pid, started)
                return False
            self.probe.answering, self.probe.error = False, failure
            self.probe.failures += 1
            self.probe.probed_at, self.probe.control_pid, self.probe.started = time.time(), control_pid, started
        return True

    # ---- what /gpu/info serves ---------------------------------------------------

    def control_pid(self) -> int | None:
        proc = self.proc
        if proc is not None:
            return proc.pid
        try:
            pid = read_pid(Path(self.settings.pipe_dir, PID_FILE))
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    @property
    def managed(self) -> bool:
        """We started the daemon that runs now (and will quit it); False for one we adopted."""
        return self.proc is not None

    @property
    def healthy(self) -> bool:
        """MPS is in force for loaders started now: a daemon answers, and no start or restart is pending.
        (An answer while a restart waits its turn is adopted when the restart comes due.)"""
        with self.lock:
            return self.in_force()

    def settings_in_force(self) -> MpsSettings | None:
        """The settings loaders started now run under (with MPS limits), else None."""
        return self.settings if self.healthy else None

    def in_force(self) -> bool:
        return self.state == states.MPS_UP and self.probe.answering

    def report(self) -> dict:
        with self.lock:
            probe = self.probe
            return {
                "enabled": self.in_force(),
                "pipe_dir": self.settings.pipe_dir,
                "log_dir": self.settings.log_dir,
                "control_process": probe.answering,
                "control_pid": probe.control_pid,
                "managed": self.managed,
                "servers": list(probe.servers),
                "default_active_thread_percentage": probe.default_active_thread_percentage,
                "restarts": self.restarts,
                "probed_at": probe.probed_at,
                "error": None if self.in_force() else self.failure or probe.error,
            }
