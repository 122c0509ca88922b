"""NVML telemetry: a sampler thread in the supervisor takes one snapshot per interval and
keeps it behind a lock (it never crosses a process, so it is not on the shared-memory
channel). Requests only ever read that snapshot.

A field a GPU does not support becomes None and is named, with the reason, in the
GPU's `unsupported` list; a GPU that fails as a whole carries its `error` while the
others are still reported; NVML that cannot start gives nvml_supported=False, and so
does a sample that fails as a whole (any exception: the sampler thread must outlive it),
with the error, until a sample succeeds again.

Each GPU process is attributed to a client: its loader and the loader's children;
the client's own service, found by its systemd unit (from /proc/PID/cgroup, matched
against a pattern such as `*@{client}.service`) or by the GPU_ORCHESTRATOR_CLIENT
variable that `gpu-orchestrator exec` puts in its environment. MPS limits apply
per CUDA process, so a client whose processes together pass its limit on a GPU is
flagged as over its limit.
"""

import fnmatch
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import msgspec
import psutil

from gpu_orchestrator.loaders.logs import kv
from gpu_orchestrator.supervisor import nvml

log = logging.getLogger("telemetry")

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


class Telemetry(msgspec.Struct, tag="telemetry"):
    nvml_supported: bool
    nvml_init_error: str | None
    sampled_at: float  # wall clock
    sampled_monotonic: float
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[GpuSample] = []
    clients: dict[str, int] = {}  # client -> GPU memory bytes of all its processes, every GPU
    client_gpus: dict[str, dict[int, int]] = {}  # client -> GPU index -> bytes of its processes there
    over_limit: dict[str, list[int]] = {}  # client -> GPUs where its processes together pass its limit


SERVICE_PATTERN = "*@{client}.service"
CLIENT_VARIABLE = "GPU_ORCHESTRATOR_CLIENT"  # set by `gpu-orchestrator exec` (and for loaders)


@dataclass(frozen=True)
class Owners:
    """What the supervisor knows about who runs what, handed to the sampler each sample."""

    loaders: dict[int, str] = field(default_factory=dict)  # pid -> client
    mps_servers: list[int] = field(default_factory=list)
    clients: tuple[str, ...] = ()
    limits: dict[str, int] = field(default_factory=dict)  # client -> bytes allowed per GPU
    service_pattern: str = SERVICE_PATTERN


class GpuLost(Exception):
    pass


def sample_gpu(module, index: int, owners: Callable[[int], tuple[str | None, str | None]]) -> GpuSample:
    gpu = GpuSample(index)
    try:
        handle = module.nvmlDeviceGetHandleByIndex(index)
        gpu.uuid = nvml.text(module.nvmlDeviceGetUUID(handle))
        gpu.name = nvml.text(module.nvmlDeviceGetName(handle))
    except module.NVMLError as exc:
        gpu.error = nvml.describe(exc)
        return gpu

    def read(name: str, function, *args):
        try:
            return getattr(module, function)(handle, *args)
        except module.NVMLError as exc:
            if type(exc).__name__ == "NVMLError_GpuIsLost":
                raise GpuLost(nvml.describe(exc)) from None
            gpu.unsupported.append(f"{name}: {nvml.describe(exc)}")
            return None

    try:
        fill(gpu, module, read, owners)
    except GpuLost as lost:
        return GpuSample(index, uuid=gpu.uuid, name=gpu.name, error=str(lost))
    return gpu


def fill(gpu: GpuSample, module, read, owners) -> None:
    pci = read("pci_bus_id", "nvmlDeviceGetPciInfo")
    gpu.pci_bus_id = nvml.text(pci.busId) if pci is not None else None
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
    processes = read("processes", "nvmlDeviceGetComputeRunningProcesses") or []
    gpu.processes = [process_entry(p, owners) for p in processes]


