"""Configuration: environment, command-line overrides and the two JSON files, validated.

Everything wrong is reported as one ConfigError line naming the file (or
variable), the field and the problem; the CLI turns it into exit status 78
before anything is started.
"""

import json
import math
import os
import re
import stat
import urllib.parse
from typing import Any

import msgspec

from gpu_orchestrator.loaders.store import StoreError, check_client_name, check_model_id, hf_hub_dir
from gpu_orchestrator.supervisor.mps import DEFAULT_LOG_DIR, DEFAULT_PIPE_DIR, mps_folders
from gpu_orchestrator.supervisor.telemetry import SERVICE_PATTERN

BACKENDS = ("default", "torch")
DEFAULT_ALLOCATION = "./config/gpu/mps_allocation_config.json"
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise: the API can start warm-ups
DEFAULT_PORT = 8014
GiB = 1024**3
# No GPU has more memory than this (the largest have a few hundred GB): a bigger figure is a
# typo, and an unbounded one (1e308) overflows every byte count computed from it.
MAX_GPU_MEMORY_GB = 4096
MAX_DEVICE_INDEX = 63  # GPU ordinals are small integers; CUDA_VISIBLE_DEVICES carries them
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # both files are a few KB; anything near this is not a config


class ConfigError(Exception):
    """One line: where, which field, what is wrong."""


class AgentAllocation(msgspec.Struct):
    """One client's entry in mps_allocation_config.json; unknown keys are kept, not refused."""

    mps_memory_limit_gb: float
    calculated_requirement_gb: float | None = None
    safety_margin_gb: float | None = None
    priority: str | None = None
    models: list[str] = []
    active_thread_percentage: int | None = None
    devices: list[int] | None = None
    backend: str | None = None  # "default" or "torch"; unset: GPU_ORCHESTRATOR_BACKEND
    warmup: bool = False  # torch backend: embed one sentence when the snapshot is sentence-transformers


class GpuMemory(msgspec.Struct):
    """The memory the allocation file says clients share, and which of its keys said so.

    `available_gb` is what over-commit is judged against without NVML; `overhead_gb` (the
    MPS server's own share, `mps_overhead_gb`) is also taken off each GPU NVML reports.
    """

    available_gb: float | None
    source: str | None
    overhead_gb: float = 0.0


class Config(msgspec.Struct, kw_only=True):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model_store_root: str
    base_model_dir: str | None = None
    strict_model_store: bool = False
    hf_hub: str | None = None
    enable_nvml: bool = False
    enable_mps: bool = False
    model_map_path: str
    allocation_path: str
    mps_pipe_dir: str = DEFAULT_PIPE_DIR
    mps_log_dir: str = DEFAULT_LOG_DIR
    token: str | None = None
    backend: str = "default"
    preload: bool = True
    service_pattern: str = SERVICE_PATTERN  # a client's service by its systemd unit, for attribution
    clients: dict[str, list[str]]
    allocations: dict[str, AgentAllocation] = {}
    allocation_document: dict[str, Any] = {}  # the file as read, every key kept, for /mps/allocation
    gpu_memory: GpuMemory | None = None  # what the file says the GPU offers, when it says so
    warnings: list[str] = []

    def backend_for(self, client: str) -> str:
        allocation = self.allocations.get(client)
        return allocation.backend if allocation is not None and allocation.backend else self.backend

    def memory_limit_bytes(self, client: str) -> int | None:
        allocation = self.allocations.get(client)
        return int(allocation.mps_memory_limit_gb * GiB) if allocation else None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def parse_port(name: str, value: str | int) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: port {port} is outside 0-65535")
    return port


FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
              stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _not_regular(path: str, what: str, mode: int) -> ConfigError:
    kind = FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
    return ConfigError(f"{path}: cannot read {what}: it is {kind}, not a regular file; point it at the JSON file")


def read_config_file(path: str, what: str) -> bytes:
    """The file's bytes, without ever blocking: a FIFO, a device or a directory (which can
    hang or never end) is refused before it is opened, and again through the descriptor in
    case the path was swapped meanwhile; the read is bounded."""
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise _not_regular(path, what, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            raise _not_regular(path, what, mode)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {what} is larger than {MAX_CONFIG_BYTES} bytes; this is not a configuration file")
    return raw


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """JSON keeps the last of two equal keys and drops the first without a word: refuse instead."""
    document = {}
    for key, value in pairs:
        if key in document:
            raise _DuplicateKey(key)
        document[key] = value
    return document


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _read_json(path: str, what: str) -> Any:
    raw = read_config_file(path, what)
    try:
        document = json.loads(raw, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: key {json.dumps(exc.args[0])} is given twice in one object; "
                          "JSON would silently keep the last one: merge them") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    _refuse_huge_integers(path, document)
    return document


def _refuse_huge_integers(path: str, document: Any) -> None:
    """No number in these files means anything past 64 bits, and msgspec before 0.22 fails
    with a SystemError converting such an integer to a float: refuse it by its path."""
    pending = [("$", document)]
    while pending:  # iterative: the document may be nested as deep as the parser allows
        where, value = pending.pop()
        if isinstance(value, dict):
            pending.extend((field_path(where, key), item) for key, item in value.items())
        elif isinstance(value, list):
            pending.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, int) and not -2**63 <= value < 2**64:
            raise ConfigError(f"{path}: {where}: {shown(value)} is larger than any number this file can mean")


