"""Messages every process shares. No project imports, so a loader can import it cheaply."""

import os

import msgspec

# Per-model status values, in the order a warm-up moves through them.
PENDING = "pending"
LOADING = "loading"
READY = "ready"
FAILED = "failed"

# Loader phases: a loader is either working on a generation or idle after it.
IDLE = "idle"
WORKING = "loading"

# Exit status a loader uses when it cannot boot (bad arguments, no store, no
# channel): restarting cannot help, so the supervisor goes straight to FATAL.
EXIT_CANNOT_BOOT = os.EX_CONFIG  # 78


class ModelProgress(msgspec.Struct, omit_defaults=True):
    model: str
    status: str = PENDING
    path: str | None = None
    format: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    weight_bytes: int = 0
    parameters: int | None = None
    seconds: float = 0.0
    verified: bool = False
    backend: str = "default"
    device: str | None = None  # torch backend: where the weights went
    device_memory_bytes: int | None = None  # torch backend: what they took there
    embedding_dim: int | None = None  # torch backend with warm-up inference
    note: str | None = None
    error: str | None = None

    def rate_and_eta(self) -> tuple[float | None, float | None]:
        """(bytes per second, seconds left) of a model being read, from its own bytes and seconds so
        far (its loader counts `seconds` from when it began this model, so a restarted loader's
        model is timed from its restart); None before anything has been read."""
        if self.status != LOADING or self.bytes_done <= 0 or self.seconds <= 0:
            return None, None
        rate = self.bytes_done / self.seconds
        return rate, max(0, self.bytes_total - self.bytes_done) / rate


class LoaderState(msgspec.Struct, tag="loader"):
    """What a loader publishes to its slot: who it is, which warm-up, how far."""

    client: str
    pid: int
    generation: int
    phase: str
    heartbeat: float  # time.monotonic(): CLOCK_MONOTONIC is shared by all processes
    models: list[ModelProgress]


class LoadCommand(msgspec.Struct, tag="load"):
    """Supervisor -> loader, one JSON line on the loader's stdin."""

    generation: int
    refresh: bool = False
    failed: dict[str, str] = {}  # model -> why the supervisor failed it: report that, do not load it


# A loader caps each model's error at MAX_ERROR, so a slot sized by slot_size_for holds its
# client's whole state with every model failed at the longest error.
MAX_ERROR = 4096


def slot_size_for(max_models: int) -> int:
    """Room for a client's state with long errors (each error capped at MAX_ERROR)."""
    return (16 * 1024 + max_models * 6 * 1024 + 4095) // 4096 * 4096