def process_entry(process, owners: Callable[[int], tuple[str | None, str | None]]) -> GpuProcess:
    used = process.usedGpuMemory
    client, role = owners(process.pid)
    # NVML reports None (or a huge sentinel) where it cannot attribute memory, e.g. under MPS.
    return GpuProcess(process.pid, used if isinstance(used, int) and used < 2**63 else None, client, role)


def systemd_unit(pid: int) -> str | None:
    """The innermost .service of the process's cgroup path (cgroup v2 or v1), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            if part.endswith(".service"):
                return part
    return None


def client_variable(pid: int) -> str | None:
    """GPU_ORCHESTRATOR_CLIENT from the process's environment. Readable for our own user's
    processes (and with CAP_SYS_PTRACE); a service of another user is found by its unit."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read()
    except OSError:
        return None
    prefix = CLIENT_VARIABLE.encode() + b"="
    for entry in environ.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def service_client(pid: int, owners: Owners) -> str | None:
    """The client whose service this GPU process is, by `exec`'s variable or by its systemd unit."""
    named = client_variable(pid)
    if named in owners.clients:
        return named
    unit = systemd_unit(pid)
    if unit is None:
        return None
    for client in owners.clients:
        if fnmatch.fnmatchcase(unit, owners.service_pattern.replace("{client}", client)):
            return client
    return None


def attribute(owners: Owners) -> Callable[[int], tuple[str | None, str | None]]:
    """pid -> (client, role): every loader and its children, the MPS servers, and any other GPU
    process that is a client's service. /proc is read only for GPU processes, once a sample."""
    known: dict[int, tuple[str | None, str | None]] = {pid: (None, "mps-server") for pid in owners.mps_servers}
    for pid, client in owners.loaders.items():
        known[pid] = (client, "loader")
        try:
            for child in psutil.Process(pid).children(recursive=True):
                known[child.pid] = (client, "loader-child")
        except psutil.Error:  # the loader exited (a zombie until the loop reaps it) or is not ours to read
            pass

    def owner(pid: int) -> tuple[str | None, str | None]:
        if pid not in known:
            client = service_client(pid, owners)
            known[pid] = (client, "service") if client is not None else (None, None)
        return known[pid]
    return owner


def client_gpu_memory(gpus: list[GpuSample]) -> dict[str, dict[int, int]]:
    """client -> GPU index -> bytes its processes use there."""
    totals: dict[str, dict[int, int]] = {}
    for gpu in gpus:
        for process in gpu.processes:
            if process.client is not None and process.used_memory_bytes is not None:
                per_gpu = totals.setdefault(process.client, {})
                per_gpu[gpu.index] = per_gpu.get(gpu.index, 0) + process.used_memory_bytes
    return totals


def over_limit(by_gpu: dict[str, dict[int, int]], limits: dict[str, int]) -> dict[str, list[int]]:
    """The GPUs where a client's processes together use more than its per-GPU limit."""
    over = {client: sorted(index for index, used in gpus.items() if used > limits[client])
            for client, gpus in by_gpu.items() if limits.get(client) is not None}
    return {client: indexes for client, indexes in over.items() if indexes}


def take_sample(owners: Owners) -> Telemetry:
    module, error = nvml.nvml()
    now, mono = time.time(), time.monotonic()
    if module is None:
        return Telemetry(False, error, now, mono)
    # NVML started: anything that fails from here on fails this sample only (Sampler.run), and
    # the next one tries again; only NVML that cannot start ends sampling.
    count = module.nvmlDeviceGetCount()
    driver = nvml.text(module.nvmlSystemGetDriverVersion())
    cuda = module.nvmlSystemGetCudaDriverVersion()
    owner = attribute(owners)
    gpus = [sample_gpu(module, index, owner) for index in range(count)]
    by_gpu = client_gpu_memory(gpus)
    return Telemetry(True, None, now, mono, driver, f"{cuda // 1000}.{cuda % 1000 // 10}", gpus,
                     clients={client: sum(used.values()) for client, used in by_gpu.items()},
                     client_gpus=by_gpu, over_limit=over_limit(by_gpu, owners.limits))


