"""The generated snapshots of demo, gpu-check and the benchmarks: valid at any size."""

from gpu_orchestrator.loaders.formats import check_safetensors
from gpu_orchestrator.supervisor.commands.demo import write_safetensors


def test_a_snapshot_over_256_mib_is_written_whole(tmp_path):
    """One random.randbytes call cannot make more than 2**28 bytes; bench-gpu asks for 1 GiB."""
    path = tmp_path / "model.safetensors"
    parameters = write_safetensors(path, {"w": [2**27 + 4096, 1]}, seed=3)
    assert parameters == 2**27 + 4096
    assert check_safetensors(path) == parameters
    path.unlink()
