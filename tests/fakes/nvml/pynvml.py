"""Test double of NVIDIA's pynvml module (nvidia-ml-py): the calls gpu-orchestrator makes.

Never installed. Tests put tests/fakes/nvml first on PYTHONPATH, so `import pynvml` in
the orchestrator finds this one, as the real module would be found on a GPU host.

FAKE_NVML_CONFIG names a JSON file:
  {"init_error": "LibraryNotFound" | null, "driver": "550.54.15", "cuda": 12040,
   "gpus": [{"uuid", "name", "bus", "memory": [total, used], "util": [gpu, mem], "temp",
             "power_mw", "limit_mw", "sm_mhz", "mem_mhz", "mode", "persistence", "ecc": [cur, pending],
             "ecc_errors", "throttle", "unsupported": ["power", ...], "lost": bool,
             "processes": [[pid, bytes], ...], "children_bytes": N, "pid_file": path, "pid_file_bytes": N,
             "raise": {"processes": "mismatch" | "unknown" | "reset", ...}}],
   "count_error": "text"}
The file is read again at every nvmlDeviceGetCount (once a sample), so a test can change the
host while the orchestrator runs: a GPU lost, gone from the count, back.
"raise" makes a feature's read fail: "mismatch" as nvidia-ml-py 13 does for a function the
driver's NVML lacks (NVMLLibraryMismatchError, not an NVMLError), "unknown" and "reset" with
NVML_ERROR_UNKNOWN and NVML_ERROR_RESET_REQUIRED ("all" for every feature). "count_error"
makes nvmlDeviceGetCount raise a RuntimeError: a sample that fails as a whole.
"children_bytes" makes every descendant of the calling process (the supervisor's loaders)
a compute process using that many bytes, as loaders on a real GPU would appear.
"pid_file" names a file of pids (read at every call), each a compute process of "pid_file_bytes".
FAKE_NVML_CALL_LOG, when set, gets one line per call, so tests can count NVML use.
"""

import json
import os
from types import SimpleNamespace

import psutil

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_AGGREGATE_ECC = 1
NVML_COMPUTEMODE_DEFAULT = 0
NVML_COMPUTEMODE_EXCLUSIVE_THREAD = 1
NVML_COMPUTEMODE_PROHIBITED = 2
NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_UNKNOWN = 999

_config = None


class NVMLError(Exception):
    MESSAGES = {3: "Not Supported", 12: "NVML Shared Library Not Found", 15: "GPU is lost",
                16: "GPU requires restart", 999: "Unknown Error"}

    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return self.MESSAGES.get(self.value, f"Unknown Error {self.value}")


class NVMLError_NotSupported(NVMLError):
    def __init__(self):
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


class NVMLError_GpuIsLost(NVMLError):
    def __init__(self):
        super().__init__(NVML_ERROR_GPU_IS_LOST)


class NVMLError_LibraryNotFound(NVMLError):
    def __init__(self):
        super().__init__(NVML_ERROR_LIBRARY_NOT_FOUND)


class NVMLLibraryMismatchError(Exception):
    """nvidia-ml-py 13's error for a versioned function the driver's NVML lacks: not an NVMLError."""


def _called(name):
    path = os.environ.get("FAKE_NVML_CALL_LOG")
    if path:
        with open(path, "a") as log:
            log.write(name + "\n")


def _gpu(handle, feature=None):
    if handle.get("lost"):
        raise NVMLError_GpuIsLost()
    if feature is not None and feature in handle.get("unsupported", []):
        raise NVMLError_NotSupported()
    kind = handle.get("raise", {}).get(feature) or (handle.get("raise", {}).get("all") if feature else None)
    if kind == "mismatch":
        raise NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match "
                                       "the NVML lib version.")
    if kind in ("unknown", "reset"):
        raise NVMLError(NVML_ERROR_UNKNOWN if kind == "unknown" else NVML_ERROR_RESET_REQUIRED)
    return handle


def nvmlInit():
    global _config
    _called("nvmlInit")
    with open(os.environ["FAKE_NVML_CONFIG"]) as source:
        _config = json.load(source)
    if _config.get("init_error") == "LibraryNotFound":
        raise NVMLError_LibraryNotFound()


