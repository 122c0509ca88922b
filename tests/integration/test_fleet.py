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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nvml_hosts
import pytest
from support import Orchestrator, add_model, free_port, request, status_code, wait_for, write_config

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
        argv = [sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port", str(free_port()),
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


@pytest.fixture
def prometheus(fleet_orch):
    """Debian's prometheus on a free loopback port with its own data folder, scraping the metrics
    listener every second and evaluating the shipped rules every second; stopped and removed after."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (.ci/run installs Debian's prometheus package)")
    home = fleet_orch.tmp / "prometheus"
    home.mkdir()
    port = free_port()
    config = home / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "gpu-orchestrator",
                            "static_configs": [{"targets": [fleet_orch.metrics_url.removeprefix("http://")]}]}]}))
    log = open(home / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{(home / 'prometheus.log').read_text()}")
        try:
            return status_code(url + "/-/ready") == 200
        except OSError:
            return False
    try:
        wait_for(ready, timeout=60, interval=0.2, what="prometheus to be ready")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(home)


def api(url: str, path: str, **params):
    """The `data` of a Prometheus HTTP API answer; the error it gives, as an assertion, otherwise."""
    full = f"{url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
    try:
        with urllib.request.urlopen(full, timeout=30) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read())
    assert body["status"] == "success", f"{params}: {body.get('errorType')}: {body.get('error')}"
    return body["data"]


def dashboard_queries(variables: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the dashboard, its variables filled in as Grafana would."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


READINESS = re.compile(r"gpu_orchestrator_(all|client|model)_ready\b")


def test_prometheus_scrapes_the_listener_loads_the_rules_and_answers_every_dashboard_query(fleet_orch, prometheus):
    instance = fleet_orch.metrics_url.removeprefix("http://")
    wait_for(lambda: api(prometheus, "query", query='gpu_orchestrator_client_ready{job="gpu-orchestrator"}')["result"],
             timeout=60, interval=0.2, what="a first scrape of the metrics listener")
    assert api(prometheus, "targets")["activeTargets"][0]["health"] == "up"

    # The dashboard's variables, through the API Grafana's label_values() uses.
    variables = {v["name"]: v["definition"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
                 if v["type"] == "query"}
    assert api(prometheus, "label/instance/values", **{"match[]": "gpu_orchestrator_build_info"}) == [instance]
    assert variables["client"] == 'label_values(gpu_orchestrator_client_ready{instance=~"$instance"}, client)'
    clients = api(prometheus, "label/client/values", **{"match[]": f'gpu_orchestrator_client_ready{{instance=~"{instance}"}}'})
    assert clients == ["alpha", "beta"]

    queries = dashboard_queries({"$__rate_interval": "1m", "$instance": instance, "$client": "|".join(clients)})
    readiness = [(title, expr) for title, expr in queries if READINESS.search(expr)]
    assert len(queries) == 30 and len(readiness) >= 3
    for title, expr in queries:
        api(prometheus, "query", query=expr)  # each valid: a parse error is a 400 with errorType bad_data
    for title, expr in readiness:
        assert api(prometheus, "query", query=expr)["result"], f"panel {title!r} has no data: {expr}"

    # The rules are loaded, evaluate without error, and the alerts that match this host go pending:
    # beta's org/missing failed (so beta is not ready), and the fake host's third GPU is lost.
    def evaluated():
        rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
        return len(rules) == 12 and all(r["health"] == "ok" for r in rules) and rules
    wait_for(evaluated, timeout=60, interval=0.2, what="every rule evaluated without error")

    def active():
        return {(a["labels"]["alertname"], a["labels"].get("client"), a["labels"].get("model"), a["labels"].get("gpu"))
                for a in api(prometheus, "alerts")["alerts"]}
    expected = {("GpuOrchestratorModelFailed", "beta", "org/missing", None),
                ("GpuOrchestratorNotReady", "beta", None, None),
                ("GpuOrchestratorGpuLost", None, None, "2")}
    wait_for(lambda: active() == expected, timeout=60, interval=0.2, what=f"exactly the alerts {expected}")


def test_the_example_workloads_gate_init_container_against_a_live_orchestrator(tmp_path):
    """The ConfigMap's two files serve as written; the init container's command, only its Service URL
    pointed at this orchestrator, asks for the warm-up with the token and exits 0 once analyst is ready."""
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (.ci/run installs it)")
    config = yaml.safe_load((REPO / "scripts" / "kubernetes" / "configmap.yaml").read_text())["data"]
    (workload,) = yaml.safe_load_all(WORKLOAD.read_text())
    (init,) = workload["spec"]["template"]["spec"]["initContainers"]
    model_map = tmp_path / "AGENT_MODEL_MAP.json"
    model_map.write_text(config["AGENT_MODEL_MAP.json"])
    allocation = tmp_path / "mps_allocation_config.json"
    allocation.write_text(config["mps_allocation_config.json"])
    store = tmp_path / "store"
    for seed, model in enumerate(m for models in json.loads(model_map.read_text()).values() for m in models):
        add_model(store, model, seed=seed)
    token = "fleet-test-token"
    # --no-preload: nothing warms up unless the gate asks, with the token, as on a fresh node.
    with Orchestrator(tmp_path, store, model_map, allocation, env={"GPU_ORCHESTRATOR_TOKEN": token},
                      extra_args=("--no-preload",)) as orch:
        command = list(init["command"])
        assert command[:3] == ["gpu-orchestrator", "gate", "analyst"]
        command[command.index("--url") + 1] = orch.url  # the Service's name resolves only in the cluster
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert set(env) == {"GPU_ORCHESTRATOR_TOKEN", "XDG_CACHE_HOME"}
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORCHESTRATOR_", "GATE_"))}

        def gate(**extra):
            return subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", *command[1:]],
                                  capture_output=True, text=True, timeout=120,
                                  env={**clean, "XDG_CACHE_HOME": str(tmp_path / "cache"), **extra})
        refused = gate()  # without the Secret's token the warm-up request is refused
        assert refused.returncode == 1 and "401" in refused.stderr, refused.stderr
        result = gate(GPU_ORCHESTRATOR_TOKEN=token)
        assert result.returncode == 0, result.stdout + result.stderr
        clients = orch.status()["clients"]
        assert clients["analyst"]["ready"] and len(clients["analyst"]["models"]) == 2
        assert json.loads((tmp_path / "cache" / "gpu-orchestrator" / "preflight" / "summary_analyst.json").read_text())
        assert orch.stop() == 0