def field_path(base: str, key: str) -> str:
    """A JSON path that stays on one line whatever the key holds: $.analyst or $["odd\\nname"]."""
    if key and all(c.isalnum() or c in "_-" for c in key):
        return f"{base}.{key}"
    return f"{base}[{msgspec.json.encode(key).decode()}]"


_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _value_at(value: Any, where: str) -> str | None:
    """The JSON text of what msgspec's `$.devices[1]`-style path points at inside `value`."""
    for key, index in _STEP.findall(where):
        try:
            value = value[key] if key else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _convert(value: Any, kind: Any, path: str, field: str) -> Any:
    """msgspec.convert with the error rewritten to name the field by its JSON path, and the value."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `")
        where = where.rstrip("`") or "$"
        found = _value_at(value, where) if message.startswith(("Expected", "Number")) else None
        got = f", value {found}" if found is not None else ""
        raise ConfigError(f"{path}: {message} - at `{field}{where[1:]}`{got}") from None


def load_model_map(path: str) -> dict[str, list[str]]:
    document = _read_json(path, "the model map")
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected an object {{\"client\": [\"model-id\", ...]}}, got {type(document).__name__}")
    clients = {}
    for client, models in document.items():
        field = field_path("$", client)
        try:
            check_client_name(client)
        except StoreError as exc:
            raise ConfigError(f"{path}: {field}: {exc}") from None
        models = _convert(models, list[str], path, field)
        for index, model in enumerate(models):
            try:
                check_model_id(model)
            except StoreError as exc:
                raise ConfigError(f"{path}: {field}[{index}]: {exc}") from None
            if model in models[:index]:
                raise ConfigError(f"{path}: {field}[{index}]: model {model} is listed twice for {client}")
        clients[client] = models
    return clients


def shown(value: float | int) -> str:
    """A number as the file most likely wrote it: 0 not 0.0, 1e+308 as is, 400 digits cut short."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _gb(path: str, field: str, value: float, low: float, *, low_included: bool = False) -> None:
    """A memory figure in GB: a finite number above `low` (or at it) and within what a GPU can have."""
    bound = f">= {low}" if low_included else f"> {low}"
    if (isinstance(value, float) and math.isnan(value)) or value < low or (value == low and not low_included):
        raise ConfigError(f"{path}: {field}: must be {bound}, got {shown(value)}")
    if value > MAX_GPU_MEMORY_GB:
        raise ConfigError(f"{path}: {field}: must be at most {MAX_GPU_MEMORY_GB} GB (no GPU has more), got {shown(value)}")


def check_allocation(path: str, field: str, allocation: AgentAllocation) -> None:
    limit = allocation.mps_memory_limit_gb
    _gb(path, f"{field}.mps_memory_limit_gb", limit, 0)
    if int(limit * 1024) == 0:
        # MPS takes the limit in whole MiB: less than one would be a limit of 0, i.e. none at all.
        raise ConfigError(f"{path}: {field}.mps_memory_limit_gb: {shown(limit)} GB is less than 1 MiB and "
                          f"rounds to 0 MiB for MPS; give at least {1 / 1024} GB")
    for name in ("calculated_requirement_gb", "safety_margin_gb"):
        if (value := getattr(allocation, name)) is not None:
            _gb(path, f"{field}.{name}", value, 0, low_included=True)
    if allocation.backend not in (None, *BACKENDS):
        raise ConfigError(f"{path}: {field}.backend: must be one of {', '.join(BACKENDS)}, got {allocation.backend!r}")
    percentage = allocation.active_thread_percentage
    if percentage is not None and not 1 <= percentage <= 100:
        raise ConfigError(f"{path}: {field}.active_thread_percentage: must be 1-100, got {percentage}")
    devices = allocation.devices
    if devices is not None:
        if not devices:
            raise ConfigError(f"{path}: {field}.devices: is empty; list the GPU indices or leave devices out for all GPUs")
        for index, device in enumerate(devices):
            if not 0 <= device <= MAX_DEVICE_INDEX:
                raise ConfigError(f"{path}: {field}.devices[{index}]: must be a GPU index 0-{MAX_DEVICE_INDEX}, got {device}")
            if device in devices[:index]:
                raise ConfigError(f"{path}: {field}.devices[{index}]: GPU {device} is listed twice")


