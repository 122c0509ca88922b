"""Start-up: until every loader exists, the status still names every client and is not ready."""

import os
from pathlib import Path

from support import Orchestrator, add_model, write_config

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"


def test_a_preload_while_start_up_waits_for_mps_is_never_all_ready(tmp_path):
    """The MPS daemon is slow to come up (FAKE_MPS_HOLD): loaders wait for it, and so must `ready`.
    Before, a preload in that window made /ready answer 200 with zero clients, and `gate` pass."""
    store = tmp_path / "store"
    add_model(store, "org/a1")
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"]}, {"alpha": {"mps_memory_limit_gb": 1.0}})
    hold = tmp_path / "hold"
    hold.touch()
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
           "ENABLE_MPS": "true", "PATH": f"{FAKES}:{os.environ['PATH']}", "FAKE_MPS_HOLD": str(hold)}
    with Orchestrator(tmp_path, store, model_map, allocation, env=env, extra_args=("--mps-start-timeout", "60")) as orch:
        assert orch.post("/models/preload", {"refresh": False})[0] == 202
        code, ready = orch.get("/ready")
        assert code == 503 and ready["summary"]["total"] == 1 and ready["summary"]["pending"] == 1
        alpha = orch.status()["clients"]["alpha"]
        assert alpha["state"] == "STOPPED" and alpha["pid"] is None and not alpha["ready"]
        hold.unlink()  # the daemon comes up: the loader starts under it and the queued warm-up runs
        status = orch.wait_settled()
        assert status["all_ready"] and status["clients"]["alpha"]["pid"] is not None
