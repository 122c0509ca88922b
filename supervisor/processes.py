"""Loader processes as the OS sees them: how they are started, signalled and reaped (Spawner), and
what the loop waits on (Streams): its wake pipe and every live loader's stderr."""

import os
import select
import subprocess
from concurrent.futures import ThreadPoolExecutor

SPAWN_THREADS = 16  # loader execs in flight at once at start (see Spawner.popen_all)


class Spawner:
    """How loader processes are started, signalled and reaped: the real one here, a fake in tests."""

    def popen(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        """exec a fresh interpreter in its own process group. Never a fork of ours (CUDA, NVML and
        our threads are not fork-safe), nor of a clean fork server that imported the loader once:
        a forked loader's /proc/PID/environ would show the server's environment, not its
        client's MPS limits that mps-diag and an operator check there."""
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, process_group=0, close_fds=True)

    def signal(self, proc: subprocess.Popen, signum: int) -> None:
        """Signal the loader's whole process group (it may have started helpers)."""
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    def reap(self, proc: subprocess.Popen, block: bool = False) -> int | None:
        """The wait status once the process has exited, else None (without `block`). waitpid per
        known pid, never -1: that would also reap children other threads started with subprocess."""
        pid, status = os.waitpid(proc.pid, 0 if block else os.WNOHANG)
        return status if pid else None

    def try_popen(self, command: list[str], env: dict[str, str], clock) -> tuple[subprocess.Popen | OSError, float]:
        """popen, or the OSError fork or exec failed with (the interpreter removed by an upgrade, a
        pids limit, no memory): one client's failed start, never an exception that stops the loop.
        With `clock()` read once it returned: a run is dated from its own start, never from before a
        batch of starts (200 execs take seconds on 2 cores: that is not the loader's silence)."""
        try:
            proc = self.popen(command, env)
        except OSError as exc:
            proc = exc
        return proc, clock()

    def popen_all(self, requests: list[tuple[list[str], dict[str, str]]],
                  clock) -> list[tuple[subprocess.Popen | OSError, float]]:
        """try_popen each (command, env) with their execs overlapping: a popen returns once its child
        has exec'd, on a busy machine after a wait to be scheduled, which one after the other would
        add up per loader. The threads only wait here; the loop alone uses what they return."""
        if len(requests) < 2:
            return [self.try_popen(*request, clock) for request in requests]
        with ThreadPoolExecutor(min(SPAWN_THREADS, len(requests)), thread_name_prefix="spawn") as pool:
            return list(pool.map(lambda request: self.try_popen(*request, clock), requests))


PROCESSES = Spawner()


class Streams:
    """What the loop waits on: its wake pipe and every live loader's stderr in one epoll set (no fd
    limit as with select, nothing rebuilt per wait); a wait says which loaders' stderr has news."""

    def __init__(self):
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # signals and HTTP threads wake us
        self.poller = select.epoll()
        self.poller.register(self.wake_r, select.EPOLLIN)
        self.watched: dict = {}  # stderr fd -> its loader (a clients.LoaderProcess)

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"w")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def drain(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def watch(self, loader) -> None:
        fd = loader.proc.stderr.fileno()
        self.watched[fd] = loader
        self.poller.register(fd, select.EPOLLIN)

    def unwatch(self, loader) -> None:
        """Before its stderr is closed; or at its end, else every wait would return at once."""
        try:
            fd = loader.proc.stderr.fileno()
        except ValueError:
            return  # closed already: epoll forgot it
        if self.watched.get(fd) is loader:
            del self.watched[fd]
            self.poller.unregister(fd)

    def wait(self, timeout: float) -> list:
        events = self.poller.poll(timeout)  # a signal does not interrupt it: Python retries (PEP 475)
        return [loader for fd, _ in events if (loader := self.watched.get(fd)) is not None]

    def close(self) -> None:
        self.poller.close()
