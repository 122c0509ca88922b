"""NVML telemetry: a sampler thread in the supervisor takes one snapshot per interval and
keeps it behind a lock (it never crosses a process, so it is not on the shared-memory
channel). Requests only ever read that snapshot.

A field a GPU does not support becomes None and is named, with the reason, in the
GPU's `unsupported` list, whatever the read raised (an NVMLError, or e.g. nvidia-ml-py 13's
NVMLLibraryMismatchError for a function the driver's NVML lacks); a GPU that fails as a whole
(lost, or every field failing as a lost GPU's do) carries its `error` while the others are
still reported, and so does a GPU seen earlier that has left NVML's device count; NVML that
cannot start gives nvml_supported=False, and so does a sample that fails as a whole (any
exception outside one field's read: the sampler thread must outlive it), with the error,
until a sample succeeds again.

Each GPU process is attributed to a client: its loader and the loader's children;
the client's own service, found by its systemd unit (from /proc/PID/cgroup, matched
against a pattern such as `*@{client}.service`) or by the GPU_ORCHESTRATOR_CLIENT
variable that `gpu-orchestrator exec` puts in its environment. MPS limits apply
per CUDA process, so a client whose processes together pass its limit on a GPU is
flagged as over its limit. Memory that cannot be known (a process NVML gives no figure for,
as under MPS; a GPU lost or gone where the client had processes; a GPU whose process list
cannot be read) is None, never 0, and whether the client is over its limit there is unknown.
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
from gpu_orchestrator.supervisor.systemd import unit_form
from gpu_orchestrator.supervisor.nvml import GpuSample, sample_gpu

log = logging.getLogger("telemetry")


class Telemetry(msgspec.Struct, tag="telemetry"):
    nvml_supported: bool
    nvml_init_error: str | None
    sampled_at: float  # wall clock
    sampled_monotonic: float
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[GpuSample] = []
    # client -> GPU memory bytes of all its processes, every GPU; None when any of it is unknown
    clients: dict[str, int | None] = {}
    # client -> GPU index -> bytes of its processes there; None where unknown
    client_gpus: dict[str, dict[int, int | None]] = {}
    over_limit: dict[str, list[int]] = {}  # client -> GPUs where its processes together pass its limit
    # client (with a limit) -> GPUs where its memory is unknown, so whether it is over there is too
    over_limit_unknown: dict[str, list[int]] = {}

    def client_over_limit(self, client: str) -> bool | None:
        """True when over its limit on some GPU, None when that cannot be known, else False."""
        if client in self.over_limit:
            return True
        return None if client in self.over_limit_unknown else False


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
        if fnmatch.fnmatchcase(unit, service_unit(owners.service_pattern, client)):
            return client
    return None


def service_unit(pattern: str, client: str) -> str:
    """The unit name (or glob) of `client`'s service: its name as systemd writes it in unit names
    (`fact checker` is `gpu-client@fact\\x20checker.service`). Not str.format: the pattern may hold
    other braces."""
    return pattern.replace("{client}", unit_form(client))


def children_map() -> dict[int, list[int]]:
    """parent pid -> its children's pids, from one pass over the process table."""
    children: dict[int, list[int]] = {}
    for process in psutil.process_iter(["ppid"]):
        parent = process.info["ppid"]  # None when it could not be read (the process went away)
        if parent is not None:
            children.setdefault(parent, []).append(process.pid)
    return children


def attribute(owners: Owners) -> Callable[[int], tuple[str | None, str | None]]:
    """pid -> (client, role): every loader and its children, the MPS servers, and any other GPU
    process that is a client's service. The process table is read once a sample (not once per
    loader: that grew with the square of the loaders), /proc/PID files only for GPU processes."""
    known: dict[int, tuple[str | None, str | None]] = {pid: (None, "mps-server") for pid in owners.mps_servers}
    children = children_map() if owners.loaders else {}
    for pid, client in owners.loaders.items():
        known[pid] = (client, "loader")
        below, walked = list(children.get(pid, ())), {pid}
        while below:
            child = below.pop()
            if child in walked:  # pid reuse while the table was read cannot make this loop forever
                continue
            walked.add(child)
            known[child] = (client, "loader-child")
            below.extend(children.get(child, ()))

    def owner(pid: int) -> tuple[str | None, str | None]:
        if pid not in known:
            client = service_client(pid, owners)
            known[pid] = (client, "service") if client is not None else (None, None)
        return known[pid]
    return owner