def _object(path: str, section: dict, key: str) -> dict:
    value = section.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: $.mps_resource_allocation.{key}: expected an object, got {json.dumps(value)[:80]}")
    return value


def _memory_figure(path: str, section: dict, field: str, key: str, *, zero_allowed: bool = False) -> float | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: {field}: must be a number, got {json.dumps(value)[:80]}")
    _gb(path, field, value, 0, low_included=zero_allowed)  # an int of 400 digits compares as it is
    return float(value)


def gpu_memory_of(path: str, section: dict, configuration: dict) -> GpuMemory:
    """What over-commit is judged against without NVML: available_memory_gb, else the total less
    the MPS overhead, else the total; the top-level total first, mps_configuration's as a fallback."""
    top = "$.mps_resource_allocation"
    overhead = _memory_figure(path, section, f"{top}.mps_overhead_gb", "mps_overhead_gb", zero_allowed=True)
    available = _memory_figure(path, section, f"{top}.available_memory_gb", "available_memory_gb")
    total = _memory_figure(path, section, f"{top}.total_gpu_memory_gb", "total_gpu_memory_gb")
    fallback = _memory_figure(path, configuration, f"{top}.mps_configuration.total_gpu_memory_gb",
                              "total_gpu_memory_gb")
    total_key = "total_gpu_memory_gb" if total is not None else "mps_configuration.total_gpu_memory_gb"
    total = total if total is not None else fallback
    if overhead is not None and total is not None and overhead >= total:
        raise ConfigError(f"{path}: {top}.mps_overhead_gb: {shown(overhead)} leaves nothing of the "
                          f"{shown(total)} GB of {total_key}; it must be smaller")
    if available is not None:
        return GpuMemory(available, "available_memory_gb", overhead or 0.0)
    if total is None:
        return GpuMemory(None, None, overhead or 0.0)
    if overhead is not None:
        return GpuMemory(round(total - overhead, 6), f"{total_key} - mps_overhead_gb", overhead)
    return GpuMemory(total, total_key)


