"""A real `gpu-orchestrator serve` on a free loopback port, driven over HTTP.

The one copy of this harness: bench and gpu-check use it as it is, and the test suite's
Orchestrator (tests/support.py) builds on the same pieces.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) for any answer, error statuses included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get_json(url: str) -> dict:
    """The body of a GET that must succeed (an error status raises urllib's HTTPError)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait(predicate, timeout: float, what: str, interval: float = 0.005):
    """Poll until `predicate` returns something truthy (an OSError counts as not yet); TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


def serve_command(port: int, store: Path, model_map: Path, *args: str) -> list[str]:
    """The command line of `gpu-orchestrator serve` on 127.0.0.1:`port`, from this interpreter."""
    return [sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port", str(port),
            "--model-store", str(store), "--model-map", str(model_map), *args]


class Orchestrator:
    """A real `gpu-orchestrator serve` on a free port, quiet unless given a log, stopped with SIGTERM."""

    def __init__(self, store: Path, model_map: Path, *args: str, env: dict | None = None, log: Path | None = None):
        """`env` is added to ours; `log` gets its output (INFO and up), else it runs quiet."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STRICT_MODEL_STORE": "1", "LOG_LEVEL": "INFO" if log else "WARNING", **(env or {})}
        self.started = time.monotonic()
        output = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(serve_command(self.port, store, model_map, *args), env=env, stdout=output,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if log:
            output.close()  # the child holds its own copy
        wait(self.listening, 60, "the orchestrator to listen")
        self.listening_after = time.monotonic() - self.started

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the orchestrator exited with status {self.proc.returncode} before listening")
        return request(self.url + "/health")[0] == 200

    def status(self) -> dict:
        return get_json(self.url + "/models/status")

    def settled(self, timeout: float = 600) -> dict:
        return wait(lambda: (s := self.status())["generation"] and not s["in_progress"] and s, timeout, "warm-up")

    def stop(self) -> int:
        """SIGTERM and its exit status; the whole process group is killed if it does not stop in 30 s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise
