"""One loader process per client: its runs, how each ended, restart backoff (the OS calls: processes.py)."""

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import psutil

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.logs import kv, relay_line
from gpu_orchestrator.loaders.wire import EXIT_CANNOT_BOOT, LOADING, WARMING_UP, LoaderState
from gpu_orchestrator.supervisor.processes import PROCESSES, Spawner

log = logging.getLogger("supervisor")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# An idle loader publishes every heartbeat interval (a busy one within half an interval more) and the
# supervisor looks six times per timeout: a quarter of the timeout leaves over half of it for a busy
# host to schedule the loader. Under MIN_HEARTBEAT_TIMEOUT that margin nears a loaded host's delays.
HEARTBEATS_PER_TIMEOUT, MAX_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_TIMEOUT = 4, 1.0, 0.5


def backoff_delay(recent_deaths: int, low: float = 0.5, high: float = 30.0) -> float:
    """low, 2 x low, 4 x low, ... up to high, by deaths within the window: for loaders and the MPS daemon."""
    return min(high, low * 2 ** max(0, recent_deaths - 1))


@dataclass(frozen=True)
class Policy:
    """How loaders are supervised (supervisord's startsecs/startretries, with backoff)."""

    startsecs: float = 1.0
    failed_starts_to_fatal: int = 5
    window: float = 60.0
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    heartbeat_timeout: float = 30.0
    stop_grace: float = 5.0

    @property
    def heartbeat_interval(self) -> float:
        """How often a quiet loader publishes: from the timeout, so that none accepted kills a healthy one."""
        return min(MAX_HEARTBEAT_INTERVAL, self.heartbeat_timeout / HEARTBEATS_PER_TIMEOUT)

    def restart_delay(self, recent_deaths: int) -> float:
        """0.5 s, 1 s, 2 s, ... up to 30 s, by deaths within the window since the loader last
        finished a warm-up (a loader that proved healthy starts over at 0.5 s)."""
        return backoff_delay(recent_deaths, self.backoff_min, self.backoff_max)


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def iso_utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def cannot_start(error: OSError) -> str:
    """A run's end when fork or exec failed, with what to do: nothing ran, the next try may work."""
    if error.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
        hint = "the host is out of processes, memory or files: see the unit's TasksMax=, MemoryMax=, LimitNOFILE="
    else:  # ENOENT, EACCES, ENOEXEC: the interpreter or the package changed under us
        hint = "reinstall or restart gpu-orchestrator"
    return f"could not be started ({error}; {hint})"


