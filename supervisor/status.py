"""The views the HTTP API serves, composed from loader records and their slots.

Pure functions over a snapshot the loop published (answers.py), so they
are tested without processes. A slot counts only when it was written by the
loader process that is alive now: a dead loader's last words never make a model
look ready.
"""

import functools
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import msgspec

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.wire import FAILED, LOADING, PENDING, READY, LoaderState, ModelProgress
from gpu_orchestrator.supervisor.config import Config, GiB, GpuMemory
from gpu_orchestrator.supervisor.telemetry import Telemetry
from gpu_orchestrator.supervisor.warmup import Warmup, finished


@dataclass(frozen=True)
class ClientView:
    client: str
    models: list[str]
    state: str
    pid: int | None
    restarts: int
    last_exit: str | None
    fatal_reason: str | None
    memory_limit_bytes: int | None
    published: LoaderState | None  # None unless written by the live loader
    gpu_memory_bytes: int | None = None  # from the last NVML sample, when there is one
    rss_bytes: int | None = None


def percentage(answer: str | None) -> float | None:
    """The daemon's answer to get_default_active_thread_percentage ("100.0") as a number."""
    try:
        return float(answer) if answer is not None else None
    except ValueError:
        return None


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


def effective_models(view: ClientView, generation: int) -> list[ModelProgress]:
    """What is true of each model in the current warm-up, whatever the loader managed to publish.
    Until the loader has taken up this warm-up its models are pending: what it said of an earlier
    one (all ready, before a refresh) would count as done while the client is not ready."""
    if view.state == states.FATAL:
        error = f"loader for client {view.client} is FATAL: {view.fatal_reason}"
        return [ModelProgress(model, status=FAILED, error=error) for model in view.models]
    if view.published is None or view.published.generation < generation:
        return [ModelProgress(model) for model in view.models]
    return view.published.models


def client_settled(view: ClientView, generation: int) -> bool:
    """The client has finished the current warm-up, one way or the other (or none was asked for)."""
    return view.state == states.FATAL or generation == 0 or finished(view.published, generation)


def model_detail(model: ModelProgress) -> dict:
    rate, eta = model.rate_and_eta()
    return {
        "model": model.model, "status": model.status, "bytes": model.bytes_done,
        "bytes_total": model.bytes_total, "rate_bytes_per_s": rounded(rate), "eta_s": rounded(eta),
        "weight_bytes": model.weight_bytes,
        "parameters": model.parameters, "format": model.format, "seconds": model.seconds,
        "verified": model.verified, "backend": model.backend, "device": model.device,
        "device_memory_bytes": model.device_memory_bytes, "embedding_dim": model.embedding_dim,
        "note": model.note, "path": model.path, "error": model.error,
    }


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def client_progress(models: list[ModelProgress]) -> dict:
    """The client's bytes read of those known (a model's size is known once its loader has planned
    it), at the rate of the model being read; the ETA covers what is left of the loading and
    pending models at that rate."""
    rate = next((r for m in models if m.status == LOADING and (r := m.rate_and_eta()[0])), None)
    left = sum(max(0, m.bytes_total - m.bytes_done) for m in models if m.status in (LOADING, PENDING))
    return {"bytes": sum(m.bytes_done for m in models), "bytes_total": sum(m.bytes_total for m in models),
            "rate_bytes_per_s": rounded(rate), "eta_s": rounded(left / rate) if rate else None}


@dataclass(frozen=True)
class ClientPart:
    """One client's share of /models/status, composed once per change of its view: everything but
    its heartbeat age (which moves with the clock), as a dict and as the JSON around that age."""

    client: str
    head: dict  # the keys before heartbeat_age_s
    tail: dict  # progress and models, after it
    entry_head: bytes  # its entry's JSON up to the age: the name, `head` and the age's key
    entry_tail: bytes  # the rest after the age: `tail` and the closing brace
    counts: tuple[int, int, int, int]  # pending, loading, ready, failed
    errors: list
    settled: bool


def client_part(view: ClientView, generation: int) -> ClientPart:
    models = effective_models(view, generation)
    counts = {PENDING: 0, LOADING: 0, READY: 0, FAILED: 0}
    errors = []
    for model in models:
        counts[model.status] += 1
        if model.status == FAILED:
            errors.append({"agent": view.client, "model": model.model, "error": model.error})
    settled = client_settled(view, generation)
    head = {
        "state": view.state,
        "pid": view.pid,
        "restarts": view.restarts,
        "ready": generation > 0 and settled and all(m.status == READY for m in models),
        "in_progress": not settled,
        "last_exit": view.last_exit,
        "error": view.fatal_reason,
        "memory_limit_bytes": view.memory_limit_bytes,
        "gpu_memory_bytes": view.gpu_memory_bytes,
        "rss_bytes": view.rss_bytes,
    }
    tail = {"progress": client_progress(models), "models": [model_detail(m) for m in models]}
    encode = msgspec.json.encode
    return ClientPart(view.client, head, tail, b"%s:%s,\"heartbeat_age_s\":" % (encode(view.client), encode(head)[:-1]),
                      b"," + encode(tail)[1:], (counts[PENDING], counts[LOADING], counts[READY], counts[FAILED]),
                      errors, settled)