def nvmlShutdown():
    _called("nvmlShutdown")


def nvmlSystemGetDriverVersion():
    _called("nvmlSystemGetDriverVersion")
    return _config.get("driver", "550.54.15")


def nvmlSystemGetCudaDriverVersion():
    _called("nvmlSystemGetCudaDriverVersion")
    return _config.get("cuda", 12040)


def nvmlDeviceGetCount():
    global _config
    _called("nvmlDeviceGetCount")
    with open(os.environ["FAKE_NVML_CONFIG"]) as source:
        _config = json.load(source)
    if _config.get("count_error"):
        raise RuntimeError(_config["count_error"])
    return len(_config["gpus"])


def nvmlDeviceGetHandleByIndex(index):
    _called("nvmlDeviceGetHandleByIndex")
    return _config["gpus"][index]


def nvmlDeviceGetUUID(handle):
    _called("nvmlDeviceGetUUID")
    return _gpu(handle)["uuid"]


def nvmlDeviceGetName(handle):
    _called("nvmlDeviceGetName")
    return _gpu(handle)["name"]


def nvmlDeviceGetPciInfo(handle):
    _called("nvmlDeviceGetPciInfo")
    return SimpleNamespace(busId=_gpu(handle, "pci")["bus"].encode())


def nvmlDeviceGetMemoryInfo(handle):
    _called("nvmlDeviceGetMemoryInfo")
    total, used = _gpu(handle, "memory")["memory"]
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(handle):
    _called("nvmlDeviceGetUtilizationRates")
    gpu, memory = _gpu(handle, "utilization")["util"]
    return SimpleNamespace(gpu=gpu, memory=memory)


def nvmlDeviceGetTemperature(handle, sensor):
    _called("nvmlDeviceGetTemperature")
    return _gpu(handle, "temperature")["temp"]


def nvmlDeviceGetPowerUsage(handle):
    _called("nvmlDeviceGetPowerUsage")
    return _gpu(handle, "power")["power_mw"]


def nvmlDeviceGetEnforcedPowerLimit(handle):
    _called("nvmlDeviceGetEnforcedPowerLimit")
    return _gpu(handle, "power")["limit_mw"]


def nvmlDeviceGetClockInfo(handle, clock):
    _called("nvmlDeviceGetClockInfo")
    gpu = _gpu(handle, "clocks")
    return gpu["sm_mhz"] if clock == NVML_CLOCK_SM else gpu["mem_mhz"]


def nvmlDeviceGetComputeMode(handle):
    _called("nvmlDeviceGetComputeMode")
    return _gpu(handle, "compute_mode")["mode"]


def nvmlDeviceGetPersistenceMode(handle):
    _called("nvmlDeviceGetPersistenceMode")
    return _gpu(handle, "persistence")["persistence"]


def nvmlDeviceGetEccMode(handle):
    _called("nvmlDeviceGetEccMode")
    return list(_gpu(handle, "ecc")["ecc"])


def nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type):
    _called("nvmlDeviceGetTotalEccErrors")
    return _gpu(handle, "ecc")["ecc_errors"]


def nvmlDeviceGetCurrentClocksThrottleReasons(handle):
    _called("nvmlDeviceGetCurrentClocksThrottleReasons")
    return _gpu(handle, "throttle")["throttle"]


def nvmlDeviceGetComputeRunningProcesses(handle):
    _called("nvmlDeviceGetComputeRunningProcesses")
    gpu = _gpu(handle, "processes")
    found = [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.get("processes", [])]
    if gpu.get("pid_file"):  # processes a test starts after the orchestrator, e.g. a client's service
        with open(gpu["pid_file"]) as listed:
            found += [SimpleNamespace(pid=int(pid), usedGpuMemory=gpu["pid_file_bytes"]) for pid in listed.read().split()]
    if gpu.get("children_bytes"):
        for child in psutil.Process().children(recursive=True):
            try:
                if "gpu_orchestrator.loaders" in " ".join(child.cmdline()):
                    found.append(SimpleNamespace(pid=child.pid, usedGpuMemory=gpu["children_bytes"]))
            except psutil.Error:  # exited (a zombie until reaped) or gone: real NVML would not list it
                pass
    return found
