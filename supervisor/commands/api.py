"""The orchestrator's HTTP API as `gate` and `status` call it.

Every request is bounded by the caller's deadline, not by a fixed timeout per call, and every
answer is checked against the shape those commands read, so an odd answer is named (which
field, what was wrong) instead of ending in a traceback.
"""

import http.client
import socket
import threading
import time
import urllib.parse
from typing import Any, Literal

import msgspec

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.wire import ModelStatus

MAX_ANSWER = 64 * 1024 * 1024  # /models/status with 48 clients is 35 KB; anything near this is not ours


class Unreachable(Exception):
    """Nothing answered: refused, no route, or no answer before the deadline."""


class BadAnswer(Exception):
    """Something answered, but not as the orchestrator's API does."""


class UsageError(Exception):
    """A command's argument or environment variable is unusable; the message names it."""


def check_url(url: str, source: str = "--url") -> str:
    """The URL without a trailing '/', or UsageError saying what is wrong with it."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{source}: {url!r} is not a usable URL ({exc})") from None
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"{source}: expected http://HOST:PORT (e.g. http://127.0.0.1:8014), got {url!r}")
    if port == 0 or parts.query or parts.fragment:
        raise UsageError(f"{source}: expected http://HOST:PORT with a port from 1 to 65535, got {url!r}")
    try:
        parts.hostname.encode("idna")  # what connecting would do, failing there with a traceback
    except UnicodeError as exc:
        raise UsageError(f"{source}: {parts.hostname!r} is not a usable host name ({exc})") from None
    return url.rstrip("/")


MAX_SECONDS = 7 * 24 * 3600  # a week; far beyond it, sockets, timers and sleep() overflow the system's clock


def seconds(text: str, source: str) -> float:
    """A positive number of seconds, at most MAX_SECONDS: 'nan' would never end, '-1' never start."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_SECONDS:
        raise UsageError(f"{source}: expected a positive number of seconds up to {MAX_SECONDS}, got {text!r}")
    return value


def describe(exc: Exception) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "it accepted the connection but did not answer in time"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "it closed the connection without answering"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def call(url: str, deadline: float, shape: Any = Any, method: str = "GET", body: bytes | None = None,
         token: str | None = None) -> tuple[int, Any]:
    """(HTTP status, the JSON answer), a 200's answer checked against `shape`; all of it, connecting
    and reading included, done by `deadline` (time.monotonic()) or Unreachable."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Unreachable("no time left to ask")
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=remaining)
    # The socket timeout bounds each wait; the timer bounds all of them together, so a server
    # that trickles its answer a byte at a time cannot stretch the deadline either.
    timer = threading.Timer(remaining, shut, (conn,))
    timer.start()
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, parts.path or "/", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(MAX_ANSWER + 1)
        kind = response.getheader("Content-Type") or "no Content-Type"
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:  # the timer cut it short, whatever the error looked like
            raise Unreachable(describe(TimeoutError())) from None
        if isinstance(exc, http.client.HTTPException) and not isinstance(exc, OSError):
            raise BadAnswer(f"{url} answered something that is not HTTP ({type(exc).__name__}: {exc})") from None
        raise Unreachable(describe(exc)) from None
    finally:
        timer.cancel()
        conn.close()
    if len(data) > MAX_ANSWER:
        raise BadAnswer(f"{url} answered {response.status} with more than {MAX_ANSWER} bytes")
    try:
        document = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise BadAnswer(f"{url} answered {response.status} with {kind}, not JSON: "
                        f"{data[:80].decode(errors='replace')!r}") from None
    if response.status == 200:
        try:
            msgspec.convert(document, shape)
        except msgspec.ValidationError as exc:
            raise BadAnswer(f"{url} answered with an unexpected document: {exc}") from None
    return response.status, document


def shut(conn: http.client.HTTPConnection) -> None:
    """Wake a blocked read at the deadline (closing the socket alone would not)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the request finished as the timer fired


def error_of(status: int, document: Any) -> str:
    """'503: the orchestrator is shutting down' from an error answer."""
    if isinstance(document, dict) and isinstance(document.get("description") or document.get("error"), str):
        return f"{status}: {document.get('description') or document.get('error')}"
    return str(status)


# A loader process's state as the supervisor keeps it: the names of its machine's states.
ProcessState = Literal[tuple(states.TRANSITIONS)]


# ---- the answers, as gate and status read them ---------------------------------------------------
# supervisor/status.py composes these documents; the end-to-end and telemetry tests convert live
# answers to them, holding the two together. They live here, not in loaders/wire.py, because every
# loader imports wire and none reads an answer. Fields a reader does not need may be absent
# (defaults), so an older orchestrator's answer still passes; a state outside its Literal does not.

class Failure(msgspec.Struct):
    agent: str
    model: str
    error: str | None


class Summary(msgspec.Struct):
    total: int
    done: int
    failed: int


class ModelState(msgspec.Struct):
    status: ModelStatus
    # What `status` shows of a model; defaults keep an older orchestrator's answer acceptable to `gate`.
    model: str = ""
    bytes: int = 0
    bytes_total: int = 0
    rate_bytes_per_s: float | None = None
    eta_s: float | None = None
    seconds: float = 0.0
    error: str | None = None


class Progress(msgspec.Struct):
    bytes: int
    bytes_total: int
    rate_bytes_per_s: float | None
    eta_s: float | None


class Client(msgspec.Struct):
    ready: bool
    in_progress: bool
    state: ProcessState
    pid: int | None
    restarts: int
    models: list[ModelState]
    gpu_memory_bytes: int | None
    rss_bytes: int | None
    memory_limit_bytes: int | None = None
    last_exit: str | None = None
    error: str | None = None
    heartbeat_age_s: float | None = None
    progress: Progress | None = None


class ModelsStatus(msgspec.Struct):
    in_progress: bool
    all_ready: bool
    generation: int
    summary: Summary
    errors: list[Failure]
    clients: dict[str, Client]


class Gpu(msgspec.Struct):
    index: int
    name: str | None
    error: str | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_gpu_percent: int | None
    temperature_celsius: int | None
    power_draw_watts: float | None
    power_limit_watts: float | None
    compute_mode: str | None


class Mps(msgspec.Struct):
    enabled: bool
    servers: list[int]
    managed: bool
    control_pid: int | None
    pipe_dir: str
    error: str | None


class GpuInfo(msgspec.Struct):
    nvml_supported: bool
    nvml_init_error: str | None
    gpus: list[Gpu]
    age_s: float | None
    driver_version: str | None
    mps: Mps
