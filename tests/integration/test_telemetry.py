"""Telemetry end to end: the fake pynvml first on PYTHONPATH, a real orchestrator, /gpu/info,
/metrics parsed by prometheus_client, the `status` command, and NVML kept off the request path."""

import json
import subprocess
import sys

import msgspec
import nvml_hosts
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Orchestrator, free_port, status_code, wait_for, write_config

from gpu_orchestrator.supervisor.commands.api import GpuInfo

nvml_env = nvml_hosts.env


@pytest.fixture
def telemetry_orch(tmp_path, store):
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1", "org/missing"]},
                                         {"alpha": {"mps_memory_limit_gb": 1.0}})
    calls = tmp_path / "nvml-calls.log"
    env = nvml_env(tmp_path, FAKE_NVML_CALL_LOG=str(calls))
    with Orchestrator(tmp_path, store, model_map, allocation, env=env,
                      extra_args=("--telemetry-interval", "3600")) as orch:
        orch.wait_settled()
        wait_for(lambda: all(c["state"] == "RUNNING" for c in orch.status()["clients"].values()), what="loaders up")
        orch.calls = calls
        yield orch


def wait_for_sample(orch):
    return wait_for(lambda: (info := orch.get("/gpu/info")[1])["sampled_at"] and info, what="first NVML sample")


def test_gpu_info_from_the_snapshot_with_clients_attributed(telemetry_orch):
    info = wait_for_sample(telemetry_orch)
    assert info["available"] and info["nvml_supported"] and info["nvml_init_error"] is None
    assert info["driver_version"] == "550.54.15" and info["age_s"] >= 0
    assert [g["name"] for g in info["gpus"]] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 3090", None]
    assert info["gpus"][2]["error"] == "GPU is lost"
    msgspec.convert(info, GpuInfo)  # the shape the status command reads
    assert "power_draw_watts: Not Supported" in info["gpus"][1]["unsupported"]
    roles = {p["pid"]: (p["client"], p["role"]) for p in info["gpus"][0]["processes"]}
    for client in ("alpha", "beta"):
        assert roles[telemetry_orch.loader_pid(client)] == (client, "loader")
    assert roles[1] == (None, None)
    for client, limit in (("alpha", 1024**3), ("beta", None)):
        pid = telemetry_orch.loader_pid(client)
        assert info["clients"][client] == {
            "gpu_memory_bytes": 256 * 1024**2, "gpus": {"0": 256 * 1024**2}, "memory_limit_bytes": limit,
            "over_limit": False, "over_limit_gpus": [],
            "processes": [{"pid": pid, "gpu": 0, "role": "loader", "used_memory_bytes": 256 * 1024**2}]}
    status = telemetry_orch.status()
    assert status["clients"]["alpha"]["gpu_memory_bytes"] == 256 * 1024**2
    assert status["clients"]["alpha"]["rss_bytes"] > 0


def test_request_path_never_calls_nvml(telemetry_orch):
    wait_for_sample(telemetry_orch)
    before = telemetry_orch.calls.read_text().splitlines()
    assert before.count("nvmlInit") == 1
    for _ in range(100):
        for path in ("/gpu/info", "/metrics", "/models/status", "/mps/allocation", "/health"):
            assert status_code(telemetry_orch.url + path) == 200
    assert telemetry_orch.calls.read_text().splitlines() == before


def metrics(orch) -> dict:
    import urllib.request
    with urllib.request.urlopen(orch.url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if not s.name.endswith("_created")}


