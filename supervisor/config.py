"""Configuration: environment, command-line overrides and the two JSON files, validated.

Everything wrong is reported as one ConfigError line naming the file (or
variable), the field and the problem; the CLI turns it into exit status 78
before anything is started.
"""

import os
from pathlib import Path
from typing import Any

import msgspec

from gpu_orchestrator.loaders.store import StoreError, check_client_name, check_model_id, hf_hub_dir

EX_CONFIG = 78
BACKENDS = ("default", "torch")
DEFAULT_ALLOCATION = "./config/gpu/mps_allocation_config.json"
GiB = 1024**3


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


class Config(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8014
    model_store_root: str
    base_model_dir: str | None = None
    strict_model_store: bool = False
    hf_hub: str | None = None
    enable_nvml: bool = False
    enable_mps: bool = False
    model_map_path: str
    allocation_path: str
    mps_pipe_dir: str = "/tmp/nvidia-mps"
    mps_log_dir: str = "/var/log/nvidia-mps"
    token: str | None = None
    backend: str = "default"
    preload: bool = True
    clients: dict[str, list[str]]
    allocations: dict[str, AgentAllocation] = {}
    allocation_document: dict[str, Any] = {}  # the file as read, for /mps/allocation
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


def _read_json(path: str, what: str) -> Any:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None


def field_path(base: str, key: str) -> str:
    """A JSON path that stays on one line whatever the key holds: $.analyst or $["odd\\nname"]."""
    if key and all(c.isalnum() or c in "_-" for c in key):
        return f"{base}.{key}"
    return f"{base}[{msgspec.json.encode(key).decode()}]"


def _convert(value: Any, kind: Any, path: str, field: str) -> Any:
    """msgspec.convert with the error rewritten to name the field by its JSON path."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        message = str(exc).replace("`$", f"`{field}")
        if " - at `" not in message:
            message += f" - at `{field}`"
        raise ConfigError(f"{path}: {message}") from None


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


def load_allocations(path: str, clients: dict[str, list[str]]) -> tuple[dict[str, AgentAllocation], dict]:
    document = _read_json(path, "the MPS allocation file")
    section = document.get("mps_resource_allocation") if isinstance(document, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: $.mps_resource_allocation: missing or not an object")
    raw = section.get("agent_allocations", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: $.mps_resource_allocation.agent_allocations: expected an object")
    configuration = section.get("mps_configuration", {})
    if not isinstance(configuration, dict):
        raise ConfigError(f"{path}: $.mps_resource_allocation.mps_configuration: expected an object")
    allocations = {}
    for client, entry in raw.items():
        field = field_path("$.mps_resource_allocation.agent_allocations", client)
        if client not in clients:
            raise ConfigError(f"{path}: {field}: client {client!r} is not in the model map; remove it or add the client there")
        allocation = _convert(entry, AgentAllocation, path, field)
        if not allocation.mps_memory_limit_gb > 0:
            raise ConfigError(f"{path}: {field}.mps_memory_limit_gb: must be > 0, got {allocation.mps_memory_limit_gb}")
        if allocation.backend not in (None, *BACKENDS):
            raise ConfigError(f"{path}: {field}.backend: must be one of {', '.join(BACKENDS)}, got {allocation.backend!r}")
        percentage = allocation.active_thread_percentage
        if percentage is not None and not 1 <= percentage <= 100:
            raise ConfigError(f"{path}: {field}.active_thread_percentage: must be 1-100, got {percentage}")
        for name in ("calculated_requirement_gb", "safety_margin_gb"):
            value = getattr(allocation, name)
            if value is not None and value < 0:
                raise ConfigError(f"{path}: {field}.{name}: must be >= 0, got {value}")
        allocations[client] = allocation
    return allocations, {"agent_allocations": raw, "mps_configuration": configuration}


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
    return Config(
        host=_setting("GPU_ORCHESTRATOR_HOST", overrides, env, "127.0.0.1"),
        port=parse_port("GPU_ORCHESTRATOR_PORT", _setting("GPU_ORCHESTRATOR_PORT", overrides, env, 8014)),
        model_store_root=os.path.abspath(root),
        base_model_dir=base_model_dir,
        strict_model_store=strict,
        hf_hub=None if strict else str(hf_hub_dir(env)),
        enable_nvml=parse_bool("ENABLE_NVML", env.get("ENABLE_NVML", "false")),
        enable_mps=parse_bool("ENABLE_MPS", env.get("ENABLE_MPS", "false")),
        model_map_path=model_map_path,
        allocation_path=allocation_path,
        mps_pipe_dir=env.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps",
        mps_log_dir=env.get("CUDA_MPS_LOG_DIRECTORY") or "/var/log/nvidia-mps",
        token=env.get("GPU_ORCHESTRATOR_TOKEN") or None,
        backend=backend,
        preload=not overrides.get("no_preload", False),
        **files,
    )


def load_files(model_map_path: str, allocation_path: str) -> dict:
    """The two JSON files, validated together: clients, allocations, the document, warnings."""
    clients = load_model_map(model_map_path)
    if not allocation_path:
        return {"clients": clients, "allocations": {},
                "allocation_document": {"agent_allocations": {}, "mps_configuration": {}},
                "warnings": ["no MPS allocation file (MPS_ALLOCATION_CONFIG): every client runs without a memory limit"]}
    allocations, document = load_allocations(allocation_path, clients)
    warnings = [f"{allocation_path}: client {client} has no allocation: it runs without a memory limit"
                for client in clients if client not in allocations]
    return {"clients": clients, "allocations": allocations, "allocation_document": document, "warnings": warnings}


def reload_config(config: Config) -> Config:
    """Re-read the model map and allocation file (SIGHUP); the environment stays as started."""
    return msgspec.structs.replace(config, **load_files(config.model_map_path, config.allocation_path))
