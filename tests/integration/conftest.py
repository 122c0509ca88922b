import pytest

from support import Orchestrator, add_model, write_config

CLIENTS = {"alpha": ["org/a1", "org/a2"], "beta": ["org/b1", "org/missing"], "gamma": ["org/g1"]}


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    for seed, model in enumerate(["org/a1", "org/a2", "org/b1", "org/g1"]):
        add_model(root, model, seed=seed, manifest=seed % 2 == 0)
    return root


@pytest.fixture
def orchestrator(tmp_path, store):
    """A running orchestrator whose client beta lacks org/missing."""
    model_map, allocation = write_config(tmp_path, CLIENTS, {"alpha": {"mps_memory_limit_gb": 1.0},
                                                             "beta": {"mps_memory_limit_gb": 0.5}})
    with Orchestrator(tmp_path, store, model_map, allocation) as orch:
        yield orch
