"""The NVML sampler against the fake pynvml module, in process."""

import importlib.util
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import nvml_hosts
import psutil
import pytest
from support import wait_for

from gpu_orchestrator.supervisor import nvml, telemetry

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "nvml" / "pynvml.py"


@pytest.fixture
def fake_nvml(tmp_path, monkeypatch):
    """Import the fake as `pynvml` for this test only, and forget any earlier NVML init."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setattr(nvml, "_state", {})
    config = tmp_path / "nvml.json"
    monkeypatch.setenv("FAKE_NVML_CONFIG", str(config))
    return config


def test_fields_unsupported_and_lost_gpus(fake_nvml):
    nvml_hosts.write(fake_nvml)
    snapshot = telemetry.take_sample(telemetry.Owners(mps_servers=[1]))
    assert snapshot.nvml_supported and snapshot.driver_version == "550.54.15"
    assert snapshot.cuda_driver_version == "12.4"
    h100, rtx, lost = snapshot.gpus
    assert h100.name == "NVIDIA H100 80GB HBM3" and h100.pci_bus_id == "00000000:18:00.0"
    assert (h100.memory_total_bytes, h100.memory_used_bytes) == (80 * 1024**3, 3 * 1024**3)
    assert h100.power_draw_watts == 245.0 and h100.power_limit_watts == 700.0
    assert h100.compute_mode == "EXCLUSIVE_PROCESS" and h100.persistence_mode is True
    assert h100.ecc_enabled is True and h100.ecc_uncorrected_errors == 2
    assert h100.throttle_reasons == ["gpu_idle", "sw_power_cap"] and h100.unsupported == []
    assert h100.processes[0].pid == 1 and h100.processes[0].role == "mps-server"
    assert rtx.power_draw_watts is None and rtx.ecc_enabled is None
    assert rtx.unsupported == ["power_draw_watts: Not Supported", "power_limit_watts: Not Supported",
                               "ecc_enabled: Not Supported"]
    assert rtx.error is None and rtx.temperature_celsius == 41
    assert lost.error == "GPU is lost" and lost.memory_total_bytes is None


def test_processes_are_attributed_to_loaders_and_their_children():
    known = {10: ("alpha", "loader"), 11: ("alpha", "loader-child"), 20: ("beta", "loader"), 5: (None, "mps-server")}

    def owners(pid):
        return known.get(pid, (None, None))

    class Process:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    gpus = [telemetry.GpuSample(0, processes=[telemetry.process_entry(Process(p, u), owners)
                                              for p, u in ((10, 100), (11, 50), (5, 999), (77, 1))]),
            telemetry.GpuSample(1, processes=[telemetry.process_entry(Process(20, 7), owners),
                                              telemetry.process_entry(Process(10, None), owners)])]
    assert telemetry.client_gpu_memory(gpus) == {"alpha": {0: 150}, "beta": {1: 7}}
    assert gpus[0].processes[3].client is None and gpus[0].processes[2].role == "mps-server"


def test_attribution_follows_real_process_children():
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        child = wait_for(lambda: psutil.Process(parent.pid).children(), what="grandchild")[0]
        owner = telemetry.attribute(telemetry.Owners({parent.pid: "alpha"}, [4242], ("alpha",)))
        assert owner(parent.pid) == ("alpha", "loader")
        assert owner(child.pid) == ("alpha", "loader-child")
        assert owner(4242) == (None, "mps-server")
        assert owner(os.getpid()) == (None, None)  # no loader, no service of a client
    finally:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()


def test_nvml_that_cannot_start(fake_nvml):
    nvml_hosts.write(fake_nvml, init_error="LibraryNotFound")
    snapshot = telemetry.take_sample(telemetry.Owners())
    assert snapshot.nvml_supported is False and "NVML library not found" in snapshot.nvml_init_error
    assert snapshot.gpus == []


def test_nvml_is_initialised_once(fake_nvml, tmp_path, monkeypatch):
    nvml_hosts.write(fake_nvml)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_NVML_CALL_LOG", str(log))
    for _ in range(3):
        telemetry.take_sample(telemetry.Owners())
    assert log.read_text().splitlines().count("nvmlInit") == 1


@pytest.fixture
def sleeper():
    """Start `sleep` processes with extra environment; kill them all at the end."""
    started = []

    def start(**env):
        proc = subprocess.Popen(["sleep", "60"], env={**os.environ, **env})
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()


@pytest.fixture
def unit_cgroup():
    """A real cgroup named like a systemd unit, in the v1 name=systemd hierarchy (root only)."""
    base = Path("/sys/fs/cgroup/systemd") / f"gpu-orchestrator-test-{uuid.uuid4().hex[:8]}"
    try:
        base.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under /sys/fs/cgroup/systemd ({exc.strerror}): needs root and cgroup v1")
    made = []

    def make(unit: str) -> Path:
        path = base / unit
        path.mkdir()
        made.append(path)
        return path
    yield make
    for path in made:
        path.rmdir()
    base.rmdir()


def test_a_process_of_a_client_unit_is_its_service(unit_cgroup, sleeper):
    cgroup = unit_cgroup("justnews@alpha.service")
    service = sleeper()
    (cgroup / "cgroup.procs").write_text(str(service.pid))
    assert telemetry.systemd_unit(service.pid) == "justnews@alpha.service"
    owners = telemetry.Owners(clients=("alpha", "beta"))
    assert telemetry.attribute(owners)(service.pid) == ("alpha", "service")
    other = telemetry.Owners(clients=("alpha",), service_pattern="inference-{client}.service")
    assert telemetry.attribute(other)(service.pid) == (None, None)
    # Moved back out before the fixture removes its cgroup.
    Path("/sys/fs/cgroup/systemd/cgroup.procs").write_text(str(service.pid))


def test_a_process_started_by_exec_for_a_client_is_its_service(sleeper):
    service = sleeper(GPU_ORCHESTRATOR_CLIENT="beta")
    stranger = sleeper(GPU_ORCHESTRATOR_CLIENT="nobody-we-know")
    owner = telemetry.attribute(telemetry.Owners(clients=("alpha", "beta")))
    assert owner(service.pid) == ("beta", "service")
    assert owner(stranger.pid) == (None, None)


def test_two_processes_of_a_client_over_its_limit_together_are_flagged_once(fake_nvml, sleeper, caplog):
    loader, service = sleeper(), sleeper(GPU_ORCHESTRATOR_CLIENT="alpha")
    gpu = {**nvml_hosts.HEALTHY_H100, "processes": [[loader.pid, 700 * 1024**2], [service.pid, 600 * 1024**2]]}
    nvml_hosts.write(fake_nvml, gpus=[gpu])
    owners = telemetry.Owners({loader.pid: "alpha"}, [], ("alpha",), {"alpha": 1024**3})
    snapshot = telemetry.take_sample(owners)
    assert snapshot.client_gpus == {"alpha": {0: 1300 * 1024**2}} and snapshot.clients == {"alpha": 1300 * 1024**2}
    assert snapshot.over_limit == {"alpha": [0]}
    assert sorted(p.role for p in snapshot.gpus[0].processes) == ["loader", "service"]

    sampler = telemetry.Sampler(1.0, lambda: owners)  # its thread is never started
    with caplog.at_level(logging.INFO, logger="telemetry"):
        for _ in range(3):
            sampler.warn_over_limit(snapshot, owners)
        raised = telemetry.Owners({loader.pid: "alpha"}, [], ("alpha",), {"alpha": 2 * 1024**3})
        sampler.warn_over_limit(telemetry.take_sample(raised), raised)  # the episode ends
    messages = [r.getMessage() for r in caplog.records]
    assert sum("more than its MPS memory limit" in m for m in messages) == 1
    assert any("roles=loader,service" in m and "used_bytes=1363148800" in m for m in messages)
    assert sum("back under its MPS memory limit" in m for m in messages) == 1


def test_one_bad_sample_never_ends_telemetry(fake_nvml, monkeypatch, caplog):
    """Unexpected exceptions from a sample (here from NVML's process list: a RuntimeError twice, then
    psutil's ZombieProcess, as the fake once raised for a loader that had exited) fail that sample only:
    the error is in the snapshot, the traceback is logged once per kind, and the next good sample clears it."""
    nvml_hosts.write(fake_nvml, gpus=[nvml_hosts.NO_POWER_OR_ECC])
    module = sys.modules["pynvml"]
    listed = module.nvmlDeviceGetComputeRunningProcesses
    faults = [RuntimeError("boom"), RuntimeError("boom"), psutil.ZombieProcess(4242)]
    seen = []  # the snapshot published before each sample: what a request saw between samples

    def flaky(handle):
        seen.append(sampler.snapshot())
        if faults:
            raise faults.pop(0)
        return listed(handle)
    monkeypatch.setattr(module, "nvmlDeviceGetComputeRunningProcesses", flaky)
    sampler = telemetry.Sampler(0.01, telemetry.Owners)
    with caplog.at_level(logging.INFO, logger="telemetry"):
        sampler.start()
        try:
            count, good = wait_for(lambda: (s := sampler.snapshot())[0] >= 4 and s, what="a good sample after 3 bad")
            assert sampler.thread.is_alive()
        finally:
            sampler.stop()
    failed = [snapshot for _, snapshot in seen[1:4]]
    assert [s.nvml_supported for s in failed] == [False, False, False]
    assert "RuntimeError: boom" in failed[0].nvml_init_error and "2 samples in a row" in failed[1].nvml_init_error
    assert "ZombieProcess" in failed[2].nvml_init_error and failed[2].gpus == []
    assert good.nvml_supported and good.nvml_init_error is None and good.gpus[0].name == "NVIDIA GeForce RTX 3090"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert [r.exc_info[0] for r in tracebacks] == [RuntimeError, psutil.ZombieProcess]  # once per kind, not per sample
    assert sum("NVML samples succeed again" in r.getMessage() and "failed_samples=3" in r.getMessage()
               for r in caplog.records) == 1


def test_an_nvml_error_after_init_fails_one_sample_only(fake_nvml, monkeypatch):
    """Only NVML that cannot start stops the sampler (nvml() never retries init); an NVML call that
    fails later, such as the GPU count, is one failed sample."""
    nvml_hosts.write(fake_nvml)
    module = sys.modules["pynvml"]
    counted = module.nvmlDeviceGetCount
    faults = [module.NVMLError(999)]
    seen = []

    def flaky():
        seen.append(sampler.snapshot()[1])
        if faults:
            raise faults.pop(0)
        return counted()
    monkeypatch.setattr(module, "nvmlDeviceGetCount", flaky)
    sampler = telemetry.Sampler(0.01, telemetry.Owners)
    sampler.start()
    try:
        good = wait_for(lambda: (s := sampler.snapshot())[0] >= 2 and s[1], what="a sample after the failed one")
        assert sampler.thread.is_alive()
    finally:
        sampler.stop()
    assert seen[1].nvml_supported is False and "NVMLError: Unknown Error 999" in seen[1].nvml_init_error
    assert good.nvml_supported and len(good.gpus) == 3


def test_nvml_that_cannot_start_stops_the_sampler(fake_nvml):
    nvml_hosts.write(fake_nvml, init_error="LibraryNotFound")
    sampler = telemetry.Sampler(0.01, telemetry.Owners)
    sampler.start()
    sampler.thread.join(timeout=10)
    assert not sampler.thread.is_alive() and sampler.snapshot()[0] == 1