@dataclass
class LoaderProcess:
    client: str
    slot: int
    argv: list[str]
    env: dict[str, str]
    policy: Policy
    state: str = states.STOPPED
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    stop_deadline: float = 0.0
    restarts: int = 0
    last_exit: str | None = None  # how the last run ended, and why we killed it if we did
    last_exit_at: str | None = None
    fatal_reason: str | None = None
    kill_reason: str | None = None  # set when the supervisor kills this run, e.g. heartbeat lost
    last_heartbeat: float | None = None  # the newest heartbeat this run published
    cpu_seen: float | None = None  # CPU seconds this run had used when last looked at (only while quiet)
    last_busy: float | None = None  # when its CPU time was last seen growing
    sent_generation: int = 0
    stderr_tail: bytes = b""
    last_line: str | None = None
    rss_bytes: int | None = None
    seen_seq: int | None = None  # the slot's sequence number when the loop last looked at it
    finished_generation: int | None = None  # the warm-up this run was seen finish: its slot tells no more
    stderr_eof: bool = False  # this run's stderr reached its end: no more to wait for there
    deaths: deque = field(default_factory=deque)
    failed_starts: deque = field(default_factory=deque)
    next_launch: tuple[list[str], dict[str, str], str] | None = None  # argv, env, why: start again in this slot once stopped
    spawner: Spawner = PROCESSES

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.state in states.ALIVE else None

    def to(self, new_state: str) -> None:
        self.state = states.check_transition(self.state, new_state)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gpu_orchestrator.loaders", *self.argv]

    def spawn(self, clock) -> float:
        """Start a run, dated from when its popen returned (`clock()` then); that time."""
        proc, born = self.spawner.try_popen(self.command(), self.env, clock)
        self.begin(proc, born)
        return born

    def begin(self, proc: subprocess.Popen | OSError, now: float) -> None:  # from spawn, or Spawner.popen_all
        """A run started at `now` (when its popen returned); or it could not be (an OSError): a
        failed start, judged as a run's exit is."""
        self.to(states.STARTING)
        if isinstance(proc, OSError):
            self.last_exit, self.last_exit_at, self.last_line = cannot_start(proc), iso_utc(time.time()), None
            self.failed(now)
        else:
            self.started(proc, now)

    def started(self, proc: subprocess.Popen, now: float) -> None:
        """A new run began: forget everything that described the previous one."""
        self.proc = proc
        os.set_blocking(self.proc.stderr.fileno(), False)
        os.set_blocking(self.proc.stdin.fileno(), False)
        self.started_at = now
        self.sent_generation = 0
        self.stderr_tail = b""
        self.last_line = None  # a reason must quote this run, never an earlier one
        self.kill_reason = None
        self.last_heartbeat = None
        self.cpu_seen = self.last_busy = None
        self.seen_seq, self.finished_generation, self.stderr_eof = None, None, False
        self.rss_bytes = None

    def send(self, line: bytes) -> bool:
        """Write one command line; False if the loader is gone or its pipe is full."""
        try:
            return os.write(self.proc.stdin.fileno(), line) == len(line)
        except (BrokenPipeError, BlockingIOError, ValueError):
            return False

    def kill(self, reason: str) -> None:
        """SIGKILL this run, remembering why so that its exit says so."""
        self.kill_reason = reason
        self.signal(signal.SIGKILL)

    def idle_for(self, heartbeat: float | None, now: float, cpu_seconds) -> float:
        """Seconds this run has shown no sign of life: no heartbeat, and no CPU time used.

        A heartbeat thread cannot publish while the main thread holds the GIL in one long C
        call (parsing a 100 MB safetensors header takes seconds), but such a loader is working,
        not hung: its CPU time grows. CPU time is read (`cpu_seconds()`) only once the heartbeat
        is half the timeout old, so a healthy loader costs no /proc read; a stopped or
        deadlocked one uses none and is judged on its heartbeat alone. A first sample has nothing
        to compare with: when the loop first looks only past the timeout (it was stalled by a long
        spawn, a reload), the run is not judged idle past the timeout on that look, but at the
        next, against this sample. A run whose CPU time cannot be read is judged on its heartbeat."""
        silent = self.silent_for(heartbeat, now)
        if silent <= self.policy.heartbeat_timeout / 2:
            self.cpu_seen = self.last_busy = None
            return silent
        used, first = cpu_seconds(), self.cpu_seen is None
        if used is not None and not first and used > self.cpu_seen:
            self.last_busy = now
        self.cpu_seen = used
        if used is not None and first:
            return min(silent, self.policy.heartbeat_timeout)
        return silent if self.last_busy is None else min(silent, now - self.last_busy)

    def kill_if_silent(self, reader, now: float) -> None:
        """SIGKILL a run whose heartbeat was lost (heartbeat_lost), saying so."""
        if (idle := self.heartbeat_lost(reader, now)) is not None:
            log.error(kv("loader heartbeat lost; killing it", client=self.client, pid=self.pid, silent_s=round(idle, 1)))
            self.kill(f"heartbeat lost: silent for {idle:.1f} s")

    def heartbeat_lost(self, reader, now: float) -> float | None:
        """The seconds a RUNNING run has been silent, when past the timeout; else None."""
        if self.state != states.RUNNING or self.kill_reason is not None:
            return None  # killed already: a large process can take a few ticks to be reaped
        published = self.published(reader)
        idle = self.idle_for(published.heartbeat if published is not None else None, now, self.cpu_seconds)
        return idle if idle > self.policy.heartbeat_timeout else None

    def has_news(self, reader, generation: int) -> bool | None:
        """Whether its slot was written since the loop last looked (one sequence check); False for a
        STARTING run, whose promotion is also by time; None when there is nothing to look at: no new
        words, or this run was seen finish `generation` (its heartbeats are read at their own cadence)."""
        if self.state == states.RUNNING and self.finished_generation == generation:
            return None
        seq = reader.peek(self.slot)
        if seq != self.seen_seq:
            self.seen_seq = seq
            return True
        return False if self.state == states.STARTING else None

    def cpu_seconds(self) -> float | None:
        try:
            times = psutil.Process(self.proc.pid).cpu_times()
        except psutil.Error:
            return None
        return times.user + times.system

    def silent_for(self, heartbeat: float | None, now: float) -> float:
        """Seconds since this run last published. `heartbeat` is what its slot holds now, None when
        nothing from this run could be read: then the newest heartbeat seen before counts, and only
        a run never heard from is measured from its start (after `startsecs`)."""
        if heartbeat is not None and (self.last_heartbeat is None or heartbeat > self.last_heartbeat):
            self.last_heartbeat = heartbeat
        if self.last_heartbeat is not None:
            return now - self.last_heartbeat
        return now - self.started_at - self.policy.startsecs

    def signal(self, signum: int) -> None:
        self.spawner.signal(self.proc, signum)

    def reap(self, block: bool = False) -> int | None:
        return self.spawner.reap(self.proc, block)

    def stop(self, now: float) -> None:
        """TERM this run; it is KILLed if still alive at `stop_deadline`."""
        self.to(states.STOPPING)
        self.signal(signal.SIGTERM)
        self.stop_deadline = now + self.policy.stop_grace

    def stop_or_end(self, now: float) -> None:
        """TERM a live run (kill_if_overdue KILLs it after stop_grace); a dead one is just STOPPED."""
        if self.state in (states.STARTING, states.RUNNING):
            self.stop(now)
        elif self.state in (states.BACKOFF, states.FATAL):
            self.to(states.STOPPED)

    def kill_if_overdue(self, now: float) -> bool:
        """SIGKILL a run that has not stopped within stop_grace of its TERM; whether it did."""
        if self.state != states.STOPPING or now < self.stop_deadline:
            return False
        self.signal(signal.SIGKILL)
        self.stop_deadline = float("inf")
        return True

    def restart_if_due(self, now: float, clock) -> float | None:
        """Start the next run once the backoff delay has passed; when it tried (see spawn), else None."""
        if self.state != states.BACKOFF or now < self.restart_at:
            return None
        born = self.spawn(clock)
        self.restarts += 1
        return born

    def restart_in_place(self, argv: list[str], env: dict[str, str], now: float, reason: str) -> None:
        """Stop this run and start one with `argv` and `env` in the same slot once it has exited
        (start_again_if_stopped): for when no other slot is free to start it beside this one."""
        self.next_launch = (argv, env, reason)
        self.stop_or_end(now)

    def start_again_if_stopped(self, clock) -> tuple[str, float] | None:
        """The run restart_in_place stopped has exited: start its successor. Why it was restarted
        (for the log line) and when it tried (see spawn), else None."""
        if self.state != states.STOPPED or self.next_launch is None:
            return None
        (self.argv, self.env, reason), self.next_launch = self.next_launch, None
        return reason, self.spawn(clock)

    def retry_if_fatal(self, now: float) -> None:
        """An operator asked for another try: a FATAL loader restarts at once, its failures forgotten."""
        if self.state == states.FATAL:
            self.reset()
            self.to(states.BACKOFF)
            self.restart_at = now

    def promote_if_started(self, now: float, finished_warmup: bool) -> bool:
        """RUNNING after `startsecs` up, or sooner once it has finished a warm-up: it clearly booted."""
        if self.state == states.STARTING and (finished_warmup or now - self.started_at >= self.policy.startsecs):
            self.to(states.RUNNING)
            return True
        return False

    def exited(self, status: int, now: float) -> None:
        """Record a reaped exit and choose what comes next: STOPPED, BACKOFF or FATAL."""
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        for stream in (self.proc.stdin, self.proc.stderr):
            stream.close()
        why = f" ({self.kill_reason})" if self.kill_reason else ""
        self.last_exit, self.last_exit_at = f"{describe_exit(status)}{why}", iso_utc(time.time())
        if self.state == states.STOPPING:
            self.to(states.STOPPED)
            return
        self.failed(now, cannot_boot=os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_CANNOT_BOOT)

    def failed(self, now: float, cannot_boot: bool = False) -> None:
        """A run ended unasked, or could not start: FATAL when it cannot boot or failed to start too
        often within the window, else BACKOFF for a delay growing with its recent deaths."""
        self._forget_before(now - self.policy.window)
        self.deaths.append(now)
        if self.state == states.STARTING:
            self.failed_starts.append(now)
        last_run = f"the last run {self.last_exit} at {self.last_exit_at}"
        last_run += f"; its last line: {self.last_line}" if self.last_line else ""
        if cannot_boot:
            self.to(states.FATAL)
            self.fatal_reason = f"cannot boot: {last_run}"
        elif len(self.failed_starts) >= self.policy.failed_starts_to_fatal:
            self.to(states.FATAL)
            self.fatal_reason = (f"failed to start {len(self.failed_starts)} times within "
                                 f"{self.policy.window:.0f} s; {last_run}")
        else:
            self.to(states.BACKOFF)
            self.restart_at = now + self.policy.restart_delay(len(self.deaths))

    def log_end(self, message: str, pid: int | None, now: float) -> None:
        """One line on how its last run ended (or could not start) and what comes next."""
        restart_in = round(max(0.0, self.restart_at - now), 2) if self.state == states.BACKOFF else "-"
        log.log(logging.INFO if self.state == states.STOPPED else logging.ERROR,
                kv(message, client=self.client, pid=pid, how=self.last_exit, next=self.state,
                   restart_in_s=restart_in, reason=self.fatal_reason or "-"))

    def deadline(self) -> float | None:
        """When the loop must look at it again though nothing happens: to restart or to promote it."""
        if self.state == states.BACKOFF:
            return self.restart_at
        return self.started_at + self.policy.startsecs if self.state == states.STARTING else None

    def _forget_before(self, horizon: float) -> None:
        for times in (self.deaths, self.failed_starts):
            while times and times[0] < horizon:
                times.popleft()

    def reset(self) -> None:
        """An operator asked for another try: forget past failures."""
        self.deaths.clear()
        self.failed_starts.clear()
        self.fatal_reason = None

    def published(self, reader) -> LoaderState | None:
        """What this run wrote to its slot (`reader`: a SlotReader of the channel); None if nothing."""
        return reader.read_written_by(self.slot, self.pid)

    def models_loading(self, reader) -> list[str]:
        """The models this live loader says it is loading right now."""
        published = self.published(reader)
        if published is None or published.phase != WARMING_UP:
            return []
        return [m.model for m in published.models if m.status == LOADING]

    def measure_rss(self) -> None:
        """Resident memory of the live loader (read by the loop, served by HTTP): one read of
        /proc/PID/statm, its second field in pages (what psutil reads, without a Process object)."""
        if self.pid is None:
            self.rss_bytes = None
            return
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as statm:
                self.rss_bytes = int(statm.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            self.rss_bytes = None

    def relay_stderr(self, logger) -> bool:
        """Log what it wrote since the last call as the loader's own lines; whether its stderr ended."""
        for line in self.read_stderr():
            relay_line(logger, line)
        return self.stderr_eof

    def read_stderr(self) -> list[str]:
        """Complete lines the loader wrote since the last call (and its last words at EOF)."""
        try:
            data = self.proc.stderr.read()
        except (ValueError, OSError):
            return []
        if data is None:
            return []
        self.stderr_eof = not data
        if data:
            *lines, self.stderr_tail = (self.stderr_tail + data).split(b"\n")
        else:
            lines, self.stderr_tail = [self.stderr_tail], b""
        text = [line.decode(errors="replace") for line in lines if line.strip()]
        if text:
            self.last_line = text[-1]
        return text