def test_metrics_parse_and_match_the_json_views(telemetry_orch):
    info = wait_for_sample(telemetry_orch)
    status = telemetry_orch.status()
    assert telemetry_orch.post("/models/preload", b"{bad")[0] == 400
    families = metrics(telemetry_orch)
    h100 = info["gpus"][0]
    labels = (("gpu", "0"), ("uuid", h100["uuid"]))
    prefix = "gpu_orchestrator_"
    assert samples(families[prefix + "gpu_memory_used_bytes"])[labels] == h100["memory_used_bytes"]
    assert samples(families[prefix + "gpu_memory_total_bytes"])[labels] == h100["memory_total_bytes"]
    assert samples(families[prefix + "gpu_utilization_ratio"])[labels] == pytest.approx(0.37)
    assert samples(families[prefix + "gpu_temperature_celsius"])[labels] == 54
    assert samples(families[prefix + "gpu_power_watts"])[labels] == 245
    assert samples(families[prefix + "gpu_sm_clock_hertz"])[labels] == 1.98e9
    assert families[prefix + "gpu_ecc_uncorrected_errors"].type == "counter"
    assert samples(families[prefix + "gpu_ecc_uncorrected_errors"])[labels] == 2
    rtx = (("gpu", "1"), ("uuid", info["gpus"][1]["uuid"]))
    assert rtx not in samples(families[prefix + "gpu_power_watts"])  # unsupported: absent, not zero
    assert samples(families[prefix + "gpu_up"])[(("gpu", "2"), ("uuid", ""))] == 0
    assert samples(families[prefix + "nvml_up"])[()] == 1 and samples(families[prefix + "nvml_enabled"])[()] == 1

    beta = (("client", "beta"),)
    assert samples(families[prefix + "client_ready"])[beta] == 0
    assert samples(families[prefix + "client_models_failed"])[beta] == 1
    assert samples(families[prefix + "client_models_ready"])[beta] == 1
    assert samples(families[prefix + "client_gpu_memory_bytes"])[(("client", "beta"), *labels)] == \
        status["clients"]["beta"]["gpu_memory_bytes"]
    assert samples(families[prefix + "client_over_limit"]) == {(("client", "alpha"),): 0}  # beta has no limit
    assert samples(families[prefix + "loader_restarts"])[beta] == 0
    states = samples(families[prefix + "loader_state"])
    assert states[(("client", "beta"), ("state", status["clients"]["beta"]["state"]))] == 1
    assert sum(v for k, v in states.items() if ("client", "beta") in k) == 1
    warmups = samples(families[prefix + "model_warmup_seconds"])
    a1 = status["clients"]["alpha"]["models"][0]
    assert warmups[(("client", "alpha"), ("model", "org/a1"))] == pytest.approx(a1["seconds"])
    model_ready = samples(families[prefix + "model_ready"])
    assert model_ready == {(("client", "alpha"), ("model", "org/a1")): 1, (("client", "beta"), ("model", "org/b1")): 1,
                           (("client", "beta"), ("model", "org/missing")): 0}
    assert samples(families[prefix + "model_bytes"])[(("client", "alpha"), ("model", "org/a1"))] == a1["bytes_total"] > 0
    alpha = (("client", "alpha"),)
    assert samples(families[prefix + "warmup_bytes_done"])[alpha] == \
        samples(families[prefix + "warmup_known_bytes"])[alpha] == a1["bytes_total"]
    assert samples(families[prefix + "all_ready"])[()] == 0
    # promtool check metrics: a gauge must not carry a counter's _total suffix
    assert [name for name, f in families.items() if f.type == "gauge" and name.endswith("_total")] == []
    assert samples(families[prefix + "mps_enabled"])[()] == 0  # not configured: an mps_up == 0 alert stays quiet
    assert samples(families[prefix + "mps_up"])[()] == 0
    assert samples(families[prefix + "mps_restarts"])[()] == 0 and families[prefix + "mps_restarts"].type == "counter"
    assert samples(families[prefix + "client_memory_limit_bytes"]) == {(("client", "alpha"),): 1024**3}
    assert samples(families[prefix + "mps_overcommitted"])[()] == 0
    summary = telemetry_orch.get("/mps/allocation")[1]["mps_resource_allocation"]["system_summary"]
    uuids = {str(g["index"]): g["uuid"] or "" for g in info["gpus"]}
    assert samples(families[prefix + "gpu_mps_memory_limit_bytes"]) == {
        (("gpu", str(g["index"])), ("uuid", uuids[str(g["index"])])): g["mps_memory_limit_gb"] * 1024**3
        for g in summary["per_gpu"]}
    http = samples(families[prefix + "http_requests"])
    assert http[(("method", "POST"), ("route", "/models/preload"), ("status", "400"))] == 1
    assert http[(("method", "GET"), ("route", "/models/status"), ("status", "200"))] >= 1
    build = families[prefix + "build_info"].samples[0]
    assert build.labels["version"] and build.labels["python"]
    # The standard collectors: the orchestrator's own process, as every Prometheus client exposes it.
    assert samples(families["process_resident_memory_bytes"])[()] > 0
    assert families["python_info"].samples[0].labels["implementation"] == "CPython"
    assert "python_gc_collections" in families


