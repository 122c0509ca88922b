"""The fleet files against live processes: the metrics listener, a real Prometheus (Debian's package)
scraping it with the shipped alert rules and running every query of the shipped Grafana dashboard,
and the Kubernetes example's gate init container run as written against a live orchestrator."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import nvml_hosts
from support import Orchestrator, free_port, request, status_code, wait_for, write_config

REPO = Path(__file__).resolve().parents[2]
FAKES = REPO / "tests" / "fakes" / "bin"
RULES = REPO / "scripts" / "prometheus" / "gpu-orchestrator.rules.yml"
DASHBOARD = REPO / "scripts" / "grafana" / "gpu-orchestrator.json"
WORKLOAD = REPO / "scripts" / "kubernetes" / "example-workload.yaml"


@pytest.fixture(scope="module")
def fleet_orch(tmp_path_factory, request):
    """One orchestrator for the module: fake NVML, the fake MPS daemon, a metrics listener; beta's
    org/missing fails, so failure panels and alerts have something to show."""
    tmp = tmp_path_factory.mktemp("fleet")
    store = tmp / "store"
    from support import add_model
    for seed, model in enumerate(["org/a1", "org/b1"]):
        add_model(store, model, seed=seed)
    model_map, allocation = write_config(tmp, {"alpha": ["org/a1"], "beta": ["org/b1", "org/missing"]},
                                         {"alpha": {"mps_memory_limit_gb": 1.0}})
    metrics_port = free_port()
    env = nvml_hosts.env(tmp, ENABLE_MPS="true", PATH=f"{FAKES}:{os.environ['PATH']}",
                         CUDA_MPS_PIPE_DIRECTORY=str(tmp / "mps-pipe"), CUDA_MPS_LOG_DIRECTORY=str(tmp / "mps-log"),
                         GPU_ORCHESTRATOR_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    orch = Orchestrator(tmp, store, model_map, allocation, env=env,
                        extra_args=("--telemetry-interval", "0.5", "--mps-probe-interval", "0.3"))
    with orch:
        orch.metrics_url = f"http://127.0.0.1:{metrics_port}"
        orch.tmp = tmp
        orch.wait_settled()
        wait_for(lambda: orch.get("/gpu/info")[1]["mps_enabled"] and orch.get("/gpu/info")[1]["sampled_at"],
                 what="MPS up and a first NVML sample")
        yield orch
        assert orch.stop() == 0, orch.output()


def test_metrics_listener_serves_only_scrape_routes(fleet_orch):
    scrape = fleet_orch.metrics_url
    assert status_code(scrape + "/metrics") == 200
    assert request(scrape + "/health")[1]["status"] == "ok"
    assert request(scrape + "/ready") == request(fleet_orch.url + "/ready")  # 503: beta failed
    for path in ("/models/status", "/gpu/info", "/mps/allocation", "/clients/alpha/environment"):
        assert request(scrape + path)[0] == 404, path
    code, body = request(scrape + "/models/preload", "POST", b"{}", {"Content-Type": "application/json"})
    assert code == 404 and body["status"] == 404
    assert fleet_orch.get("/models/status")[0] == 200  # the API is unchanged on its own address
    with urllib.request.urlopen(scrape + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    # One request count for both listeners, whichever is scraped.
    assert re.search(r'http_requests_total\{method="GET",route="/models/status",status="200"\} [1-9]', text)
    assert "gpu_orchestrator_mps_enabled 1.0" in text and "gpu_orchestrator_mps_up 1.0" in text
    assert "process_cpu_seconds_total" in text


def test_metrics_listener_refusals(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})

    def serve(*args, env=None):
        argv = [sys.executable, "-m", "gpu_orchestrator.supervisor.cli", "serve", "--port", str(free_port()),
                "--model-store", str(store), "--model-map", str(model_map), *args]
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORCHESTRATOR_", "ENABLE_"))}
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**clean, **(env or {})})

    bad = serve(env={"GPU_ORCHESTRATOR_METRICS_LISTEN": "0.0.0.0"})
    assert bad.returncode == 78 and "GPU_ORCHESTRATOR_METRICS_LISTEN: expected HOST:PORT" in bad.stderr, bad.stderr
    assert serve("--metrics-listen", "127.0.0.1:99999").returncode == 78
    with Orchestrator(tmp_path, store, model_map) as taken:
        busy = serve("--metrics-listen", f"127.0.0.1:{taken.port}")
        assert busy.returncode == 69 and "cannot listen for metrics" in busy.stderr, busy.stderr
        assert "Traceback" not in busy.stderr
