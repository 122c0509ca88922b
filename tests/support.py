"""Helpers shared by the tests: model stores, free ports, a real orchestrator process."""

import json
import os
import signal
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from gpu_orchestrator.loaders import channel
from gpu_orchestrator.supervisor.commands.demo import write_snapshot
from gpu_orchestrator.supervisor.commands.harness import free_port, request, serve_command, wait

SMALL = (32, 1, 256)  # hidden, layers, vocabulary: a ~100 KB model
SOAK = os.environ.get("GPU_ORCHESTRATOR_SOAK") == "1"  # the fault suite's long variants


def add_model(store: Path, model_id: str, shape=SMALL, seed: int = 0, manifest: bool = False) -> Path:
    path = store / model_id
    write_snapshot(path, shape, seed, manifest)
    return path


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file as written by hand: the header's length, the header (a dict is
    JSON-encoded, bytes are taken as they are: broken headers too) and `data`."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def write_sparse_model(directory: Path, size: int, fill: bytes = b"") -> None:
    """A model of one U8 tensor of `size` bytes, sparse past `fill` (no disk used), with its
    config.json; written beside and renamed, so a loader never sees it half-written."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    temporary = directory / ".model.tmp"
    with open(temporary, "wb") as handle:
        handle.write(safetensors_bytes({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}, fill))
        handle.truncate(handle.tell() - len(fill) + size)
    os.replace(temporary, directory / "model.safetensors")


def write_config(tmp: Path, clients: dict, allocations: dict | None = None) -> tuple[Path, Path | None]:
    model_map = tmp / "AGENT_MODEL_MAP.json"
    model_map.write_text(json.dumps(clients))
    if allocations is None:
        return model_map, None
    allocation = tmp / "mps_allocation_config.json"
    allocation.write_text(json.dumps({"mps_resource_allocation": {"agent_allocations": allocations}}))
    return model_map, allocation


def unit_sections(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit (or drop-in) as {section: {key: [values, in order]}}; comments and blank lines skipped."""
    found: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = found.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return found


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after a generous deadline."""
    try:
        return wait(predicate, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def status_code(url: str) -> int:
    """Only the status of a GET, whatever the body (for /metrics, which is not JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def write_figures(fault: str, **figures) -> None:
    """A fault test's figures: to stdout (pytest -s) and, with $FAULT_FIGURES, a JSON-lines file."""
    line = json.dumps({"fault": fault, **figures})
    print(f"\nFIGURES {line}")
    if os.environ.get("FAULT_FIGURES"):
        with open(os.environ["FAULT_FIGURES"], "a") as out:
            out.write(line + "\n")


def children_of(pid: int) -> list[int]:
    import psutil
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class Orchestrator:
    """`gpu-orchestrator serve` as a real process on a free loopback port."""

    def __init__(self, tmp: Path, store: Path, model_map: Path, allocation: Path | None = None,
                 extra_args: tuple = (), env: dict | None = None, prefix: tuple = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"orchestrator-{self.port}.log"
        argv = [*prefix, *serve_command(self.port, store, model_map, *extra_args)]
        if allocation is not None:
            argv += ["--allocation", str(allocation)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORCHESTRATOR_", "MPS_", "ENABLE_"))}
        full_env.update({"STRICT_MODEL_STORE": "1", "LOG_LEVEL": "INFO"}, **(env or {}))
        self.argv, self.env = argv, full_env
        self.proc = None

    def start(self) -> "Orchestrator":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self.listening, what=f"orchestrator to listen on {self.port} (log: {self.log_path})")
        (self.segment,) = channel.segments_of(self.proc.pid)
        return self

    def listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"orchestrator exited with {self.proc.returncode}:\n{self.output()}")
        try:
            return request(self.url + "/health")[0] == 200
        except OSError:
            return False

    def get(self, path: str):
        return request(self.url + path)

    def post(self, path: str, payload, headers: dict | None = None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return request(self.url + path, "POST", body, {"Content-Type": "application/json", **(headers or {})})

    def status(self) -> dict:
        return self.get("/models/status")[1]

    def wait_settled(self, timeout: float = 60.0) -> dict:
        def settled():
            current = self.status()
            return current if current["generation"] and not current["in_progress"] else None
        return wait_for(settled, timeout, what="warm-up to settle")

    def loader_pid(self, client: str) -> int:
        return self.status()["clients"][client]["pid"]

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def kill_everything(self) -> None:
        """Last resort in teardown: nothing a test started may outlive it."""
        if self.proc is None:
            return
        for pid in children_of(self.proc.pid) + [self.proc.pid]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(10)
        for name in channel.segments_of(self.proc.pid):
            try:
                os.unlink(channel.segment_path(name))
            except FileNotFoundError:
                pass
        if not self.log.closed:
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill_everything()