@dataclass
class Seen:
    """What earlier samples found, for GPUs that stop answering: each uuid's last index and name
    (a GPU that leaves NVML's device count is still reported, as lost, and one lost in place gets
    back its uuid) and the clients that had processes on it when it last answered."""

    gpus: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # uuid -> (last index, name)
    clients_on: dict[str, set[str]] = field(default_factory=dict)  # uuid -> clients with processes there

    def update(self, gpus: list[GpuSample]) -> list[GpuSample]:
        """This sample's GPUs, a lost one with the uuid its index last had, then every GPU seen
        since start that NVML no longer counts, as lost at its last index."""
        present = {gpu.uuid for gpu in gpus if gpu.uuid}
        for gpu in gpus:
            if gpu.error is not None and gpu.uuid is None:
                last = next((uuid for uuid, (index, _) in self.gpus.items()
                             if index == gpu.index and uuid not in present), None)
                if last is not None:
                    gpu.uuid, gpu.name = last, gpu.name or self.gpus[last][1]
                    present.add(last)
            elif gpu.error is None and gpu.uuid:
                self.gpus[gpu.uuid] = (gpu.index, gpu.name)
                if not processes_unknown(gpu):
                    self.clients_on[gpu.uuid] = {p.client for p in gpu.processes if p.client is not None}
        gone = [GpuSample(index, uuid=uuid, name=name,
                          error=f"GPU no longer in NVML's device count (last seen as GPU {index})")
                for uuid, (index, name) in sorted(self.gpus.items(), key=lambda item: item[1][0])
                if uuid not in present]
        return gpus + gone


def processes_unknown(gpu: GpuSample) -> bool:
    """The GPU answers but its process list could not be read."""
    return any(entry.startswith("processes:") for entry in gpu.unsupported)


def unknown_memory(gpus: list[GpuSample], seen: Seen, clients: tuple[str, ...]) -> dict[str, set[int]]:
    """client -> GPU indexes where its memory cannot be known: a GPU that is lost or gone, where it
    had processes when that GPU last answered; a GPU whose process list cannot be read, for every
    client (any of them may run there)."""
    unknown: dict[str, set[int]] = {}
    for gpu in gpus:
        if gpu.error is not None:
            on = seen.clients_on.get(gpu.uuid, set()) if gpu.uuid else set()
        elif processes_unknown(gpu):
            on = set(clients)
        else:
            continue
        for client in on:
            unknown.setdefault(client, set()).add(gpu.index)
    return unknown


def client_gpu_memory(gpus: list[GpuSample],
                      unknown: dict[str, set[int]] | None = None) -> dict[str, dict[int, int | None]]:
    """client -> GPU index -> bytes its processes use there; None where any of them has no figure
    (NVML gives none, e.g. under MPS) or the GPU is in `unknown` for it."""
    totals: dict[str, dict[int, int | None]] = {}
    for gpu in gpus:
        for process in gpu.processes:
            if process.client is None:
                continue
            per_gpu = totals.setdefault(process.client, {})
            before, used = per_gpu.get(gpu.index, 0), process.used_memory_bytes
            per_gpu[gpu.index] = None if before is None or used is None else before + used
    for client, indexes in (unknown or {}).items():
        per_gpu = totals.setdefault(client, {})
        for index in indexes:  # a gone GPU's last index may be another GPU's now: that one's figure stays
            per_gpu.setdefault(index, None)
    return totals


def over_limit(by_gpu: dict[str, dict[int, int | None]], limits: dict[str, int]) -> dict[str, list[int]]:
    """The GPUs where a client's processes together use more than its per-GPU limit (known figures only)."""
    over = {client: sorted(index for index, used in gpus.items() if used is not None and used > limits[client])
            for client, gpus in by_gpu.items() if limits.get(client) is not None}
    return {client: indexes for client, indexes in over.items() if indexes}


def take_sample(owners: Owners, seen: Seen | None = None) -> Telemetry:
    """One sample. `seen` is the sampler's memory of earlier samples (a fresh one without it)."""
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
    seen = seen if seen is not None else Seen()
    gpus = seen.update([sample_gpu(module, index, owner) for index in range(count)])
    unknown = unknown_memory(gpus, seen, owners.clients)
    by_gpu = client_gpu_memory(gpus, unknown)
    totals = {client: None if client in unknown or None in used.values() else sum(used.values())
              for client, used in by_gpu.items()}
    undecided = {client: sorted(index for index, used in used_by.items() if used is None)
                 for client, used_by in by_gpu.items()
                 if owners.limits.get(client) is not None and None in used_by.values()}
    return Telemetry(True, None, now, mono, driver, f"{cuda // 1000}.{cuda % 1000 // 10}", gpus,
                     clients=totals, client_gpus=by_gpu, over_limit=over_limit(by_gpu, owners.limits),
                     over_limit_unknown=undecided)


class Sampler:
    """Samples every `interval` seconds in its own thread; stops only when NVML cannot start.

    The snapshot stays in this process, behind a lock: only what crosses processes goes
    through the shared-memory channel (and a large host's snapshot has no slot to outgrow)."""

    def __init__(self, interval: float, owners: Callable[[], Owners]):
        self.interval = interval
        self.owners = owners
        self.over: set[tuple[str, int]] = set()  # (client, GPU) over its limit (as far as known) in the last sample
        self.seen = Seen()  # the GPUs and their clients earlier samples found
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
                snapshot = take_sample(owners, self.seen)
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
        """Once per episode: when a client's processes pass its limit on a GPU, and when they are back
        under. Where its memory is unknown now (a lost GPU, a process without a figure) the episode
        neither ends nor begins: it stays as it was until a figure says."""
        unknown = {(client, index) for client, indexes in snapshot.over_limit_unknown.items() for index in indexes}
        now_over = {(client, index) for client, indexes in snapshot.over_limit.items() for index in indexes}
        now_over |= self.over & unknown
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
