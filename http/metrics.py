"""GET /metrics: Prometheus exposition from the same state /models/status and /gpu/info serve.

A custom collector (prometheus_client) reads the source at scrape time; nothing is
sampled here, and NVML is never called.
"""

import platform
import threading
from importlib import metadata

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gpu_orchestrator.loaders.states import TRANSITIONS

PREFIX = "gpu_orchestrator_"
GiB = 1024**3
GPU_LABELS = ["gpu", "uuid"]
LOADER_STATES = sorted(TRANSITIONS)


def package_version() -> str:
    try:
        return metadata.version("gpu-orchestrator")
    except metadata.PackageNotFoundError:
        return "unknown"


# The methods the app routes; any other token waitress accepts as a method (any upper-case word) is
# counted as "other", so no request can add a series: each label takes a value from a fixed set.
METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS"})


class RequestCounter:
    """Falcon middleware: requests by route template (never the raw path), method and status.

    Each waitress worker thread counts in its own dict, so the hot path takes no lock and no
    increment can be lost: `counts[key] = counts.get(key, 0) + 1` is a read and a write that
    another thread could interleave with, but no other thread ever writes that dict. A scrape
    sums the dicts, copying each with dict(), which runs in C under the GIL without calling back
    into Python (the keys are tuples of str and int), so it never sees a dict mid-resize; a
    count it reads may be one request behind, as any scrape is. Only a thread's first request
    takes the lock, to add its dict to the list.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.local = threading.local()
        self.per_thread: list[dict[tuple[str, str, int], int]] = []

    def process_response(self, req, resp, resource, req_succeeded):
        key = (req.uri_template or "unmatched", req.method if req.method in METHODS else "other", resp.status_code)
        try:
            counts = self.local.counts
        except AttributeError:
            counts = self.local.counts = {}
            with self.lock:
                self.per_thread.append(counts)
        counts[key] = counts.get(key, 0) + 1

    def snapshot(self) -> dict[tuple[str, str, str], int]:
        """Counts so far by (route, method, status as text)."""
        with self.lock:
            copies = [dict(counts) for counts in self.per_thread]
        total: dict[tuple[str, str, str], int] = {}
        for counts in copies:
            for (route, method, code), count in counts.items():
                key = (route, method, str(code))
                total[key] = total.get(key, 0) + count
        return total


def gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, labels=labels)


def gpu_families(info: dict):
    families = {
        "memory_total_bytes": ("gpu_memory_total_bytes", "GPU memory in total", 1),
        "memory_used_bytes": ("gpu_memory_used_bytes", "GPU memory in use", 1),
        "memory_free_bytes": ("gpu_memory_free_bytes", "GPU memory free", 1),
        "utilization_gpu_percent": ("gpu_utilization_ratio", "Share of time a kernel ran (0-1)", 0.01),
        "utilization_memory_percent": ("gpu_memory_utilization_ratio", "Share of time memory was read or written (0-1)", 0.01),
        "temperature_celsius": ("gpu_temperature_celsius", "GPU core temperature", 1),
        "power_draw_watts": ("gpu_power_watts", "Power draw", 1),
        "power_limit_watts": ("gpu_power_limit_watts", "Enforced power limit", 1),
        "clock_sm_mhz": ("gpu_sm_clock_hertz", "SM clock", 1e6),
        "clock_memory_mhz": ("gpu_memory_clock_hertz", "Memory clock", 1e6),
    }
    metrics = {field: gauge(name, doc, GPU_LABELS) for field, (name, doc, _) in families.items()}
    up = gauge("gpu_up", "1 when the GPU answered NVML in the last sample", GPU_LABELS)
    gpu_info = gauge("gpu_info", "GPU identity", GPU_LABELS + ["name", "pci_bus_id", "driver_version"])
    ecc = CounterMetricFamily(PREFIX + "gpu_ecc_uncorrected_errors", "Aggregate uncorrected ECC errors",
                              labels=GPU_LABELS)
    throttled = gauge("gpu_throttled", "1 for each clock throttle reason active now", GPU_LABELS + ["reason"])
    for gpu in info["gpus"]:
        labels = [str(gpu["index"]), gpu["uuid"] or ""]
        up.add_metric(labels, 0 if gpu["error"] else 1)
        if gpu["error"]:
            continue
        gpu_info.add_metric(labels + [gpu["name"] or "", gpu["pci_bus_id"] or "", info["driver_version"] or ""], 1)
        for field, (_, _, scale) in families.items():
            if gpu[field] is not None:
                metrics[field].add_metric(labels, gpu[field] * scale)
        if gpu["ecc_uncorrected_errors"] is not None:
            ecc.add_metric(labels, gpu["ecc_uncorrected_errors"])
        for reason in gpu["throttle_reasons"] or []:
            throttled.add_metric(labels + [reason], 1)
    yield from (up, gpu_info, *metrics.values(), ecc, throttled)
    nvml_enabled = gauge("nvml_enabled", "1 when NVML telemetry is configured (ENABLE_NVML=true)", [])
    nvml_enabled.add_metric([], 1 if info["nvml_enabled"] else 0)
    nvml_up = gauge("nvml_up", "1 when NVML telemetry is enabled and working", [])
    nvml_up.add_metric([], 1 if info["nvml_supported"] else 0)
    yield nvml_enabled
    yield nvml_up
    if info["age_s"] is not None:
        age = gauge("telemetry_age_seconds", "Age of the last NVML sample", [])
        age.add_metric([], info["age_s"])
        yield age


def gpu_uuids(info: dict) -> dict[str, str]:
    """Each GPU index's uuid, so that every per-GPU series carries both labels. A GPU gone from
    NVML's count is listed after those present at its last index, which one of them may hold now."""
    uuids: dict[str, str] = {}
    for gpu in info["gpus"]:
        uuids.setdefault(str(gpu["index"]), gpu["uuid"] or "")
    return uuids


