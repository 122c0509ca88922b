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

    gpus = [nvml.GpuSample(0, processes=[nvml.process_entry(Process(p, u), owners)
                                              for p, u in ((10, 100), (11, 50), (5, 999), (77, 1))]),
            nvml.GpuSample(1, processes=[nvml.process_entry(Process(20, 7), owners),
                                              nvml.process_entry(Process(10, None), owners)])]
    # alpha's loader on GPU 1 has no figure (as under MPS): unknown there, never 0
    assert telemetry.client_gpu_memory(gpus) == {"alpha": {0: 150, 1: None}, "beta": {1: 7}}
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


def test_a_client_whose_name_systemd_escapes_is_found_by_its_unit(monkeypatch):
    # The unit is gpu-client@fact\x20checker.service: matched against "*@fact checker.service", never found.
    monkeypatch.setattr(telemetry, "client_variable", lambda pid: None)  # another user's: environ unreadable
    monkeypatch.setattr(telemetry, "systemd_unit", lambda pid: "gpu-client@fact\\x20checker.service")
    owners = telemetry.Owners(clients=("fact", "fact checker"))
    assert telemetry.service_client(4321, owners) == "fact checker"


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
    """Unexpected exceptions from a sample outside one GPU field's read (here from the driver version:
    a RuntimeError twice, then psutil's ZombieProcess) fail that sample only: the error is in the
    snapshot, the traceback is logged once per kind, and the next good sample clears it."""
    nvml_hosts.write(fake_nvml, gpus=[nvml_hosts.NO_POWER_OR_ECC])
    module = sys.modules["pynvml"]
    listed = module.nvmlSystemGetDriverVersion
    faults = [RuntimeError("boom"), RuntimeError("boom"), psutil.ZombieProcess(4242)]
    seen = []  # the snapshot published before each sample: what a request saw between samples

    def flaky():
        seen.append(sampler.snapshot())
        if faults:
            raise faults.pop(0)
        return listed()
    monkeypatch.setattr(module, "nvmlSystemGetDriverVersion", flaky)
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
    assert seen[1].nvml_supported is False and "NVMLError: Unknown Error" in seen[1].nvml_init_error
    assert good.nvml_supported and len(good.gpus) == 3


def test_nvml_that_cannot_start_stops_the_sampler(fake_nvml):
    nvml_hosts.write(fake_nvml, init_error="LibraryNotFound")
    sampler = telemetry.Sampler(0.01, telemetry.Owners)
    sampler.start()
    sampler.thread.join(timeout=10)
    assert not sampler.thread.is_alive() and sampler.snapshot()[0] == 1


# ---- one field's failure is that field's alone (nvidia-ml-py 13 on an older driver) ----------------