def load_allocations(path: str, clients: dict[str, list[str]]) -> tuple[dict[str, AgentAllocation], dict, GpuMemory]:
    """The allocations, the whole document as given (every key kept) and the memory it declares."""
    document = _read_json(path, "the MPS allocation file")
    section = document.get("mps_resource_allocation") if isinstance(document, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: $.mps_resource_allocation: missing or not an object")
    raw = _object(path, section, "agent_allocations")
    gpu_memory = gpu_memory_of(path, section, _object(path, section, "mps_configuration"))
    allocations = {}
    for client, entry in raw.items():
        field = field_path("$.mps_resource_allocation.agent_allocations", client)
        if client not in clients:
            raise ConfigError(f"{path}: {field}: client {client!r} is not in the model map; remove it or add the client there")
        allocation = _convert(entry, AgentAllocation, path, field)
        check_allocation(path, field, allocation)
        allocations[client] = allocation
    return allocations, document, gpu_memory


def _setting(name: str, overrides: dict, env: dict, default: Any = None) -> Any:
    """Command-line flag first, then the environment, then the default."""
    key = name.lower()
    if overrides.get(key) is not None:
        return overrides[key]
    return env.get(name, default)


def load_config(env: dict | None = None, overrides: dict | None = None) -> Config:
    """Build and validate the whole configuration. Raises ConfigError."""
    env = dict(os.environ if env is None else env)
    overrides = overrides or {}
    root = _setting("MODEL_STORE_ROOT", overrides, env)
    if not root:
        raise ConfigError("MODEL_STORE_ROOT: not set; point it (or --model-store) at the model snapshots")
    if not os.path.isdir(root):
        raise ConfigError(f"MODEL_STORE_ROOT: {root} is not a directory")
    model_map_path = os.path.abspath(_setting("AGENT_MODEL_MAP", overrides, env, "./AGENT_MODEL_MAP.json"))
    allocation_path = _setting("MPS_ALLOCATION_CONFIG", overrides, env)
    if allocation_path is None and os.path.exists(DEFAULT_ALLOCATION):
        allocation_path = DEFAULT_ALLOCATION
    allocation_path = os.path.abspath(allocation_path) if allocation_path else ""
    files = load_files(model_map_path, allocation_path)
    base_model_dir = _setting("BASE_MODEL_DIR", overrides, env) or None
    if base_model_dir:
        try:
            check_model_id(base_model_dir)
        except StoreError as exc:
            raise ConfigError(f"BASE_MODEL_DIR: {exc}") from None
    strict = parse_bool("STRICT_MODEL_STORE", _setting("STRICT_MODEL_STORE", overrides, env, "0"))
    backend = env.get("GPU_ORCHESTRATOR_BACKEND") or "default"
    if backend not in BACKENDS:
        raise ConfigError(f"GPU_ORCHESTRATOR_BACKEND: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    service_pattern = env.get("GPU_ORCHESTRATOR_SERVICE_PATTERN") or SERVICE_PATTERN
    if "{client}" not in service_pattern or "/" in service_pattern:
        raise ConfigError("GPU_ORCHESTRATOR_SERVICE_PATTERN: a systemd unit name pattern with {client} in it "
                          f"(e.g. '*@{{client}}.service' or 'inference-{{client}}.service'), got {service_pattern!r}")
    return Config(
        host=_setting("GPU_ORCHESTRATOR_HOST", overrides, env, DEFAULT_HOST),
        port=parse_port("GPU_ORCHESTRATOR_PORT", _setting("GPU_ORCHESTRATOR_PORT", overrides, env, DEFAULT_PORT)),
        model_store_root=os.path.abspath(root),
        base_model_dir=base_model_dir,
        strict_model_store=strict,
        hf_hub=None if strict else os.path.abspath(hf_hub_dir(env)),  # a loader argument: never "-..."
        enable_nvml=parse_bool("ENABLE_NVML", env.get("ENABLE_NVML", "false")),
        enable_mps=parse_bool("ENABLE_MPS", env.get("ENABLE_MPS", "false")),
        model_map_path=model_map_path,
        allocation_path=allocation_path,
        mps_pipe_dir=mps_folders(env)[0],
        mps_log_dir=mps_folders(env)[1],
        token=env.get("GPU_ORCHESTRATOR_TOKEN") or None,
        backend=backend,
        preload=not overrides.get("no_preload", False),
        service_pattern=service_pattern,
        **files,
    )


def load_files(model_map_path: str, allocation_path: str) -> dict:
    """The two JSON files, validated together: clients, allocations, the document, warnings."""
    clients = load_model_map(model_map_path)
    if not allocation_path:
        return {"clients": clients, "allocations": {}, "gpu_memory": None,
                "allocation_document": {"mps_resource_allocation": {"agent_allocations": {}}},
                "warnings": ["no MPS allocation file (MPS_ALLOCATION_CONFIG): every client runs without a memory limit"]}
    allocations, document, gpu_memory = load_allocations(allocation_path, clients)
    warnings = [f"{allocation_path}: client {client} has no allocation: it runs without a memory limit"
                for client in clients if client not in allocations]
    return {"clients": clients, "allocations": allocations, "allocation_document": document,
            "gpu_memory": gpu_memory, "warnings": warnings}


def reload_config(config: Config) -> Config:
    """Re-read the model map and allocation file (SIGHUP); the environment stays as started."""
    return msgspec.structs.replace(config, **load_files(config.model_map_path, config.allocation_path))


# The metrics listener: GET /metrics, /health and /ready on a second address, so a central
# Prometheus (or a kubelet's probes) can reach them while the API, whose POST routes start
# warm-ups, stays on loopback. Off unless the flag or the variable names an address.
METRICS_LISTEN_ENV = "GPU_ORCHESTRATOR_METRICS_LISTEN"


def parse_listen(value: str, source: str) -> tuple[str, int]:
    """'0.0.0.0:9014', '127.0.0.1:9014', '[::]:9014' -> (host, port); ConfigError naming `source`."""
    try:
        parts = urllib.parse.urlsplit("//" + value)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"{source}: {value!r} is not HOST:PORT ({exc})") from None
    if not host or port is None or port == 0 or parts.path or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{source}: expected HOST:PORT with a port from 1 to 65535 "
                          f"(e.g. 0.0.0.0:9014 or [::]:9014), got {value!r}")
    return host, port


def metrics_listen_address(flag: str | None, env: dict) -> tuple[str, int] | None:
    """The flag, else the variable; None (off, the default) when neither is set."""
    if flag is not None:
        return parse_listen(flag, "--metrics-listen")
    if env.get(METRICS_LISTEN_ENV):
        return parse_listen(env[METRICS_LISTEN_ENV], METRICS_LISTEN_ENV)
    return None