def heartbeat_age(heartbeat: float | None, now: float) -> float | None:
    return round(now - heartbeat, 3) if heartbeat is not None else None


class Frame:
    """/models/status but for its heartbeat ages: the totals, the errors and every client's entry,
    made once per change of a part, the warm-up or `extra` (keys after the clients). The ages move
    with the clock, so each answer puts them in (`json`, `current`): one number per client, while
    everything else costs only when something changed."""

    def __init__(self, parts: tuple[ClientPart, ...], warmup: Warmup, extra: dict | None = None, preload: bool = False):
        self.parts, self.warmup, self.extra = parts, warmup, extra or {}
        pending = loading = ready = failed = 0
        # The boot's warm-up (`preload`) is under way from the start, before MPS lets it begin.
        errors, in_progress = [], preload and warmup.generation == 0
        for part in parts:
            p, lo, r, f = part.counts
            pending, loading, ready, failed = pending + p, loading + lo, ready + r, failed + f
            errors += part.errors
            in_progress |= not part.settled
        total = pending + loading + ready + failed
        self.top = {  # what /ready answers from; the same dict for as long as this frame serves
            "in_progress": in_progress,
            "all_ready": warmup.generation > 0 and not in_progress and ready == total,
            "summary": {"total": total, "done": ready, "failed": failed, "loading": loading, "pending": pending},
            "errors": errors,
            "generation": warmup.generation,
            "refresh": warmup.refresh,
            "started_at": iso(warmup.started_at),
            "finished_at": iso(warmup.finished_at),
        }
        encode = msgspec.json.encode
        self.opening = encode(self.top)[:-1] + b',"clients":{'
        self.closing = b"}" + b"".join(b",%s:%s" % (encode(k), encode(v)) for k, v in self.extra.items()) + b"}"

    def json(self, heartbeats: list[float | None], now: float) -> bytes:
        """The whole answer's JSON, with each client's age from its heartbeat (None: none read)."""
        encode = msgspec.json.encode
        chunks = [self.opening]  # joined once: each entry's bytes are copied once
        for part, heartbeat in zip(self.parts, heartbeats):
            chunks += (part.entry_head, encode(heartbeat_age(heartbeat, now)), part.entry_tail, b",")
        if self.parts:
            chunks.pop()  # the last entry's comma
        chunks.append(self.closing)
        return b"".join(chunks)

    def current(self, heartbeats: list[float | None], now: float) -> dict:
        """The same answer as a dict."""
        clients = {part.client: {**part.head, "heartbeat_age_s": heartbeat_age(heartbeat, now), **part.tail}
                   for part, heartbeat in zip(self.parts, heartbeats)}
        return {**self.top, "clients": clients, **self.extra}


class Composed:
    """One /models/status answer: its JSON at once (what the route sends), its dict when asked."""

    def __init__(self, frame: Frame, heartbeats: list[float | None], now: float):
        self.frame, self.heartbeats, self.now = frame, heartbeats, now
        self.encoded = frame.json(heartbeats, now)
        self.top = frame.top  # everything but the clients: the same dict while the frame serves

    @functools.cached_property
    def current(self) -> dict:
        return self.frame.current(self.heartbeats, self.now)


def models_status(views: list[ClientView], warmup: Warmup, now: float | None = None, preload: bool = False) -> dict:
    now = time.monotonic() if now is None else now
    frame = Frame(tuple(client_part(view, warmup.generation) for view in views), warmup, preload=preload)
    return frame.current([view.published.heartbeat if view.published else None for view in views], now)


def status_line(current: dict, generation: int, mps_down: bool) -> str:
    """systemd's STATUS= from a composed /models/status: what `systemctl status` shows at a glance."""
    clients = current["clients"]
    ready = sum(c["ready"] for c in clients.values())
    failed = sorted(name for name, c in clients.items() if any(m["status"] == "failed" for m in c["models"]))
    line = f"{ready}/{len(clients)} clients ready"
    if generation == 0:
        return f"{line}; no warm-up requested yet"
    if current["in_progress"]:
        summary = current["summary"]
        line = f"warming up: {line}, {summary['done']}/{summary['total']} models"
    if failed:
        line += f", {len(failed)} failed: {','.join(failed)}"
    if mps_down:
        line += "; MPS down"
    return line


