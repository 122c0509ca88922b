import pytest
from support import Orchestrator, write_config

CLIENTS = {"alpha": ["org/a1", "org/a2"], "beta": ["org/b1", "org/missing"], "gamma": ["org/g1"]}


@pytest.fixture
def orchestrator(tmp_path, store):
    """A running orchestrator whose client beta lacks org/missing."""
    model_map, allocation = write_config(tmp_path, CLIENTS, {"alpha": {"mps_memory_limit_gb": 1.0},
                                                             "beta": {"mps_memory_limit_gb": 0.5}})
    with Orchestrator(tmp_path, store, model_map, allocation) as orch:
        yield orch
