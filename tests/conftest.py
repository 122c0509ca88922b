import pytest
from support import add_model


@pytest.fixture
def store(tmp_path):
    """Four small snapshots, half of them with manifests."""
    root = tmp_path / "store"
    for seed, model in enumerate(["org/a1", "org/a2", "org/b1", "org/g1"]):
        add_model(root, model, seed=seed, manifest=seed % 2 == 0)
    return root
