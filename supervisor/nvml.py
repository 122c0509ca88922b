"""The NVML seam: `import pynvml` and initialise it once, lazily, in this process only; and
read one GPU (`sample_gpu`), field by field, for the sampler (telemetry.py).

Tests put a fake `pynvml` module first on PYTHONPATH (tests/fakes/nvml), as they put a
fake nvidia-cuda-mps-control first on PATH; nothing here ever chooses a fake.
"""

import logging
import threading
from typing import Callable

import msgspec

from gpu_orchestrator.loaders.logs import kv

log = logging.getLogger("telemetry")

_lock = threading.Lock()
_state: dict = {}


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "LibraryNotFound" in type(exc).__name__ or "Library Not Found" in text:
        return f"NVML library not found ({text}): no NVIDIA driver on this host"
    if "DriverNotLoaded" in type(exc).__name__ or "Driver Not Loaded" in text:
        return f"NVIDIA driver not loaded ({text})"
    return text


# nvmlInit's errors that mean this host has no NVIDIA GPU: no driver library, no driver (a driver
# that sees no device starts NVML, and counts 0). Any other (NVML_ERROR_LIB_RM_VERSION_MISMATCH,
# NVML_ERROR_NO_PERMISSION...) is a driver that is there but broken. Only names every supported
# nvidia-ml-py has (tests/unit/test_nvml_api.py holds the declared minimum to them).
NO_GPU_ERRORS = ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED")


def nvml():
    """(pynvml, None) once nvmlInit succeeded, else (None, why). Initialised at most once."""
    with _lock:
        if "module" not in _state:
            _state["failure"] = None
            try:
                import pynvml
            except ImportError as exc:  # a dependency of this package: its installation is broken
                _state["module"], _state["error"] = None, f"pynvml does not import ({exc}): pip install nvidia-ml-py"
                _state["failure"] = "ImportError"
                return None, _state["error"]
            try:
                pynvml.nvmlInit()
                _state["module"], _state["error"] = pynvml, None
            except Exception as exc:  # a missing library, driver or device all land here
                _state["module"], _state["error"] = None, describe(exc)
                _state["failure"] = error_name(pynvml, exc)
        return _state["module"], _state["error"]


def init_failure() -> str | None:
    """How nvmlInit failed: pynvml's name of its error code (NVML_ERROR_NO_PERMISSION...),
    'ImportError' when pynvml did not import, None when it did not fail or had no code."""
    nvml()
    return _state["failure"]


def error_name(module, exc: BaseException) -> str | None:
    """pynvml's name for an NVMLError's code, e.g. NVML_ERROR_NO_PERMISSION; None without one."""
    code = getattr(exc, "value", None)
    if code is None:
        return None
    return next((name for name in dir(module) if name.startswith("NVML_ERROR_") and getattr(module, name) == code),
                None)