class Sampler:
    """Samples every `interval` seconds in its own thread; stops only when NVML cannot start.

    The snapshot stays in this process, behind a lock: only what crosses processes goes
    through the shared-memory channel (and a large host's snapshot has no slot to outgrow)."""

    def __init__(self, interval: float, owners: Callable[[], Owners]):
        self.interval = interval
        self.owners = owners
        self.over: set[tuple[str, int]] = set()  # (client, GPU) over its limit in the last sample
        self.failures = 0  # samples failed in a row
        self.failure_kinds: set[str] = set()  # exception types logged with their traceback in this run of failures
        self.lock = threading.Lock()
        self.latest: Telemetry | None = None
        self.samples = 0  # how many snapshots were taken: tells a reader whether it changed
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="nvml-sampler", daemon=True)

    def snapshot(self) -> tuple[int, Telemetry | None]:
        """(samples taken, the newest snapshot); the snapshot is never changed once published."""
        with self.lock:
            return self.samples, self.latest

    def start(self) -> None:
        self.thread.start()

    def run(self) -> None:
        while True:
            try:
                owners = self.owners()
                snapshot = take_sample(owners)
                self.warn_over_limit(snapshot, owners)
                self.recovered()
                ended = not snapshot.nvml_supported  # NVML could not start, and nvml() never tries again
            except Exception as exc:  # one bad sample must not end telemetry: this thread is its only source
                snapshot, ended = self.failed(exc), False
            with self.lock:
                self.latest, self.samples = snapshot, self.samples + 1
            if ended:
                log.warning(kv("NVML unavailable: no GPU telemetry", reason=snapshot.nvml_init_error))
                return
            if self.stopping.wait(self.interval):
                return

    def failed(self, exc: Exception) -> Telemetry:
        """A failed sample, published the way NVML that cannot start is (nvml_supported=False, so
        /gpu/info shows why and nvml_up is 0) instead of the last good one going stale unnoticed.
        Its traceback is logged once per kind of exception until a sample succeeds, not every interval."""
        self.failures += 1
        error = f"{type(exc).__name__}: {nvml.describe(exc)}"
        if type(exc).__name__ not in self.failure_kinds:
            self.failure_kinds.add(type(exc).__name__)
            log.error(kv("NVML sample failed; GPU telemetry is not refreshed until a sample succeeds, "
                         "sampling goes on", error=error, interval_s=self.interval), exc_info=exc)
        return Telemetry(False, f"NVML sample failed: {error} ({self.failures} samples in a row); sampling "
                                f"goes on every {self.interval:g} s and this clears when one succeeds; the "
                                "supervisor's log has the traceback", time.time(), time.monotonic())

    def recovered(self) -> None:
        if self.failures:
            log.info(kv("NVML samples succeed again", failed_samples=self.failures))
        self.failures, self.failure_kinds = 0, set()

    def warn_over_limit(self, snapshot: Telemetry, owners: Owners) -> None:
        """Once per episode: when a client's processes pass its limit on a GPU, and when they are back under."""
        now_over = {(client, index) for client, indexes in snapshot.over_limit.items() for index in indexes}
        for client, index in sorted(now_over - self.over):
            roles = sorted({p.role for g in snapshot.gpus if g.index == index for p in g.processes
                            if p.client == client})
            log.warning(kv("client's GPU processes together use more than its MPS memory limit; MPS limits each "
                           "CUDA process, not the client", client=client, gpu=index,
                           used_bytes=snapshot.client_gpus[client][index], limit_bytes=owners.limits[client],
                           roles=",".join(r for r in roles if r)))
        for client, index in sorted(self.over - now_over):
            log.info(kv("client back under its MPS memory limit", client=client, gpu=index))
        self.over = now_over

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
