"""A host caught mid-warm-up, served over a real loopback socket: for the web page and `status`.

The answers are the product's own compositions (status.models_status, gpu_info, mps_allocation)
over loader states and an NVML sample written here, so the page and the terminal view are shown
what the API really answers, at a moment (a model 41 % read, a client over its limit, a failed
model) a real warm-up on this machine passes through too quickly to catch.
"""

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from support import free_port
from waitress import wasyncore

from gpu_orchestrator.http import server
from gpu_orchestrator.http.app import create_app
from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.wire import FAILED, LOADING, PENDING, READY, WARMING_UP, LoaderState, ModelProgress
from gpu_orchestrator.supervisor import status
from gpu_orchestrator.supervisor.config import load_config
from gpu_orchestrator.supervisor.nvml import GpuProcess, GpuSample
from gpu_orchestrator.supervisor.telemetry import Telemetry
from gpu_orchestrator.supervisor.warmup import Warmup

GB, GiB, MiB = 1000**3, 1024**3, 1024**2
MISSING = ("model org/reranker-large not found for client synthesizer (STRICT_MODEL_STORE=1: the Hugging Face "
           "cache is not consulted); tried: /srv/models/synthesizer/current/org/reranker-large; "
           "/srv/models/org/reranker-large")
LONG_CLIENT = "fact-checker-with-a-rather-long-service-name-that-will-not-fit"
MODELS = {
    "analyst": [ModelProgress("google/bert_uncased_L-2_H-128_A-2", READY, bytes_done=17_563_000,
                              bytes_total=17_563_000, seconds=0.41, verified=True),
                ModelProgress("mistralai/Mistral-7B-Instruct-v0.3", LOADING, bytes_done=5_300_000_000,
                              bytes_total=12_900_000_000, seconds=14.5)],
    "synthesizer": [ModelProgress("distilgpt2", READY, bytes_done=353_000_000, bytes_total=353_000_000, seconds=1.2),
                    ModelProgress("org/reranker-large", FAILED, seconds=0.01, error=MISSING)],
    LONG_CLIENT: [ModelProgress("sentence-transformers/all-MiniLM-L6-v2", LOADING, bytes_done=30_000_000,
                                bytes_total=91_000_000, seconds=0.6),
                  ModelProgress("org/claims-classifier", PENDING, bytes_total=440_000_000)],
}
PIDS = {"analyst": 4101, "synthesizer": 4102, LONG_CLIENT: 4103}


def config(tmp: Path):
    store = tmp / "store"
    store.mkdir()
    (tmp / "map.json").write_text(json.dumps({c: [m.model for m in models] for c, models in MODELS.items()}))
    limits = {"analyst": 16.0, "synthesizer": 6.0, LONG_CLIENT: 4.0}
    (tmp / "allocation.json").write_text(json.dumps({"mps_resource_allocation": {
        "mps_overhead_gb": 0.5, "agent_allocations": {c: {"mps_memory_limit_gb": gb} for c, gb in limits.items()}}}))
    return load_config(env={"ENABLE_NVML": "true"}, overrides={
        "model_store_root": str(store), "agent_model_map": str(tmp / "map.json"),
        "mps_allocation_config": str(tmp / "allocation.json")})


def telemetry() -> Telemetry:
    processes = [GpuProcess(PIDS["analyst"], 9 * GiB), GpuProcess(PIDS["synthesizer"], int(6.8 * GiB)),
                 GpuProcess(PIDS[LONG_CLIENT], 700 * MiB)]
    for process, client in zip(processes, PIDS):
        process.client, process.role = client, "loader"
    return Telemetry(
        nvml_supported=True, nvml_init_error=None, sampled_at=time.time(), sampled_monotonic=time.monotonic(),
        driver_version="550.54.15", cuda_driver_version="12.4",
        gpus=[GpuSample(0, name="NVIDIA L4", memory_total_bytes=24 * GiB, memory_used_bytes=int(17.2 * GiB),
                        utilization_gpu_percent=71, temperature_celsius=63, power_draw_watts=58.3,
                        power_limit_watts=72.0, compute_mode="EXCLUSIVE_PROCESS", processes=processes)],
        clients={"analyst": 9 * GiB, "synthesizer": int(6.8 * GiB), LONG_CLIENT: 700 * MiB},
        client_gpus={"analyst": {0: 9 * GiB}, "synthesizer": {0: int(6.8 * GiB)}, LONG_CLIENT: {0: 700 * MiB}},
        over_limit={"synthesizer": [0]})


MPS = {"enabled": True, "pipe_dir": "/tmp/nvidia-mps", "log_dir": "/var/log/nvidia-mps", "control_process": True,
       "control_pid": 3990, "managed": True, "servers": [4000], "default_active_thread_percentage": None,
       "restarts": 0, "probed_at": None, "error": None}


class WarmingHost:
    """The source create_app reads, frozen mid-warm-up; records the preloads it is asked for."""

    def __init__(self, tmp: Path):
        self.config, self.telemetry = config(tmp), telemetry()
        self.preloads: list[bool] = []
        now = time.monotonic()
        self.views = [status.ClientView(
            client=client, models=[m.model for m in models], state=states.RUNNING, pid=PIDS[client],
            restarts=1 if client == "analyst" else 0, last_exit=None, fatal_reason=None,
            memory_limit_bytes=self.config.memory_limit_bytes(client),
            published=LoaderState(client, PIDS[client], 2, WARMING_UP, now, models),
            gpu_memory_bytes=self.telemetry.clients[client], rss_bytes=180 * MiB) for client, models in MODELS.items()]
        self.warmup = Warmup(generation=2, started_at=time.time() - 16)

    def models_status(self):
        return status.models_status(self.views, self.warmup)

    def models_status_json(self):
        return json.dumps(self.models_status()).encode()

    def models_summary(self):
        return self.models_status()

    def request_preload(self, refresh):
        self.preloads.append(refresh)
        return 202, {"started": False, **self.models_status()}

    def health(self):
        return {"status": "ok"}

    def gpu_info(self):
        return status.gpu_info(self.config, MPS, self.telemetry)

    def mps_allocation(self):
        return status.mps_allocation(self.config, self.telemetry)


@contextmanager
def serving(source):
    """`source` behind the product's own app and waitress server on a free loopback port."""
    sock = __import__("socket").create_server(("127.0.0.1", free_port()))
    port = sock.getsockname()[1]
    httpd = server.create_server(create_app(source, served=("127.0.0.1", port)), sock, 2)
    thread = threading.Thread(target=httpd.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        # Closed in the loop's own thread (the trigger runs the thunk there): closing its sockets from
        # this one could hand the loop's select() a closed descriptor (EBADF, seen once in CI).
        httpd.trigger.pull_trigger(lambda: wasyncore.close_all(httpd._map))
        thread.join(10)
        httpd.task_dispatcher.shutdown()
