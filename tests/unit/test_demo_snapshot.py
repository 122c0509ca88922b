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


def test_demo_dir_never_replaces_someones_own_model_map(tmp_path):
    """`demo --dir` at a folder with a real AGENT_MODEL_MAP.json overwrote it without a word;
    a folder a demo wrote before is fine."""
    import pytest

    from gpu_orchestrator.supervisor.commands.demo import instructions, write_demo
    from gpu_orchestrator.supervisor.jsonfile import ConfigError
    write_demo(str(tmp_path / "again"))
    write_demo(str(tmp_path / "again"))
    own = tmp_path / "own"
    own.mkdir()
    (own / "AGENT_MODEL_MAP.json").write_text('{"mine": ["org/m"]}')
    with pytest.raises(ConfigError, match="AGENT_MODEL_MAP.json exists and is not the demo's; point --dir at a new"):
        write_demo(str(own))
    assert (own / "AGENT_MODEL_MAP.json").read_text() == '{"mine": ["org/m"]}'
    assert sorted(p.name for p in own.iterdir()) == ["AGENT_MODEL_MAP.json"]  # nothing written beside it
    (own / "AGENT_MODEL_MAP.json").unlink()
    (own / "AGENT_MODEL_MAP.json").mkdir()  # a folder, then bytes that are no text: refused the same way
    with pytest.raises(ConfigError, match="exists and is not the demo's"):
        write_demo(str(own))
    (own / "AGENT_MODEL_MAP.json").rmdir()
    (own / "AGENT_MODEL_MAP.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="exists and is not the demo's"):
        write_demo(str(own))
    assert "its files stay in /srv/demo" in instructions("127.0.0.1", 18014, "/srv/demo")
    assert "removes what it wrote" in instructions("127.0.0.1", 18014)
