"""48 loaders warm up while a load generator keeps /models/status and /gpu/info busy."""

import time

from support import SOAK, Orchestrator, add_model, write_config

from gpu_orchestrator.supervisor.commands.loadgen import finish_load, start_load

CLIENTS = 48


def test_readiness_arrives_under_load(tmp_path, record):
    store = tmp_path / "store"
    models = {}
    for index in range(CLIENTS):
        ids = [f"org/c{index}-m{n}" for n in range(2)]
        for n, model in enumerate(ids):
            add_model(store, model, shape=(128, 2, 4000), seed=index * 2 + n)
        models[f"client{index:02d}"] = ids
    model_map, _ = write_config(tmp_path, models)
    seconds = 120 if SOAK else 30
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",)) as orch:
        workers = start_load(orch.url, ["/models/status", "/gpu/info"], seconds, 4)
        started = time.monotonic()
        assert orch.post("/models/preload", {"refresh": False})[0] == 202
        ready_after = None
        while time.monotonic() - started < seconds:
            if ready_after is None and orch.status()["all_ready"]:
                ready_after = time.monotonic() - started
            time.sleep(0.2)
        result = finish_load(workers, seconds)  # reads their output as they finish
        if ready_after is None:
            ready_after = orch.wait_settled(timeout=120) and time.monotonic() - started
        assert orch.status()["all_ready"]
    assert result["errors"] == 0 and result["requests"] > 0, result
    record("load", loaders=CLIENTS, models=CLIENTS * 2, load_seconds=seconds, requests=result["requests"],
           error_responses=0, all_ready_after_s=round(ready_after, 1))