def test_a_field_read_that_raises_something_other_than_an_nvml_error_is_that_field_unsupported(fake_nvml, caplog):
    """nvidia-ml-py 13 wraps nvmlDeviceGetComputeRunningProcesses in throwOnVersionMismatch, which raises
    NVMLLibraryMismatchError (an Exception, not an NVMLError) on a driver whose NVML lacks _v3. It
    dropped every GPU (the whole sample failed); it is the process list's failure, named, only."""
    h100 = {**nvml_hosts.HEALTHY_H100, "raise": {"processes": "mismatch"}}
    nvml_hosts.write(fake_nvml, gpus=[h100, nvml_hosts.NO_POWER_OR_ECC])
    owners = telemetry.Owners(clients=("alpha",), limits={"alpha": 1024**3})
    with caplog.at_level(logging.WARNING, logger="telemetry"):
        for _ in range(2):
            snapshot = telemetry.take_sample(owners)
    assert snapshot.nvml_supported and [g.name for g in snapshot.gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA GeForce RTX 3090"]
    h100_sample, rtx = snapshot.gpus
    assert h100_sample.error is None and h100_sample.memory_total_bytes == 80 * 1024**3
    assert h100_sample.unsupported == ["processes: NVMLLibraryMismatchError: Unversioned function called and the "
                                       "pyNVML version does not match the NVML lib version."]
    assert h100_sample.processes == [] and rtx.unsupported[-1] == "ecc_enabled: Not Supported"
    # Who runs on that GPU cannot be known: not 0 bytes, not "under its limit".
    assert snapshot.client_gpus == {"alpha": {0: None}} and snapshot.clients == {"alpha": None}
    assert snapshot.over_limit == {} and snapshot.over_limit_unknown == {"alpha": [0]}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "field=processes" in tracebacks[0].getMessage()  # once, not every sample


def test_nvml_error_unknown_on_every_field_is_a_gpu_down(fake_nvml):
    """Only NVML_ERROR_GPU_IS_LOST marked a GPU down; one whose every read fails with NVML_ERROR_UNKNOWN
    or a reset-required error answers nothing either. One such field alone is that field's failure."""
    dead = {**nvml_hosts.HEALTHY_H100, "raise": {"all": "unknown"}}
    reset = {**nvml_hosts.NO_POWER_OR_ECC, "raise": {"all": "reset"}}
    flaky = {**nvml_hosts.HEALTHY_H100, "uuid": "GPU-flaky", "raise": {"utilization": "unknown"}}
    nvml_hosts.write(fake_nvml, gpus=[dead, reset, flaky])
    first, second, third = telemetry.take_sample(telemetry.Owners()).gpus
    assert first.error == "GPU does not answer: every field read failed (Unknown Error)"
    assert first.uuid == nvml_hosts.HEALTHY_H100["uuid"] and first.unsupported == [] and first.memory_total_bytes is None
    assert second.error == "GPU does not answer: every field read failed (GPU requires restart)"
    assert third.error is None and third.unsupported == ["utilization: Unknown Error"]


# ---- memory NVML cannot report is unknown, never 0 -------------------------------------------------

def test_a_process_without_a_memory_figure_makes_the_clients_memory_unknown(fake_nvml, sleeper):
    loader, service = sleeper(), sleeper(GPU_ORCHESTRATOR_CLIENT="alpha")
    gpu = {**nvml_hosts.HEALTHY_H100, "processes": [[loader.pid, 300 * 1024**2], [service.pid, None]]}
    nvml_hosts.write(fake_nvml, gpus=[gpu, nvml_hosts.NO_POWER_OR_ECC])
    owners = telemetry.Owners({loader.pid: "alpha"}, [], ("alpha", "beta"), {"alpha": 1024**3})
    snapshot = telemetry.take_sample(owners)
    assert snapshot.client_gpus == {"alpha": {0: None}} and snapshot.clients == {"alpha": None}
    assert snapshot.over_limit == {} and snapshot.over_limit_unknown == {"alpha": [0]}
    assert snapshot.client_over_limit("alpha") is None and snapshot.client_over_limit("beta") is False


def test_a_gpu_lost_while_a_client_is_over_its_limit_leaves_it_unknown_not_back_under(fake_nvml, sleeper, caplog):
    loader = sleeper()
    over = {**nvml_hosts.HEALTHY_H100, "processes": [[loader.pid, 2 * 1024**3]]}
    nvml_hosts.write(fake_nvml, gpus=[over, nvml_hosts.NO_POWER_OR_ECC])
    owners = telemetry.Owners({loader.pid: "alpha"}, [], ("alpha",), {"alpha": 1024**3})
    sampler = telemetry.Sampler(1.0, lambda: owners)  # its thread is never started

    def sample():
        snapshot = telemetry.take_sample(owners, sampler.seen)
        sampler.warn_over_limit(snapshot, owners)
        return snapshot
    with caplog.at_level(logging.INFO, logger="telemetry"):
        assert sample().over_limit == {"alpha": [0]}
        nvml_hosts.write(fake_nvml, gpus=[{**over, "lost": True}, nvml_hosts.NO_POWER_OR_ECC])
        for _ in range(2):
            lost = sample()
        assert lost.gpus[0].error == "GPU is lost" and lost.gpus[0].uuid == over["uuid"]  # its uuid remembered
        assert lost.client_gpus == {"alpha": {0: None}} and lost.clients == {"alpha": None}
        assert lost.over_limit == {} and lost.client_over_limit("alpha") is None
        assert not any("back under" in r.getMessage() for r in caplog.records)
        nvml_hosts.write(fake_nvml, gpus=[{**over, "processes": [[loader.pid, 100]]}, nvml_hosts.NO_POWER_OR_ECC])
        back = sample()
        assert back.clients == {"alpha": 100} and back.client_over_limit("alpha") is False
    messages = [r.getMessage() for r in caplog.records]
    assert sum("more than its MPS memory limit" in m for m in messages) == 1
    assert sum("back under its MPS memory limit" in m for m in messages) == 1


# ---- a GPU that leaves NVML's device count is still reported, as lost ------------------------------

def test_a_gpu_gone_from_the_device_count_stays_reported_as_lost(fake_nvml, sleeper):
    loader = sleeper()
    h100 = {**nvml_hosts.HEALTHY_H100, "processes": [[loader.pid, 100]]}
    nvml_hosts.write(fake_nvml, gpus=[h100, nvml_hosts.NO_POWER_OR_ECC])
    seen = telemetry.Seen()
    owners = telemetry.Owners({loader.pid: "alpha"}, [], ("alpha",))
    assert [g.uuid for g in telemetry.take_sample(owners, seen).gpus] == [h100["uuid"], nvml_hosts.NO_POWER_OR_ECC["uuid"]]
    nvml_hosts.write(fake_nvml, gpus=[nvml_hosts.NO_POWER_OR_ECC])  # GPU 0 falls off: the RTX is index 0 now
    for _ in range(2):
        snapshot = telemetry.take_sample(owners, seen)
        rtx, gone = snapshot.gpus
        assert (rtx.index, rtx.uuid, rtx.error) == (0, nvml_hosts.NO_POWER_OR_ECC["uuid"], None)
        assert (gone.index, gone.uuid, gone.name) == (0, h100["uuid"], h100["name"])
        assert gone.error == "GPU no longer in NVML's device count (last seen as GPU 0)"
        assert snapshot.clients == {"alpha": None}  # its loader was on the GPU that left
    nvml_hosts.write(fake_nvml, gpus=[h100, nvml_hosts.NO_POWER_OR_ECC])  # back: reported once, answering
    back = telemetry.take_sample(owners, seen)
    assert [(g.uuid, g.error) for g in back.gpus] == [(h100["uuid"], None), (nvml_hosts.NO_POWER_OR_ECC["uuid"], None)]
    assert back.clients == {"alpha": 100}


# ---- the process table is read once a sample, not once per loader ---------------------------------

class FakeProcess:
    def __init__(self, pid, ppid):
        self.pid, self.info = pid, {"ppid": ppid}


def test_loader_children_come_from_one_read_of_the_process_table(monkeypatch):
    table = [FakeProcess(1, 0), FakeProcess(10, 1), FakeProcess(11, 10), FakeProcess(12, 11), FakeProcess(13, 10),
             FakeProcess(20, 1), FakeProcess(21, 20), FakeProcess(30, 1), FakeProcess(31, None), FakeProcess(40, 41),
             FakeProcess(41, 40)]  # 31: its parent could not be read; 40/41: a loop (pid reuse mid-read)
    reads = []

    def process_iter(attrs):
        reads.append(attrs)
        return iter(table)
    monkeypatch.setattr(telemetry.psutil, "process_iter", process_iter)
    monkeypatch.setattr(telemetry.psutil.Process, "children", lambda *a, **k: pytest.fail("a /proc scan per loader"))
    owners = telemetry.Owners({10: "alpha", 20: "beta", 30: "gamma", 40: "delta", 99: "gone"}, [5], ("alpha",))
    owner = telemetry.attribute(owners)
    assert reads == [["ppid"]]
    assert {pid: owner(pid) for pid in (10, 11, 12, 13, 20, 21, 30, 40, 41, 99, 5)} == {
        10: ("alpha", "loader"), 11: ("alpha", "loader-child"), 12: ("alpha", "loader-child"),
        13: ("alpha", "loader-child"), 20: ("beta", "loader"), 21: ("beta", "loader-child"),
        30: ("gamma", "loader"), 40: ("delta", "loader"), 41: ("delta", "loader-child"), 99: ("gone", "loader"),
        5: (None, "mps-server")}
    telemetry.attribute(telemetry.Owners(clients=("alpha",)))  # no loaders: no need to read the table
    assert len(reads) == 1


def test_one_sample_with_many_real_loaders_reads_the_process_table_once(fake_nvml, monkeypatch):
    """The same answer as psutil's children(recursive=True) per loader, for one read a sample."""
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"
    loaders = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    try:
        children = {p.pid: wait_for(lambda p=p: psutil.Process(p.pid).children(recursive=True), what="grandchild")
                    for p in loaders}
        gpu = {**nvml_hosts.HEALTHY_H100, "processes": [[c.pid, 10] for found in children.values() for c in found]}
        nvml_hosts.write(fake_nvml, gpus=[gpu])
        reads = []
        real = telemetry.psutil.process_iter
        monkeypatch.setattr(telemetry.psutil, "process_iter", lambda *a, **k: reads.append(a) or real(*a, **k))
        owners = telemetry.Owners({p.pid: f"client{i}" for i, p in enumerate(loaders)}, [], ())
        snapshot = telemetry.take_sample(owners)
        assert len(reads) == 1
        expected = {c.pid: (f"client{i}", "loader-child") for i, p in enumerate(loaders) for c in children[p.pid]}
        assert {p.pid: (p.client, p.role) for p in snapshot.gpus[0].processes} == expected
    finally:
        for proc in loaders:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
