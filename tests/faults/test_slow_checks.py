"""A model whose checks take longer than the heartbeat timeout, and one that keeps killing its loader.

The slow model is a valid safetensors file whose header lists 600,000 one-element
tensors (a 46 MB header, several seconds of checking on these machines): longer
than the 3 s heartbeat timeout the orchestrator runs with here, and the JSON parse
alone holds the GIL for seconds. The loader's heartbeat thread publishes while the
checks run in Python, and the supervisor counts CPU time growing as a sign of life
during the parse, so it is never killed for it (a stopped loader, using no CPU, still is). A model during
whose load the loader dies again and again (here the test kills it, as the OOM
killer would) is failed with the reason, and the client's other models stay ready.
"""

import json
import os
import signal
import time
from pathlib import Path

from support import Orchestrator, add_model, safetensors_bytes, wait_for, write_config

from gpu_orchestrator.supervisor.mps import process_alive

TENSORS = 600_000


def add_slow_model(store: Path, model_id: str) -> None:
    path = store / model_id
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(TENSORS)}
    (path / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(4 * TENSORS)))


def model_state(orch: Orchestrator, client: str, model: str) -> tuple[dict, dict]:
    status = orch.status()
    entry = status["clients"][client]
    return entry, next(m for m in entry["models"] if m["model"] == model)


def test_slow_checks_keep_their_heartbeat_and_a_model_that_kills_its_loader_fails(tmp_path, record):
    store = tmp_path / "store"
    add_model(store, "org/small")
    add_slow_model(store, "org/slow")
    model_map, _ = write_config(tmp_path, {"alpha": ["org/small", "org/slow"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--heartbeat-timeout", "3")) as orch:
        started = time.monotonic()
        first = orch.wait_settled(timeout=120)
        check_seconds = next(m["seconds"] for m in first["clients"]["alpha"]["models"] if m["model"] == "org/slow")
        assert first["all_ready"], first["errors"]
        assert first["clients"]["alpha"]["restarts"] == 0
        assert "heartbeat lost" not in orch.output()

        # Now its loader dies while loading org/slow, again and again.
        assert orch.post("/models/preload", {"refresh": True})[0] == 202
        killed: list[int] = []
        while len(killed) < 3:
            def loading():
                entry, model = model_state(orch, "alpha", "org/slow")
                fresh = entry["state"] == "RUNNING" and entry["pid"] not in killed  # not a reaped one's last word
                return entry["pid"] if fresh and model["status"] == "loading" else None
            pid = wait_for(loading, timeout=60, interval=0.02, what="a new alpha loader loading org/slow")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            wait_for(lambda: not process_alive(pid), what="the killed loader reaped")
        kills = len(killed)
        settled = orch.wait_settled(timeout=120)
        entry, slow = model_state(orch, "alpha", "org/slow")
        _, small = model_state(orch, "alpha", "org/small")
        assert slow["status"] == "failed"
        assert "its loader died 3 times while loading it; the last run killed by SIGKILL at " in slow["error"]
        assert small["status"] == "ready" and entry["state"] == "RUNNING" and not settled["all_ready"]
        assert entry["restarts"] == 3

        # A refresh forgets the deaths and tries the model again.
        assert orch.post("/models/preload", {"refresh": True})[0] == 202
        again = orch.wait_settled(timeout=120)
        assert again["all_ready"], again["errors"]
        record("slow checks and a model that kills its loader", header_tensors=TENSORS,
               check_seconds=check_seconds, heartbeat_timeout_s=3, heartbeat_kills=0,
               loader_deaths_before_model_failed=kills, seconds=round(time.monotonic() - started, 1))
