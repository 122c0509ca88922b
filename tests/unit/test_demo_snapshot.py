"""The generated snapshots of demo, gpu-check and the benchmarks: valid at any size."""

import random

from gpu_orchestrator.loaders.formats import check_safetensors
from gpu_orchestrator.supervisor.commands import demo


def test_the_random_bytes_are_made_a_chunk_at_a_time(tmp_path, monkeypatch):
    """One random.randbytes call cannot make more than 2**28 bytes, and bench-gpu asks for a
    GiB: no call may ask for more than RANDOM_CHUNK (made small here so the test stays small)."""
    asked = []
    real = random.Random.randbytes
    monkeypatch.setattr(demo, "RANDOM_CHUNK", 1024)
    monkeypatch.setattr(random.Random, "randbytes", lambda self, n: asked.append(n) or real(self, n))
    path = tmp_path / "model.safetensors"
    parameters = demo.write_safetensors(path, {"w": [5000, 1]}, seed=3)
    assert parameters == 5000 and check_safetensors(path) == 5000
    assert max(asked) <= 1024 and sum(asked) == 10000