def allocation_summary(config: Config, gpu_memory: dict[int, int] | None = None) -> dict:
    """system_summary recomputed from the validated allocations; the stored one is never trusted.

    The field's eight keys come first, under the field's names, then ours. With `gpu_memory`
    (NVML index -> bytes of each healthy GPU) over-commit is judged per GPU, less the MPS
    overhead: a pinned limit caps a client on every GPU it can see (its `devices`, else all),
    so two clients pinned to GPU 0 can over-commit it on a host whose total looks ample.
    Without NVML it is judged against what the file says is available (GpuMemory).
    """
    allocations = config.allocations
    limits = [a.mps_memory_limit_gb for a in allocations.values()]
    allocated = sum(limits, 0.0)  # floats even with no allocation: 0.0, never the integer 0
    calculated = sum(a.calculated_requirement_gb or 0.0 for a in allocations.values())
    summary = {
        "total_agents": len(allocations),
        "total_allocated_memory_gb": round(allocated, 3),
        "total_calculated_memory_gb": round(calculated, 3),
        "total_safety_margin_gb": round(sum(a.safety_margin_gb or 0.0 for a in allocations.values()), 3),
        "average_allocation_gb": round(allocated / len(limits), 3) if limits else None,
        "max_allocation_gb": max(limits, default=None),
        "min_allocation_gb": min(limits, default=None),
        "memory_efficiency_percent": round(100 * calculated / allocated, 1) if allocated else None,
        "agents_without_allocation": sorted(set(config.clients) - set(allocations)),
    }
    declared = config.gpu_memory or GpuMemory(None, None)
    if gpu_memory:
        per_gpu = [gpu_commitment(allocations, index, memory, declared.overhead_gb)
                   for index, memory in sorted(gpu_memory.items())]
        overcommitted = any(gpu["overcommitted"] for gpu in per_gpu)
        overcommit = sum(gpu["overcommit_gb"] for gpu in per_gpu)
        total, source = round(sum(gpu["available_gb"] for gpu in per_gpu), 3), "nvml"
    elif declared.available_gb is not None:
        total, source = declared.available_gb, declared.source
        overcommitted, overcommit = allocated > total, max(0.0, allocated - total)
    else:
        total = source = overcommitted = overcommit = None  # nothing to judge against
    summary["overcommitted"] = overcommitted
    summary["overcommit_gb"] = None if overcommit is None else round(overcommit, 3)
    if gpu_memory:
        summary["per_gpu"] = per_gpu
        summary["devices_not_present"] = {
            client: missing for client, a in sorted(allocations.items())
            if (missing := [d for d in a.devices or () if d not in gpu_memory])}
    summary["gpu_memory_total_gb"] = total
    summary["gpu_memory_total_source"] = source
    return summary


def gpu_commitment(allocations: dict, index: int, memory_bytes: int, overhead_gb: float = 0.0) -> dict:
    """The pinned limits that apply on one GPU against its memory less the MPS server's share."""
    clients = sorted(c for c, a in allocations.items() if a.devices is None or index in a.devices)
    limit = sum(allocations[c].mps_memory_limit_gb for c in clients)
    memory = round(memory_bytes / GiB, 3)
    available = round(memory - overhead_gb, 3)
    return {"index": index, "memory_gb": memory, "available_gb": available,
            "mps_memory_limit_gb": round(limit, 3), "clients": clients,
            "overcommitted": limit > available, "overcommit_gb": round(max(0.0, limit - available), 3)}


def overcommit_warnings(summary: dict) -> list[dict]:
    """What the log says about a summary that over-commits: one entry per GPU, or one for the total."""
    if not summary["overcommitted"]:
        return []
    if "per_gpu" not in summary:
        return [{"gpu": "all", "limits_gb": summary["total_allocated_memory_gb"],
                 "gpu_gb": summary["gpu_memory_total_gb"], "over_gb": summary["overcommit_gb"],
                 "source": summary["gpu_memory_total_source"]}]
    return [{"gpu": gpu["index"], "limits_gb": gpu["mps_memory_limit_gb"], "gpu_gb": gpu["available_gb"],
             "over_gb": gpu["overcommit_gb"], "clients": ",".join(gpu["clients"]), "source": "nvml"}
            for gpu in summary["per_gpu"] if gpu["overcommitted"]]


def overcommit_findings(config: Config, telemetry: Telemetry | None) -> list[tuple[str, dict]]:
    """What the log warns about an allocation, judged as /mps/allocation judges it: per GPU against
    what the NVML sample found, else against the configured total. Flagged, never refused."""
    summary = allocation_summary(config, gpu_memory_present(telemetry))
    findings = [("MPS allocations over-commit the GPU memory; clients may run out of memory", fields)
                for fields in overcommit_warnings(summary)]
    return findings + [("client is pinned to GPUs NVML does not see; it will find no such device",
                        {"client": client, "devices": ",".join(map(str, devices))})
                       for client, devices in summary.get("devices_not_present", {}).items()]


