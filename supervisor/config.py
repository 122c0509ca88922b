"""Configuration: environment, command-line overrides and the two JSON files, validated.

Everything wrong is reported as one ConfigError line naming the file (or
variable), the field and the problem; the CLI turns it into exit status 78
before anything is started.
"""

import os
import urllib.parse
from typing import Any

import msgspec

from gpu_orchestrator.loaders.store import ORCHESTRATOR_NAMES, StoreError, check_client_name, check_model_id, hf_hub_dir
from gpu_orchestrator.loaders.wire import MODELS_ROOM
from gpu_orchestrator.supervisor.allocation import BACKENDS, AgentAllocation, GpuMemory, load_allocations
from gpu_orchestrator.supervisor.jsonfile import ConfigError, convert, field_path, read_json
from gpu_orchestrator.supervisor.mps_control import DEFAULT_LOG_DIR, DEFAULT_PIPE_DIR, mps_folders
from gpu_orchestrator.supervisor.telemetry import SERVICE_PATTERN

DEFAULT_ALLOCATION = "./config/gpu/mps_allocation_config.json"
DEFAULT_HOST = "127.0.0.1"  # loopback unless told otherwise: the API can start warm-ups
DEFAULT_PORT = 8014
GiB = 1024**3


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
        return allocation.limit_mib * 2**20 if allocation else None


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


def parse_host(host: str) -> str:
    """An empty host would bind every interface (as 0.0.0.0 does): an easy slip in an env file
    (GPU_ORCHESTRATOR_HOST=) that must not open the API to the network unasked."""
    if not host.strip():
        raise ConfigError("GPU_ORCHESTRATOR_HOST/--host: empty; leave it unset for 127.0.0.1, or name the address "
                          "to listen on (0.0.0.0 for every interface)")
    return host


TOKEN_VARIABLE = "GPU_ORCHESTRATOR_TOKEN"  # the API's secret: never handed on to a loader or service


def parse_token(token: str | None) -> str | None:
    if token is not None and (problem := token_problem(token)):
        raise ConfigError(problem)
    return token


def token_problem(token: str) -> str | None:
    """Why `token` could never match an Authorization header, or None. HTTP drops a value's
    leading and trailing whitespace and forbids control characters, so a token with them (a
    secret file's trailing newline) would refuse every POST. The token itself is never shown."""
    if all("!" <= c <= "~" for c in token):
        return None
    return (f"GPU_ORCHESTRATOR_TOKEN: only visible ASCII, without spaces, tabs or newlines, can travel in an "
            f"Authorization header; this one ({len(token)} characters) has others (a trailing newline from a "
            "secret file?)")


