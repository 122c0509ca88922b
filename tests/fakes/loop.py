"""Test doubles for driving the supervision loop in-process: a clock the test moves, and a
spawner whose "processes" are records with real pipes (so select, stdin commands and stderr
reads work as with a child) that exit when the test says or when signalled. Never used at run time."""

import os
import signal

import msgspec

from gpu_orchestrator.loaders.channel import SlotWriter
from gpu_orchestrator.loaders.wire import IDLE, READY, WARMING_UP, LoaderState, ModelProgress
from gpu_orchestrator.supervisor.processes import Spawner
from gpu_orchestrator.supervisor.telemetry import CLIENT_VARIABLE

FIRST_PID = 10_000_000  # above any pid_max: psutil finds no such process, nothing real is signalled


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProc:
    """What LoaderProcess uses of a subprocess.Popen: pid, stdin, stderr, returncode."""

    def __init__(self, pid: int, command: list[str], env: dict[str, str]):
        self.pid, self.command, self.env = pid, command, env
        self.client = env[CLIENT_VARIABLE]
        read_in, write_in = os.pipe()
        self.stdin, self._commands = open(write_in, "wb", buffering=0), open(read_in, "rb", buffering=0)
        os.set_blocking(read_in, False)
        read_err, self._stderr_w = os.pipe()
        self.stderr = open(read_err, "rb", buffering=0)
        self.returncode = None
        self.wait_status: int | None = None  # set when it "exits"; reaped once
        self.reaped = False
        self.signals: list[int] = []
        self._pending = b""

    @property
    def alive(self) -> bool:
        return self.wait_status is None

    def exit(self, code: int = 1, stderr_held: bool = False) -> None:
        """`stderr_held`: a child it left behind keeps its stderr open, so only SIGCHLD (or the
        loop's periodic sweep) can tell the loop it exited."""
        self._end(code << 8, stderr_held)

    def die(self, signum: int = signal.SIGKILL) -> None:
        self._end(signum)

    def _end(self, wait_status: int, stderr_held: bool = False) -> None:
        if self.alive:
            self.wait_status = wait_status
            if not stderr_held:
                os.close(self._stderr_w)  # the loop reads EOF, as from a dead child

    def commands(self) -> list[dict]:
        """The command lines the supervisor has written to this loader's stdin since the last call."""
        try:
            self._pending += self._commands.read() or b""
        except (ValueError, OSError):
            pass
        *lines, self._pending = self._pending.split(b"\n")
        return [msgspec.json.decode(line) for line in lines if line]


class FakeSpawner(Spawner):
    """Every run it was asked to start, in order; SIGTERM and SIGKILL end a run unless `ignore_term`.
    A start of a client in `cannot_start` fails with its error, as fork or exec would (try_popen is the real one).
    With a `clock`, each start takes `spawn_seconds` of it (a busy host's exec); `before_spawn()`, when
    set, is called as each batch of starts begins (what HTTP serves then, say)."""

    def __init__(self, clock: FakeClock | None = None, spawn_seconds: float = 0.0):
        self.procs: list[FakeProc] = []
        self.ignore_term = False
        self.cannot_start: dict[str, OSError] = {}
        self.refused: list[str] = []  # the client of each start that failed with cannot_start
        self.clock, self.spawn_seconds = clock, spawn_seconds
        self.before_spawn = None

    def popen(self, command: list[str], env: dict[str, str]) -> FakeProc:
        if self.clock is not None:
            self.clock.advance(self.spawn_seconds)
        if (error := self.cannot_start.get(env[CLIENT_VARIABLE])) is not None:
            self.refused.append(env[CLIENT_VARIABLE])
            raise error
        proc = FakeProc(FIRST_PID + len(self.procs), command, env)
        self.procs.append(proc)
        return proc

    def popen_all(self, requests: list[tuple[list[str], dict[str, str]]],
                  clock) -> list[tuple[FakeProc | OSError, float]]:
        if self.before_spawn is not None and requests:
            self.before_spawn()
        return [self.try_popen(command, env, clock) for command, env in requests]  # in order, no threads

    def signal(self, proc: FakeProc, signum: int) -> None:
        proc.signals.append(signum)
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and not self.ignore_term):
            proc.die(signum)

    def reap(self, proc: FakeProc, block: bool = False) -> int | None:
        if proc.wait_status is None or proc.reaped:
            return None
        proc.reaped = True
        return proc.wait_status

    def runs(self, client: str) -> list[FakeProc]:
        return [p for p in self.procs if p.client == client]

    def latest(self, client: str) -> FakeProc:
        return self.runs(client)[-1]

    def close(self) -> None:
        for proc in self.procs:
            proc._end(signal.SIGKILL)
            for stream in (proc.stdin, proc.stderr, proc._commands):
                stream.close()


def publish(segment, slot: int, proc: FakeProc, generation: int, heartbeat: float, **models: str) -> None:
    """Write what a loader would to its slot: `models` maps a model to its status; the phase is
    idle once every model is ready (or failed), else loading."""
    progress = [ModelProgress(model, status=status) for model, status in models.items()]
    phase = IDLE if all(m.status in (READY, "failed") for m in progress) else WARMING_UP
    SlotWriter(segment, slot).publish(LoaderState(proc.client, proc.pid, generation, phase, heartbeat, progress))