def run_status(*args):
    return subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "status", *args],
                          capture_output=True, text=True, timeout=60)


def test_status_command_live_and_closed_port(telemetry_orch):
    wait_for_sample(telemetry_orch)
    human = run_status("--url", telemetry_orch.url)
    assert human.returncode == 0, human.stderr
    out = human.stdout
    assert "NOT READY - 2/3 models ready, 1 failed" in out
    assert "NVIDIA H100 80GB HBM3" in out and "error: GPU is lost" in out
    assert "MPS: off (ENABLE_MPS is not true)" in out
    assert "beta org/missing: model org/missing not found" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("alpha", "beta"))}
    assert "RUNNING" in lines["alpha"] and "1/1" in lines["alpha"] and "256 MiB" in lines["alpha"]
    as_json = json.loads(run_status("--url", telemetry_orch.url, "--json").stdout)
    assert set(as_json) == {"models_status", "gpu_info"} and as_json["gpu_info"]["nvml_supported"]

    closed = run_status("--url", f"http://127.0.0.1:{free_port()}")
    assert closed.returncode == 1 and "nothing answers at" in closed.stderr and closed.stdout == ""


def test_nvml_absent_service_still_serves(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    env = {"ENABLE_NVML": "true", "PYTHONPATH": ""}  # the real pynvml, and no NVIDIA library on this host
    with Orchestrator(tmp_path, store, model_map, env=env) as orch:
        assert orch.wait_settled()["all_ready"]
        info = wait_for(lambda: (i := orch.get("/gpu/info")[1])["sampled_at"] and i, what="failed init recorded")
        if info["nvml_supported"]:
            pytest.skip("this host has a working NVML")
        assert info["available"] is False and info["gpus"] == []
        assert "NVML" in info["nvml_init_error"]
        assert "NVML unavailable: no GPU telemetry" in orch.output()
        assert orch.status()["clients"]["alpha"]["gpu_memory_bytes"] is None


def test_status_watch_refreshes_until_ctrl_c(telemetry_orch, tmp_path):
    import signal
    out = tmp_path / "watch.out"
    with open(out, "w") as sink:
        watch = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "status", "--url",
                                  telemetry_orch.url, "--watch", "0.2"], stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: out.read_text().count("gpu-orchestrator at ") >= 3, what="three refreshes")
        finally:
            watch.send_signal(signal.SIGINT)
            assert watch.wait(30) == 0
    assert "\033[H" not in out.read_text()  # no screen clearing when stdout is not a terminal


