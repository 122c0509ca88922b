"""The NVML sampler against the fake pynvml module, in process."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import nvml_hosts
from gpu_orchestrator.supervisor import nvml, telemetry
from support import wait_for

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
    snapshot = telemetry.take_sample({1: (None, "mps-server")})
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
    owners = {10: ("alpha", "loader"), 11: ("alpha", "loader-child"), 20: ("beta", "loader"), 5: (None, "mps-server")}

    class Process:
        def __init__(self, pid, used):
            self.pid, self.usedGpuMemory = pid, used

    gpus = [telemetry.GpuSample(0, processes=[telemetry.process_entry(Process(p, u), owners)
                                              for p, u in ((10, 100), (11, 50), (5, 999), (77, 1))]),
            telemetry.GpuSample(1, processes=[telemetry.process_entry(Process(20, 7), owners),
                                              telemetry.process_entry(Process(10, None), owners)])]
    assert telemetry.client_memory(gpus) == {"alpha": 150, "beta": 7}
    assert gpus[0].processes[3].client is None and gpus[0].processes[2].role == "mps-server"


def test_attribution_follows_real_process_children():
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        child = wait_for(lambda: psutil.Process(parent.pid).children(), what="grandchild")[0]
        owners = telemetry.attribute({parent.pid: "alpha"}, [4242])
        assert owners[parent.pid] == ("alpha", "loader")
        assert owners[child.pid] == ("alpha", "loader-child")
        assert owners[4242] == (None, "mps-server")
    finally:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()


def test_nvml_that_cannot_start(fake_nvml):
    nvml_hosts.write(fake_nvml, init_error="LibraryNotFound")
    snapshot = telemetry.take_sample({})
    assert snapshot.nvml_supported is False and "NVML library not found" in snapshot.nvml_init_error
    assert snapshot.gpus == []


def test_nvml_is_initialised_once(fake_nvml, tmp_path, monkeypatch):
    nvml_hosts.write(fake_nvml)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_NVML_CALL_LOG", str(log))
    for _ in range(3):
        telemetry.take_sample({})
    assert log.read_text().splitlines().count("nvmlInit") == 1
