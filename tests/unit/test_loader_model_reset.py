"""A model loaded again starts from nothing: when a refresh's load fails, or the supervisor fails the
model, no field of an earlier load (verified, path, format, parameters, bytes, device) stays beside
the new outcome, which a reader would take for this load's."""

from gpu_orchestrator.loaders.__main__ import Loader
from gpu_orchestrator.loaders.store import StoreError
from gpu_orchestrator.loaders.wire import FAILED, IDLE, READY, LoadCommand, LoaderState, ModelProgress


class GoneStore:
    def resolve(self, client, model):
        raise StoreError(f"model {model} not found")


def loaded_before(model: str) -> ModelProgress:
    """A model as a verified torch load left it."""
    return ModelProgress(model, status=READY, path="/store/org/x", format="safetensors", bytes_done=100,
                         bytes_total=100, weight_bytes=90, parameters=20480, seconds=1.5, verified=True,
                         backend="torch", device="cuda:0", device_memory_bytes=4096, embedding_dim=384,
                         note="warm-up inference ran")


def loader_with(*models: ModelProgress) -> Loader:
    loader = Loader.__new__(Loader)  # what warm_up and load use, without a slot, signal handlers or a store
    loader.client, loader.command, loader.backend, loader.limit_bytes = "a", None, "torch", None
    loader.store = GoneStore()
    loader.state = LoaderState("a", 1, 0, IDLE, 0.0, list(models))
    loader.publish = lambda: None
    return loader


def test_a_refresh_that_fails_a_model_leaves_nothing_of_its_earlier_load():
    loader = loader_with(loaded_before("org/x"))
    loader.warm_up(LoadCommand(generation=2, refresh=True))
    model = loader.state.models[0]
    assert model.status == FAILED and "model org/x not found" in model.error
    fresh = ModelProgress("org/x", status=FAILED, backend="torch", error=model.error, seconds=model.seconds)
    assert model == fresh


def test_a_model_the_supervisor_fails_leaves_nothing_of_its_earlier_load():
    loader = loader_with(loaded_before("org/x"), loaded_before("org/y"))
    loader.warm_up(LoadCommand(generation=2, failed={"org/x": "it killed its loader 3 times"}))
    assert loader.state.models[0] == ModelProgress("org/x", status=FAILED, backend="torch",
                                                   error="it killed its loader 3 times")
    assert loader.state.models[1] == loaded_before("org/y")  # not refreshed: kept as it was
