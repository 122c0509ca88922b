"""48 loaders warm up while a load generator keeps /models/status and /gpu/info busy."""

import json
import subprocess
import sys
import time
from pathlib import Path

from support import SOAK
from support import Orchestrator, add_model, write_config

GENERATOR = Path(__file__).resolve().parents[1] / "load_generator.py"
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
        generator = subprocess.Popen([sys.executable, str(GENERATOR), orch.url, str(seconds), "4",
                                      "/models/status", "/gpu/info"], stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        assert orch.post("/models/preload", {"refresh": False})[0] == 202
        ready_after = None
        while generator.poll() is None:
            if ready_after is None and orch.status()["all_ready"]:
                ready_after = time.monotonic() - started
            time.sleep(0.2)
        counts = json.loads(generator.stdout.read())
        if ready_after is None:
            ready_after = orch.wait_settled(timeout=120) and time.monotonic() - started
        assert orch.status()["all_ready"]
    served = counts.get("200", 0)
    assert set(counts) == {"200"}, counts
    assert served > 0
    record("load", loaders=CLIENTS, models=CLIENTS * 2, load_seconds=seconds, requests=served,
           error_responses=0, all_ready_after_s=round(ready_after, 1))