def client_families(status: dict):
    ready = gauge("client_ready", "1 when every model of the client is ready", ["client"])
    models_ready = gauge("client_models_ready", "Models ready", ["client"])
    models_failed = gauge("client_models_failed", "Models failed", ["client"])
    restarts = CounterMetricFamily(PREFIX + "loader_restarts", "Loader restarts", labels=["client"])
    state = gauge("loader_state", "1 for the loader's current state", ["client", "state"])
    rss = gauge("loader_rss_bytes", "Resident memory of the client's loader (read every 10 s)", ["client"])
    warmup = gauge("model_warmup_seconds", "Seconds the model's last warm-up took", ["client", "model"])
    model_ready = gauge("model_ready", "1 when the model is ready", ["client", "model"])
    model_bytes = gauge("model_bytes", "Bytes of the model's snapshot", ["client", "model"])
    bytes_done = gauge("warmup_bytes_done", "Bytes of the client's models read in the current or last warm-up",
                       ["client"])
    # Not warmup_bytes_total: a gauge must not carry a counter's _total suffix.
    bytes_known = gauge("warmup_known_bytes", "Bytes of the client's models known so far", ["client"])
    for name, client in status["clients"].items():
        ready.add_metric([name], 1 if client["ready"] else 0)
        models_ready.add_metric([name], sum(m["status"] == "ready" for m in client["models"]))
        models_failed.add_metric([name], sum(m["status"] == "failed" for m in client["models"]))
        restarts.add_metric([name], client["restarts"])
        for each in LOADER_STATES:
            state.add_metric([name, each], 1 if client["state"] == each else 0)
        if client["rss_bytes"] is not None:
            rss.add_metric([name], client["rss_bytes"])
        for model in client["models"]:
            labels = [name, model["model"]]
            if model["status"] in ("ready", "failed"):
                warmup.add_metric(labels, model["seconds"])
            model_ready.add_metric(labels, 1 if model["status"] == "ready" else 0)
            model_bytes.add_metric(labels, model["bytes_total"])
        bytes_done.add_metric([name], sum(m["bytes"] for m in client["models"]))
        bytes_known.add_metric([name], sum(m["bytes_total"] for m in client["models"]))
    yield from (ready, models_ready, models_failed, restarts, state, rss, warmup, model_ready, model_bytes,
                bytes_done, bytes_known)
    all_ready = gauge("all_ready", "1 when every model of every client is ready", [])
    all_ready.add_metric([], 1 if status["all_ready"] else 0)
    in_progress = gauge("warmup_in_progress", "1 while a warm-up runs", [])
    in_progress.add_metric([], 1 if status["in_progress"] else 0)
    yield all_ready
    yield in_progress