def text(value) -> str:
    """NVML returns bytes from older bindings and str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


THROTTLE_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting", 0x200: "board_limit", 0x400: "reliability",
}
COMPUTE_MODES = {0: "DEFAULT", 1: "EXCLUSIVE_THREAD", 2: "PROHIBITED", 3: "EXCLUSIVE_PROCESS"}


class GpuProcess(msgspec.Struct):
    pid: int
    used_memory_bytes: int | None = None
    client: str | None = None
    role: str | None = None  # "loader", "loader-child", "service", "mps-server"


class GpuSample(msgspec.Struct):
    index: int
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_gpu_percent: int | None = None
    utilization_memory_percent: int | None = None
    temperature_celsius: int | None = None
    power_draw_watts: float | None = None
    power_limit_watts: float | None = None
    clock_sm_mhz: int | None = None
    clock_memory_mhz: int | None = None
    compute_mode: str | None = None
    persistence_mode: bool | None = None
    ecc_enabled: bool | None = None
    ecc_uncorrected_errors: int | None = None
    throttle_reasons: list[str] | None = None
    processes: list[GpuProcess] = []
    unsupported: list[str] = []
    error: str | None = None


class GpuLost(Exception):
    pass


# NVML's codes for a GPU that is there but no longer works: when every field read fails, with one
# of these among them, the GPU is down, as one that is lost (NVML_ERROR_GPU_IS_LOST) is. getattr: the names
# exist in every supported nvidia-ml-py (11.495.46 has them), and the fake need not have them.
def down_codes(module) -> set[int]:
    return {getattr(module, "NVML_ERROR_UNKNOWN", 999), getattr(module, "NVML_ERROR_RESET_REQUIRED", 16)}


unexpected_logged: set[tuple[str, str]] = set()  # (field, exception type) logged with a traceback


def field_error(name: str, exc: Exception, module) -> str:
    """How a failed read is named in `unsupported`: NVML's own text, or the exception's type and text
    for anything else (logged once per field and type, with its traceback)."""
    if isinstance(exc, module.NVMLError):
        return describe(exc)
    if (name, type(exc).__name__) not in unexpected_logged:
        unexpected_logged.add((name, type(exc).__name__))
        log.warning(kv("NVML field read failed with an unexpected error; the field is reported unsupported",
                       field=name, error=f"{type(exc).__name__}: {describe(exc)}"), exc_info=exc)
    return f"{type(exc).__name__}: {describe(exc)}"


def sample_gpu(module, index: int, owners: Callable[[int], tuple[str | None, str | None]]) -> GpuSample:
    gpu = GpuSample(index)
    try:
        handle = module.nvmlDeviceGetHandleByIndex(index)
        gpu.uuid = text(module.nvmlDeviceGetUUID(handle))
        gpu.name = text(module.nvmlDeviceGetName(handle))
    except Exception as exc:  # any error, NVML's or not: this GPU fails, the others are still read
        gpu.error = field_error("identity", exc, module)
        return gpu
    reads, down = 0, down_codes(module)
    failed_down: list[str] = []

    def read(name: str, function, *args):
        nonlocal reads
        reads += 1
        try:
            return getattr(module, function)(handle, *args)
        except Exception as exc:  # one field's failure, of whatever kind, is that field's alone
            if type(exc).__name__ == "NVMLError_GpuIsLost":
                raise GpuLost(describe(exc)) from None
            why = field_error(name, exc, module)
            if isinstance(exc, module.NVMLError) and getattr(exc, "value", None) in down:
                failed_down.append(why)
            gpu.unsupported.append(f"{name}: {why}")
            return None

    try:
        fill(gpu, module, read, owners)
    except GpuLost as lost:
        return GpuSample(index, uuid=gpu.uuid, name=gpu.name, error=str(lost))
    # Nothing answered, and at least one read said the GPU is broken (the rest may be fields it never
    # had): the GPU is down, not its fields.
    if failed_down and len(gpu.unsupported) == reads:
        return GpuSample(index, uuid=gpu.uuid, name=gpu.name,
                         error=f"GPU does not answer: every field read failed ({failed_down[0]})")
    return gpu


def fill(gpu: GpuSample, module, read, owners) -> None:
    pci = read("pci_bus_id", "nvmlDeviceGetPciInfo")
    gpu.pci_bus_id = text(pci.busId) if pci is not None else None
    memory = read("memory", "nvmlDeviceGetMemoryInfo")
    if memory is not None:
        gpu.memory_total_bytes, gpu.memory_used_bytes, gpu.memory_free_bytes = memory.total, memory.used, memory.free
    rates = read("utilization", "nvmlDeviceGetUtilizationRates")
    if rates is not None:
        gpu.utilization_gpu_percent, gpu.utilization_memory_percent = rates.gpu, rates.memory
    gpu.temperature_celsius = read("temperature_celsius", "nvmlDeviceGetTemperature", module.NVML_TEMPERATURE_GPU)
    power = read("power_draw_watts", "nvmlDeviceGetPowerUsage")
    gpu.power_draw_watts = power / 1000 if power is not None else None
    limit = read("power_limit_watts", "nvmlDeviceGetEnforcedPowerLimit")
    gpu.power_limit_watts = limit / 1000 if limit is not None else None
    gpu.clock_sm_mhz = read("clock_sm_mhz", "nvmlDeviceGetClockInfo", module.NVML_CLOCK_SM)
    gpu.clock_memory_mhz = read("clock_memory_mhz", "nvmlDeviceGetClockInfo", module.NVML_CLOCK_MEM)
    mode = read("compute_mode", "nvmlDeviceGetComputeMode")
    gpu.compute_mode = COMPUTE_MODES.get(mode, str(mode)) if mode is not None else None
    persistence = read("persistence_mode", "nvmlDeviceGetPersistenceMode")
    gpu.persistence_mode = bool(persistence) if persistence is not None else None
    ecc = read("ecc_enabled", "nvmlDeviceGetEccMode")
    gpu.ecc_enabled = bool(ecc[0]) if ecc is not None else None
    if gpu.ecc_enabled:
        gpu.ecc_uncorrected_errors = read("ecc_uncorrected_errors", "nvmlDeviceGetTotalEccErrors",
                                          module.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, module.NVML_AGGREGATE_ECC)
    reasons = read("throttle_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
    if reasons is not None:
        gpu.throttle_reasons = [name for bit, name in THROTTLE_REASONS.items() if reasons & bit]
    processes = read("processes", "nvmlDeviceGetComputeRunningProcesses")
    gpu.processes = [process_entry(p, owners) for p in processes or []]


def process_entry(process, owners: Callable[[int], tuple[str | None, str | None]]) -> GpuProcess:
    used = process.usedGpuMemory
    client, role = owners(process.pid)
    # NVML reports None (or a huge sentinel) where it cannot attribute memory, e.g. under MPS.
    return GpuProcess(process.pid, used if isinstance(used, int) and used < 2**63 else None, client, role)