def load_model_map(path: str) -> dict[str, list[str]]:
    document = read_json(path, "the model map")
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected an object {{\"client\": [\"model-id\", ...]}}, got {type(document).__name__}")
    clients = {}
    for client, models in document.items():
        field = field_path("$", client)
        try:
            check_client_name(client)
        except StoreError as exc:
            raise ConfigError(f"{path}: {field}: {exc}") from None
        if client in ORCHESTRATOR_NAMES:
            raise ConfigError(f"{path}: {field}: client name {client!r} is the orchestrator's own unit's, which the "
                              "gate lets through unchecked; rename the client")
        models = convert(models, list[str], path, field)
        for index, model in enumerate(models):
            try:
                check_model_id(model)
            except StoreError as exc:
                raise ConfigError(f"{path}: {field}[{index}]: {exc}") from None
            if model in models[:index]:
                raise ConfigError(f"{path}: {field}[{index}]: model {model} is listed twice for {client}")
        if (size := len(msgspec.json.encode(models))) > MODELS_ROOM:
            raise ConfigError(f"{path}: {field}: {len(models)} model ids take {size} bytes; a loader gets its "
                              f"client's list in one command-line argument, which holds {MODELS_ROOM} bytes of ids: "
                              "split the client in two")
        clients[client] = models
    return clients


def _setting(name: str, overrides: dict, env: dict, default: Any = None) -> Any:
    """Command-line flag first, then the environment, then the default."""
    key = name.lower()
    if overrides.get(key) is not None:
        return overrides[key]
    return env.get(name, default)


def loader_path(name: str, path: str) -> str:
    """A path a loader gets in its JSON arguments. JSON carries text, so a path with a byte that is
    not UTF-8 (Python holds it as a lone surrogate) cannot travel: refused here, not at each exec."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name}: {path!r} is not valid UTF-8, and a loader gets it as JSON text; "
                          "rename the folder or point at it through a UTF-8 symlink") from None
    return path


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
    if allocation_path is not None and not allocation_path.strip():
        # An env file's `MPS_ALLOCATION_CONFIG=` would drop every client's limit (and the default file).
        raise ConfigError("MPS_ALLOCATION_CONFIG/--allocation: empty; name the allocation file, or leave it "
                          f"unset for {DEFAULT_ALLOCATION} when it exists")
    if allocation_path is None and os.path.exists(DEFAULT_ALLOCATION):
        allocation_path = DEFAULT_ALLOCATION
    allocation_path = os.path.abspath(allocation_path) if allocation_path else ""
    enable_mps = parse_bool("ENABLE_MPS", env.get("ENABLE_MPS", "false"))
    files = load_files(model_map_path, allocation_path, enable_mps)
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
    hf_hub = None if strict else loader_path("HF_HUB_CACHE / HF_HOME", os.path.abspath(hf_hub_dir(env)))
    return Config(
        host=parse_host(_setting("GPU_ORCHESTRATOR_HOST", overrides, env, DEFAULT_HOST)),
        port=parse_port("GPU_ORCHESTRATOR_PORT", _setting("GPU_ORCHESTRATOR_PORT", overrides, env, DEFAULT_PORT)),
        model_store_root=loader_path("MODEL_STORE_ROOT", os.path.abspath(root)),
        base_model_dir=base_model_dir,
        strict_model_store=strict,
        hf_hub=hf_hub,  # absolute: a loader argument never starts with "-"
        enable_nvml=parse_bool("ENABLE_NVML", env.get("ENABLE_NVML", "false")),
        enable_mps=enable_mps,
        model_map_path=model_map_path,
        allocation_path=allocation_path,
        # Absolute: a client's service resolves a relative folder against its own working directory.
        mps_pipe_dir=os.path.abspath(mps_folders(env)[0]),
        mps_log_dir=os.path.abspath(mps_folders(env)[1]),
        token=parse_token(env.get(TOKEN_VARIABLE) or None),
        backend=backend,
        preload=not overrides.get("no_preload", False),
        service_pattern=service_pattern,
        **files,
    )


def load_files(model_map_path: str, allocation_path: str, enable_mps: bool) -> dict:
    """The two JSON files, validated together: clients, allocations, the document, and warnings
    about limits that will not hold (shown in the log and /health)."""
    clients = load_model_map(model_map_path)
    if not allocation_path:
        return {"clients": clients, "allocations": {}, "gpu_memory": None,
                "allocation_document": {"mps_resource_allocation": {"agent_allocations": {}}},
                "warnings": ["no MPS allocation file (MPS_ALLOCATION_CONFIG): every client runs without a memory limit"]}
    allocations, document, gpu_memory = load_allocations(allocation_path, clients)
    warnings = [f"{allocation_path}: client {client} has no allocation: it runs without a memory limit"
                for client in clients if client not in allocations]
    if allocations and not enable_mps:
        warnings.insert(0, f"ENABLE_MPS is off: nothing enforces the limits of {allocation_path}. A loader refuses "
                           "models over its client's limit and telemetry flags a client over it, but a service "
                           "started with `gpu-orchestrator exec` gets no limit; set ENABLE_MPS=true for MPS to enforce them")
    return {"clients": clients, "allocations": allocations, "allocation_document": document,
            "gpu_memory": gpu_memory, "warnings": warnings}


def reload_config(config: Config) -> Config:
    """Re-read the model map and allocation file (SIGHUP); the environment stays as started."""
    return msgspec.structs.replace(config, **load_files(config.model_map_path, config.allocation_path,
                                                        config.enable_mps))


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
