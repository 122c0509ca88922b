"""The supervisor stopped (SIGTERM) or killed (SIGKILL): nothing is left behind either way."""

import os
import time
from pathlib import Path

from support import Orchestrator, children_of, wait_for, write_config

from gpu_orchestrator.loaders import channel
from gpu_orchestrator.supervisor.mps import process_alive

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"


def mps_env(tmp_path):
    return {"ENABLE_MPS": "true", "PATH": f"{FAKES}:{os.environ['PATH']}",
            "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log")}


def test_sigterm_stops_loaders_and_the_mps_daemon_it_started(tmp_path, store, record):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"], "gamma": ["org/g1"]})
    with Orchestrator(tmp_path, store, model_map, env=mps_env(tmp_path)) as orch:
        orch.wait_settled()
        daemon = orch.get("/gpu/info")[1]["mps"]["control_pid"]
        # Three loaders and the daemon; a probe's one-command nvidia-cuda-mps-control may come and go.
        children = wait_for(lambda: len(c := children_of(orch.proc.pid)) == 4 and c, what="no probe client running")
        assert daemon in children
        started = time.monotonic()
        assert orch.stop(timeout=10) == 0
        took = time.monotonic() - started
        assert all(not process_alive(pid) for pid in children)
        assert not os.path.exists(channel.segment_path(orch.segment))
        assert not (tmp_path / "pipe" / "control").exists()
        assert "Received command: quit" in (tmp_path / "log" / "control.log").read_text()
    record("supervisor SIGTERM", exit_seconds=round(took, 2), children_left=0, shm_left=0, mps_daemon_quit=True)


def test_sigkill_loaders_leave_by_themselves_and_next_start_is_clean(tmp_path, store, record):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"], "gamma": ["org/g1"]})
    first = Orchestrator(tmp_path, store, model_map).start()
    try:
        first.wait_settled()
        loaders = children_of(first.proc.pid)
        first.proc.kill()
        first.proc.wait(10)
        killed_at = time.monotonic()
        # A zombie has exited; whether PID 1 has reaped it yet is not the loader's doing.
        wait_for(lambda: all(not process_alive(pid) for pid in loaders), timeout=2, interval=0.01,
                 what="every loader to exit within 2 s of the supervisor's death")
        exited_within = time.monotonic() - killed_at
        stale = channel.segment_path(first.segment)
        assert os.path.exists(stale)
    finally:
        if first.proc.poll() is None:
            first.kill_everything()
        first.log.close()
    with Orchestrator(tmp_path, store, model_map) as second:
        assert not os.path.exists(stale)
        assert second.wait_settled()["all_ready"]
    record("supervisor SIGKILL", loaders=len(loaders), loaders_exited_within_s=round(exited_within, 2),
           stale_segment_removed_at_next_start=True)
