"""A real `gpu-orchestrator serve` on a free loopback port, driven over HTTP: for bench and gpu-check."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


class Orchestrator:
    """A real `gpu-orchestrator serve` on a free port, quiet unless given a log, stopped with SIGTERM."""

    def __init__(self, store: Path, model_map: Path, *args: str, env: dict | None = None, log: Path | None = None):
        """`env` is added to ours; `log` gets its output (INFO and up), else it runs quiet."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STRICT_MODEL_STORE": "1", "LOG_LEVEL": "INFO" if log else "WARNING", **(env or {})}
        self.started = time.monotonic()
        output = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port",
                                      str(self.port), "--model-store", str(store), "--model-map", str(model_map), *args],
                                     env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        if log:
            output.close()  # the child holds its own copy
        wait(lambda: get_json(self.url + "/health"), 60, "the orchestrator to listen")
        self.listening_after = time.monotonic() - self.started

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