def gpu_memory_present(telemetry: Telemetry | None) -> dict[int, int] | None:
    """NVML index -> total memory of each GPU NVML sees healthy, or None without telemetry."""
    if telemetry is None or not telemetry.nvml_supported:
        return None
    return {g.index: g.memory_total_bytes for g in telemetry.gpus if g.error is None and g.memory_total_bytes} or None


def mps_allocation(config: Config, telemetry: Telemetry | None = None) -> dict:
    """The allocation file as given, every key in its place, with system_summary recomputed."""
    document = config.allocation_document
    section = document["mps_resource_allocation"]
    summary = allocation_summary(config, gpu_memory_present(telemetry))
    return {**document, "mps_resource_allocation": {**section, "system_summary": summary},
            "source": config.allocation_path or None}


def mps_disabled(config: Config) -> dict:
    """The `mps` part of the answers when ENABLE_MPS is off: the keys MpsDaemon.report() has."""
    return {"enabled": False, "pipe_dir": config.mps_pipe_dir, "log_dir": config.mps_log_dir,
            "control_process": False, "control_pid": None, "managed": False, "servers": [],
            "default_active_thread_percentage": None, "restarts": 0, "probed_at": None,
            "error": "ENABLE_MPS is not true"}


def client_gpu_use(config: Config, telemetry: Telemetry) -> dict:
    """Per client: its GPU processes (loader, loader-child, service) with their memory, the sum per
    GPU and in all (None where unknown), its limit, and the GPUs where its processes together pass it."""
    processes: dict[str, list[dict]] = {}
    for gpu in telemetry.gpus:
        for process in gpu.processes:
            if process.client is not None:
                processes.setdefault(process.client, []).append(
                    {"pid": process.pid, "gpu": gpu.index, "role": process.role,
                     "used_memory_bytes": process.used_memory_bytes})
    return {client: {"gpu_memory_bytes": telemetry.clients.get(client),
                     "gpus": {str(index): used for index, used in sorted(telemetry.client_gpus.get(client, {}).items())},
                     "memory_limit_bytes": config.memory_limit_bytes(client) if client in config.clients else None,
                     "over_limit": telemetry.client_over_limit(client),
                     "over_limit_gpus": telemetry.over_limit.get(client, []),
                     "processes": processes.get(client, [])}
            for client in sorted(set(telemetry.clients) | set(processes))}


def gpu_info(config: Config, mps: dict | None, telemetry: Telemetry | None, now: float | None = None) -> dict:
    """GPU state from the sampler's last snapshot; never touches NVML or a subprocess."""
    now = time.monotonic() if now is None else now
    mps = mps or mps_disabled(config)
    info = {
        "available": False,
        "gpus": [],
        "clients": {},
        "nvml_enabled": config.enable_nvml,
        "nvml_supported": False,
        "nvml_init_error": "ENABLE_NVML is not true",
        "driver_version": None,
        "cuda_driver_version": None,
        "sampled_at": None,
        "age_s": None,
        "mps_configured": config.enable_mps,
        "mps_enabled": mps["enabled"],
        # The types of the rest of the answer: an ISO time, a number, and null where there is
        # nothing to judge (as /mps/allocation says), never false for "unknown".
        "mps": {**mps, "probed_at": iso(mps["probed_at"]),
                "default_active_thread_percentage": percentage(mps["default_active_thread_percentage"]),
                "allocation_overcommitted": allocation_summary(config, gpu_memory_present(telemetry))["overcommitted"]},
    }
    if not config.enable_nvml:
        return info
    if telemetry is None:
        return {**info, "nvml_init_error": "no sample yet: the NVML sampler is starting"}
    return with_age({
        **info,
        "available": any(gpu.error is None for gpu in telemetry.gpus),
        "gpus": [msgspec.structs.asdict(gpu) for gpu in telemetry.gpus],
        "clients": client_gpu_use(config, telemetry),
        "nvml_supported": telemetry.nvml_supported,
        "nvml_init_error": telemetry.nvml_init_error,
        "driver_version": telemetry.driver_version,
        "cuda_driver_version": telemetry.cuda_driver_version,
        "sampled_at": iso(telemetry.sampled_at),
    }, telemetry, now)


def with_age(info: dict, telemetry: Telemetry | None, now: float) -> dict:
    """/gpu/info with the sample's age now: the one key that moves with the clock. An answer
    without a sample has none, and is returned as it is."""
    if telemetry is None or info["sampled_at"] is None:
        return info
    return {**info, "age_s": round(now - telemetry.sampled_monotonic, 3)}
