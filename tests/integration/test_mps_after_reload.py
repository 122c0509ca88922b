"""A restarted MPS daemon after a reload grew the map: every loader still follows it (real processes,
the fake nvidia-cuda-mps-control first on PATH)."""

import json
import os
import signal
from pathlib import Path

from support import Orchestrator, add_model, wait_for, write_config

from gpu_orchestrator.supervisor.mps import process_alive

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"


def test_every_loader_follows_a_restarted_daemon_with_fewer_free_slots_than_loaders(tmp_path):
    # 1 client at start (17 slots), 10 after a reload (7 free): the loop once waited for 10 free
    # slots, silently forever, and the loaders ran on without the new daemon.
    store = tmp_path / "store"
    clients = {f"c{i}": [f"org/m{i}"] for i in range(10)}
    for (model,) in clients.values():
        add_model(store, model)
    model_map, _ = write_config(tmp_path, {"c0": clients["c0"]})
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps-log"),
           "ENABLE_MPS": "true", "PATH": f"{FAKES}:{os.environ['PATH']}"}
    fast = ("--mps-probe-interval", "0.3", "--mps-timeout", "1")
    with Orchestrator(tmp_path, store, model_map, extra_args=fast, env=env) as orch:
        orch.wait_settled()
        model_map.write_text(json.dumps(clients))
        os.kill(orch.proc.pid, signal.SIGHUP)
        wait_for(lambda: (s := orch.status())["all_ready"] and len(s["clients"]) == 10, what="10 clients ready")
        before = {c: orch.loader_pid(c) for c in clients}
        first = orch.get("/gpu/info")[1]["mps"]["control_pid"]
        os.kill(first, signal.SIGKILL)

        def followed():
            status = orch.status()
            fresh = all(status["clients"][c]["pid"] not in (None, before[c]) for c in clients)
            return status if fresh and status["all_ready"] else None

        status = wait_for(followed, timeout=60, what="every loader replaced under the new daemon")
        assert not process_alive(first) and orch.get("/gpu/info")[1]["mps"]["control_pid"] != first
        assert not any(process_alive(pid) for pid in before.values())
        for client in clients:
            environ = Path(f"/proc/{status['clients'][client]['pid']}/environ").read_bytes()
            assert f"CUDA_MPS_PIPE_DIRECTORY={env['CUDA_MPS_PIPE_DIRECTORY']}".encode() in environ
        assert "replacing every loader under the new MPS control daemon" in orch.output()