def client_gpu_families(info: dict, status: dict):
    """What each client's processes (loader, its children, its service) use per GPU, and whether
    together they pass the client's limit there: MPS limits each CUDA process, not the client.
    Memory that cannot be known (null in /gpu/info) has no series, and nor has an over-limit
    state that cannot be: absent, never 0."""
    memory = gauge("client_gpu_memory_bytes", "GPU memory used by the client's processes (loader, service)",
                   ["client", *GPU_LABELS])
    over = gauge("client_over_limit", "1 when the client's processes together use more than its limit on a GPU",
                 ["client"])
    use = info["clients"]
    uuids = gpu_uuids(info)
    for name, client in sorted(use.items()):
        for gpu, used in client["gpus"].items():
            if used is not None:
                memory.add_metric([name, gpu, uuids.get(gpu, "")], used)
    if info["nvml_supported"]:
        for name, client in status["clients"].items():
            state = use.get(name, {}).get("over_limit", False)
            if client["memory_limit_bytes"] is not None and state is not None:
                over.add_metric([name], 1 if state else 0)
    yield from (memory, over)


def mps_families(info: dict, status: dict, allocation: dict):
    """MPS in force, its restarts, each client's pinned limit, and what the limits commit per GPU."""
    configured = gauge("mps_enabled", "1 when MPS is configured (ENABLE_MPS=true), whether or not it answers", [])
    configured.add_metric([], 1 if info["mps_configured"] else 0)
    mps_up = gauge("mps_up", "1 when MPS limits are in force for new loaders (0 also when MPS is off)", [])
    mps_up.add_metric([], 1 if info["mps_enabled"] else 0)
    restarts = CounterMetricFamily(PREFIX + "mps_restarts", "Restarts of the MPS control daemon", labels=[])
    restarts.add_metric([], info["mps"]["restarts"])
    limit = gauge("client_memory_limit_bytes", "The client's memory limit (MPS pinned limit per GPU it sees)",
                  ["client"])
    for name, client in status["clients"].items():
        if client["memory_limit_bytes"] is not None:
            limit.add_metric([name], client["memory_limit_bytes"])
    summary = allocation["mps_resource_allocation"]["system_summary"]
    overcommitted = gauge("mps_overcommitted", "1 when the MPS limits exceed the GPU memory present", [])
    overcommitted.add_metric([], 1 if summary.get("overcommitted") else 0)
    committed = gauge("gpu_mps_memory_limit_bytes", "Sum of the pinned limits of the clients that can use the GPU",
                      GPU_LABELS)
    uuids = gpu_uuids(info)
    for gpu in summary.get("per_gpu", []):
        index = str(gpu["index"])
        committed.add_metric([index, uuids.get(index, "")], round(gpu["mps_memory_limit_gb"] * GiB))
    yield from (configured, mps_up, restarts, limit, overcommitted, committed)


class OrchestratorCollector:
    def __init__(self, source, requests: RequestCounter):
        self.source = source
        self.requests = requests
        self.version = package_version()

    def collect(self):
        status = self.source.models_status()
        info = self.source.gpu_info()
        build = gauge("build_info", "Build and runtime versions", ["version", "python"])
        build.add_metric([self.version, platform.python_version()], 1)
        yield build
        yield from gpu_families(info)
        yield from client_families(status)
        yield from client_gpu_families(info, status)
        yield from mps_families(info, status, self.source.mps_allocation())
        http = CounterMetricFamily(PREFIX + "http_requests", "HTTP requests by route, method and status",
                                   labels=["route", "method", "status"])
        for (route, method, code), count in sorted(self.requests.snapshot().items()):
            http.add_metric([route, method, code], count)
        yield http


class Metrics:
    def __init__(self, source, requests: RequestCounter):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(OrchestratorCollector(source, requests))
        # The standard process_* and python_* series (CPU, memory, descriptors, GC), as every
        # Prometheus client exposes them: fleet dashboards and alerts expect them by these names.
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)

    def on_get(self, req, resp):
        resp.content_type = CONTENT_TYPE_LATEST
        resp.cache_control = ["no-store"]
        resp.data = generate_latest(self.registry)
