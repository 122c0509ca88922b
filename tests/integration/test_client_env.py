"""`env` and `exec`: a client's service gets exactly its loader's MPS environment, from the running orchestrator."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import nvml_hosts
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import Orchestrator, wait_for, write_config

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"
CLI = [sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli"]
# Every variable a client's process gets from the orchestrator, whichever way it is started.
CLIENT_KEYS = ("GPU_ORCHESTRATOR_CLIENT", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CUDA_MPS_PIPE_DIRECTORY",
               "CUDA_MPS_LOG_DIRECTORY", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
MiB = 1024**2
PRINT_ENV = "import json, os; print(json.dumps({'pid': os.getpid(), 'env': dict(os.environ)}))"


def environ(pid: int) -> dict:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


def client_part(env: dict) -> dict:
    return {k: v for k, v in env.items() if k in CLIENT_KEYS}


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture
def mps_orchestrator(tmp_path, store):
    def start(hold: bool = False):
        model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"]}, {
            "alpha": {"mps_memory_limit_gb": 1.0, "active_thread_percentage": 50},
            "beta": {"mps_memory_limit_gb": 0.5, "devices": [1, 2]}})
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
               "ENABLE_MPS": "true", "PATH": f"{FAKES}:{os.environ['PATH']}",
               "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "9=9M"}  # ours: must reach no client
        if hold:
            (tmp_path / "hold").touch()  # the daemon never opens its pipe: MPS configured but down
            env["FAKE_MPS_HOLD"] = str(tmp_path / "hold")
        # Held, the daemon never answers: 1 s until MPS counts as down. Else the fake daemon (a
        # Python script) answers once started, which on a loaded machine can take longer than 1 s.
        return Orchestrator(tmp_path, store, model_map, allocation, env=env,
                            extra_args=("--mps-start-timeout", "1" if hold else "60", "--mps-probe-interval", "0.3"))
    return start


def test_env_and_exec_give_the_service_exactly_its_loaders_environment(mps_orchestrator):
    with mps_orchestrator() as orch:
        assert orch.wait_settled()["all_ready"]
        for client in ("alpha", "beta"):
            loader = client_part(environ(orch.loader_pid(client)))
            assert loader["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] != "9=9M"
            printed = cli("env", client, "--url", orch.url)
            assert printed.returncode == 0, printed.stderr
            expected = "".join(f"{k}={v}\n" for k, v in sorted(loader.items()))
            assert printed.stdout == expected  # byte for byte: every client variable, nothing else
            proc = subprocess.Popen([*CLI, "exec", client, "--url", orch.url, "--", sys.executable, "-c", PRINT_ENV],
                                    stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "99"})
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            ran = json.loads(out)
            assert ran["pid"] == proc.pid  # exec'd in place: no wrapper process left
            assert client_part(ran["env"]) == loader
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in client_part(environ(orch.loader_pid("beta")))


def test_unknown_client_and_no_orchestrator_are_refused_with_their_own_status(mps_orchestrator, tmp_path):
    with mps_orchestrator() as orch:
        unknown = cli("env", "nobody", "--url", orch.url)
        assert unknown.returncode == 67 and "no client 'nobody'" in unknown.stderr and unknown.stdout == ""
        refused = cli("exec", "nobody", "--url", orch.url, "--", "true")
        assert refused.returncode == 67
    gone = cli("env", "alpha", "--url", orch.url)
    assert gone.returncode == 69 and "no orchestrator answers" in gone.stderr
    nothing = cli("exec", "alpha", "--url", orch.url)
    assert nothing.returncode == 2 and "no command given" in nothing.stderr
    missing = subprocess.run([*CLI, "exec", "alpha", "--url", orch.url, "--", "true"], capture_output=True, text=True)
    assert missing.returncode == 69  # the orchestrator is asked before anything runs


def test_mps_configured_but_down_refuses_unless_allowed(mps_orchestrator):
    with mps_orchestrator(hold=True) as orch:
        wait_for(lambda: (m := orch.get("/gpu/info")[1]["mps"])["error"] and not m["enabled"], what="MPS down")
        refused = cli("env", "alpha", "--url", orch.url)
        assert refused.returncode == 75 and "--allow-without-mps" in refused.stderr and refused.stdout == ""
        assert cli("exec", "alpha", "--url", orch.url, "--", "true").returncode == 75
        allowed = cli("env", "alpha", "--url", orch.url, "--allow-without-mps")
        assert allowed.returncode == 0
        assert allowed.stdout == "GPU_ORCHESTRATOR_CLIENT=alpha\n"  # no limits to hand out: none pretended
        ran = cli("exec", "alpha", "--url", orch.url, "--allow-without-mps", "--", sys.executable, "-c", PRINT_ENV,
                  env={"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1M"})
        assert ran.returncode == 0
        assert client_part(json.loads(ran.stdout)["env"]) == {"GPU_ORCHESTRATOR_CLIENT": "alpha"}
        shown = cli("status", "alpha", "--url", orch.url)
        assert "MPS limit 1024 MiB per process (not enforced: MPS down)" in shown.stdout


def test_a_service_started_by_exec_counts_for_its_client_and_over_limit_is_flagged(tmp_path, store):
    """Loader 256 MiB + service 900 MiB on GPU 0, each under the 1 GiB pinned limit, together over it."""
    pids = tmp_path / "service-pids"
    pids.write_text("")
    gpu = {**nvml_hosts.HEALTHY_H100, "processes": [], "pid_file": str(pids), "pid_file_bytes": 900 * MiB}
    env = {"ENABLE_NVML": "true", "PYTHONPATH": str(nvml_hosts.FAKE_NVML),
           "FAKE_NVML_CONFIG": str(nvml_hosts.write(tmp_path / "nvml.json", gpus=[gpu]))}
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"]},
                                         {"alpha": {"mps_memory_limit_gb": 1.0}, "beta": {"mps_memory_limit_gb": 1.0}})
    with Orchestrator(tmp_path, store, model_map, allocation, env=env,
                      extra_args=("--telemetry-interval", "0.2")) as orch:
        assert orch.wait_settled()["all_ready"]
        service = subprocess.Popen([*CLI, "exec", "alpha", "--url", orch.url, "--", "sleep", "60"])
        try:
            wait_for(lambda: environ(service.pid).get("GPU_ORCHESTRATOR_CLIENT") == "alpha", what="service exec'd")
            pids.write_text(str(service.pid))
            info = wait_for(lambda: (i := orch.get("/gpu/info")[1])["clients"].get("alpha", {}).get("over_limit") and i,
                            what="alpha flagged over its limit")
            alpha = info["clients"]["alpha"]
            roles = {p["pid"]: p["role"] for p in alpha["processes"]}
            assert roles == {orch.loader_pid("alpha"): "loader", service.pid: "service"}
            assert alpha["gpus"] == {"0": 1156 * MiB} and alpha["over_limit_gpus"] == [0]
            assert info["clients"]["beta"]["over_limit"] is False
            text = urllib.request.urlopen(orch.url + "/metrics", timeout=10).read().decode()
            metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(text) for s in family.samples}
            assert metrics[("gpu_orchestrator_client_over_limit", (("client", "alpha"),))] == 1
            assert metrics[("gpu_orchestrator_client_over_limit", (("client", "beta"),))] == 0
            gpu0 = (("client", "alpha"), ("gpu", "0"), ("uuid", info["gpus"][0]["uuid"]))
            assert metrics[("gpu_orchestrator_client_gpu_memory_bytes", gpu0)] == 1156 * MiB
            shown = cli("status", "--url", orch.url)
            assert "OVER LIMIT" in shown.stdout and "alpha on GPU 0: 1156 MiB of its 1024 MiB limit" in shown.stdout
            wait_for(lambda: "more than its MPS memory limit" in orch.output(), what="the warning")
        finally:
            service.kill()
            service.wait()
        pids.write_text("")
        wait_for(lambda: not orch.get("/gpu/info")[1]["clients"]["alpha"]["over_limit"], what="the episode over")
        assert orch.output().count("more than its MPS memory limit") == 1
        assert "client back under its MPS memory limit client=alpha gpu=0" in orch.output()


def test_limits_mps_does_not_enforce_are_said_everywhere_and_the_token_stays_behind(tmp_path, store):
    """ENABLE_MPS=false beside an allocation file (as the shipped env file had it): every service ran
    without its limit while `status` showed "MPS limit" and nothing but the log's start said otherwise."""
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"]}, {"alpha": {"mps_memory_limit_gb": 1.0}})
    with Orchestrator(tmp_path, store, model_map, allocation) as orch:
        assert orch.wait_settled()["all_ready"]
        assert orch.get("/health")[1]["warnings"][0].startswith("ENABLE_MPS is off: nothing enforces the limits")
        printed = cli("env", "alpha", "--url", orch.url)
        assert printed.returncode == 0 and printed.stdout == "GPU_ORCHESTRATOR_CLIENT=alpha\n"
        assert "warning: client 'alpha' has a limit of 1024 MiB" in printed.stderr and "ENABLE_MPS=false" in printed.stderr
        ran = cli("exec", "alpha", "--url", orch.url, "--", sys.executable, "-c", PRINT_ENV,
                  env={"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4096M", "GPU_ORCHESTRATOR_TOKEN": "s3cret"})
        assert ran.returncode == 0, ran.stderr
        got = json.loads(ran.stdout)["env"]
        assert "GPU_ORCHESTRATOR_TOKEN" not in got and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in got
        assert ("the service's own CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=4096M is replaced by the client's "
                "(none: not set for this client)") in ran.stderr
        shown = cli("status", "alpha", "--url", orch.url)
        assert "MPS limit 1024 MiB per process (not enforced: MPS off)" in shown.stdout
