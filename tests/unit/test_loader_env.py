"""How many GPUs a loader's limits name, and which of our variables a loader inherits."""

from gpu_orchestrator.supervisor.config import AgentAllocation, Config
from gpu_orchestrator.supervisor.launch import count_gpus, loader_env
from gpu_orchestrator.supervisor.mps_control import MpsSettings


def test_gpus_are_what_cuda_visible_devices_hands_us(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert count_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1b2c,GPU-9f00,MIG-4d1e")
    assert count_gpus() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert count_gpus() == 0


def test_unpinned_client_gets_a_limit_per_visible_gpu_and_never_our_own(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "0=1M")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("GPU_ORCHESTRATOR_TOKEN", "s3cret")  # /proc/PID/environ would show it
    config = Config(model_store_root="/s", model_map_path="m", allocation_path="a", clients={"a": [], "b": []},
                    allocations={"a": AgentAllocation(mps_memory_limit_gb=1.5),
                                 "b": AgentAllocation(mps_memory_limit_gb=0.5, devices=[1])})
    mps = MpsSettings("/p", "/l")
    env = loader_env(config, "a", mps, count_gpus())
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=1536M,1=1536M" and "NOTIFY_SOCKET" not in env
    assert "GPU_ORCHESTRATOR_TOKEN" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"  # unpinned: it sees what we see
    pinned = loader_env(config, "b", mps, count_gpus())
    assert pinned["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=512M" and pinned["CUDA_VISIBLE_DEVICES"] == "1"
    assert pinned["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # devices are NVML's (PCI) indices, not CUDA's fastest-first
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in loader_env(config, "a", None, count_gpus())


def test_the_limit_a_loader_checks_against_is_the_one_mps_enforces():
    """2.3 GB reaches MPS as 2355M: the bytes a loader plans against must not be the GB figure's
    2,469,606,195, which would let it start a model MPS then refuses."""
    config = Config(model_store_root="/s", model_map_path="m", allocation_path="a", clients={"a": []},
                    allocations={"a": AgentAllocation(mps_memory_limit_gb=2.3, devices=[0])})
    env = loader_env(config, "a", MpsSettings("/p", "/l"), 1)
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2355M"
    assert config.memory_limit_bytes("a") == 2355 * 2**20
