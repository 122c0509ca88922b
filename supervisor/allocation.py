"""The field's `mps_allocation_config.json`, read key for key: each client's MPS memory limit and
options (AgentAllocation), and the GPU memory the file declares (GpuMemory). Unknown keys are
kept, so the document can be served back as it was given."""

import json
import math
import typing

import msgspec

from gpu_orchestrator.loaders.wire import Backend
from gpu_orchestrator.supervisor.jsonfile import ConfigError, convert, field_path, read_json, shown

BACKENDS = typing.get_args(Backend)  # the loader decodes the same Literal from its arguments
# No GPU has more memory than this (the largest have a few hundred GB): a bigger figure is a
# typo, and an unbounded one (1e308) overflows every byte count computed from it.
MAX_GPU_MEMORY_GB = 4096
MAX_DEVICE_INDEX = 63  # GPU ordinals are small integers; CUDA_VISIBLE_DEVICES carries them


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

    @property
    def limit_mib(self) -> int:
        """The limit as MPS is given it, in the whole MiB of CUDA_MPS_PINNED_DEVICE_MEM_LIMIT: every
        check and figure uses what MPS enforces (2.3 GB is 2,469,396,480 bytes there, not the
        2,469,606,195 of the GB figure, which would let a loader plan a model MPS then refuses)."""
        return int(self.mps_memory_limit_gb * 1024)


class GpuMemory(msgspec.Struct):
    """The memory the allocation file says clients share, and which of its keys said so.

    `available_gb` is what over-commit is judged against without NVML; `overhead_gb` (the
    MPS server's own share, `mps_overhead_gb`) is also taken off each GPU NVML reports.
    """

    available_gb: float | None
    source: str | None
    overhead_gb: float = 0.0


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
    document = read_json(path, "the MPS allocation file")
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
        allocation = convert(entry, AgentAllocation, path, field)
        check_allocation(path, field, allocation)
        allocations[client] = allocation
    return allocations, document, gpu_memory