def test_a_failing_field_stays_that_fields_and_a_failing_sample_is_shown_and_sampling_recovers(tmp_path, store):
    """An exception NVML's caller did not expect from one field (the fake's process list reading a pid
    file that holds garbage, as nvidia-ml-py 13 raises NVMLLibraryMismatchError) is that field's:
    the GPU is still served, the field named. One outside a field (the device count) fails samples,
    visibly, until the cause is gone; the sampler thread lives on."""
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    pids = tmp_path / "gpu-pids"
    pids.write_text("")
    gpu = {**nvml_hosts.HEALTHY_H100, "pid_file": str(pids), "pid_file_bytes": 1}
    host = tmp_path / "one-gpu.json"
    env = nvml_env(tmp_path, FAKE_NVML_CONFIG=str(nvml_hosts.write(host, gpus=[gpu])))
    with Orchestrator(tmp_path, store, model_map, env=env, extra_args=("--telemetry-interval", "0.2")) as orch:
        assert wait_for_sample(orch)["nvml_supported"]
        pids.write_text("not-a-pid")
        info = wait_for(lambda: (i := orch.get("/gpu/info")[1])["gpus"][0]["unsupported"] and i, what="a failed field")
        assert info["nvml_supported"] and info["gpus"][0]["memory_total_bytes"] == 80 * 1024**3
        assert info["gpus"][0]["unsupported"][0].startswith("processes: ValueError: invalid literal for int()")
        assert info["clients"]["alpha"]["gpu_memory_bytes"] is None  # who runs there cannot be known: not 0
        assert samples(metrics(orch)["gpu_orchestrator_nvml_up"])[()] == 1
        pids.write_text("")
        nvml_hosts.write(host, gpus=[gpu], count_error="the device count failed")
        info = wait_for(lambda: not (i := orch.get("/gpu/info")[1])["nvml_supported"] and i, what="a failed sample")
        assert "NVML sample failed: RuntimeError" in info["nvml_init_error"] and info["gpus"] == []
        assert samples(metrics(orch)["gpu_orchestrator_nvml_up"])[()] == 0
        assert any(w.startswith("GPU telemetry: NVML sample failed: RuntimeError")
                   for w in orch.get("/health")[1]["warnings"])
        nvml_hosts.write(host, gpus=[gpu])
        info = wait_for(lambda: (i := orch.get("/gpu/info")[1])["nvml_supported"] and i, what="sampling recovered")
        assert info["nvml_init_error"] is None and info["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
        assert info["gpus"][0]["unsupported"] == []
        assert samples(metrics(orch)["gpu_orchestrator_nvml_up"])[()] == 1
        assert wait_for(lambda: not any(w.startswith("GPU telemetry") for w in orch.get("/health")[1]["warnings"]), what="/health clear again")
        output = orch.output()
    assert output.count("NVML sample failed") == 1 and "Traceback" in output  # once, not every 0.2 s
    assert output.count("NVML field read failed with an unexpected error") == 1
    assert "NVML samples succeed again" in output and "uncaught" not in output


def test_a_gpu_that_leaves_the_device_count_is_reported_lost_in_gpu_info_and_metrics(tmp_path, store):
    """It used to vanish: its gpu_up series gone (no GpuOrchestratorGpuLost) and the next GPU took its index."""
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    host = tmp_path / "two-gpus.json"
    h100, rtx = nvml_hosts.HEALTHY_H100, nvml_hosts.NO_POWER_OR_ECC
    env = nvml_env(tmp_path, FAKE_NVML_CONFIG=str(nvml_hosts.write(host, gpus=[h100, rtx])))
    with Orchestrator(tmp_path, store, model_map, env=env, extra_args=("--telemetry-interval", "0.2")) as orch:
        assert [g["uuid"] for g in wait_for_sample(orch)["gpus"]] == [h100["uuid"], rtx["uuid"]]
        nvml_hosts.write(host, gpus=[rtx])
        info = wait_for(lambda: (i := orch.get("/gpu/info")[1])["gpus"][0]["uuid"] == rtx["uuid"] and i,
                        what="the GPU gone from the count")
        assert [(g["index"], g["uuid"], g["error"]) for g in info["gpus"]] == [
            (0, rtx["uuid"], None), (0, h100["uuid"], "GPU no longer in NVML's device count (last seen as GPU 0)")]
        assert info["available"] and info["clients"]["alpha"]["gpu_memory_bytes"] is None  # its loader was there
        up = samples(metrics(orch)["gpu_orchestrator_gpu_up"])
        assert up == {(("gpu", "0"), ("uuid", rtx["uuid"])): 1, (("gpu", "0"), ("uuid", h100["uuid"])): 0}
