"""SIGHUP never stops supervision: the files are read off the loop, and a read that hangs gives up."""

import os
import signal
import threading

import pytest
from support import Orchestrator, add_model, wait_for, write_config

from gpu_orchestrator.supervisor.config import ConfigError
from gpu_orchestrator.supervisor.mps import process_alive
from gpu_orchestrator.supervisor.reload import PendingReload


def test_a_read_that_hangs_gives_up_with_a_reason_and_never_blocks_the_caller():
    release = threading.Event()
    woken = threading.Event()
    pending = PendingReload(lambda: release.wait(60), woken.set, timeout=0.3)
    assert pending.outcome(pending.deadline - 0.1) is None  # still reading: the loop goes on
    outcome = pending.outcome(pending.deadline)
    assert isinstance(outcome, ConfigError) and "took longer than 0.3 s" in str(outcome)
    release.set()
    assert woken.wait(30)


@pytest.mark.parametrize("error", [ConfigError("map.json: $.a: bad"), OverflowError("int too large")])
def test_any_error_while_reading_is_a_refusal_never_a_crash(error):
    def read():
        raise error
    woken = threading.Event()
    pending = PendingReload(read, woken.set)
    assert woken.wait(30)
    outcome = pending.outcome(pending.deadline - 1)
    assert isinstance(outcome, ConfigError) and str(error) in str(outcome)


def test_sighup_with_the_model_map_replaced_by_a_fifo_keeps_supervising(tmp_path):
    store = tmp_path / "store"
    add_model(store, "org/a1")
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map) as orch:
        assert orch.wait_settled()["all_ready"]
        model_map.unlink()
        os.mkfifo(model_map)  # opening this for reading blocks until a writer comes: none will
        os.kill(orch.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused; the running configuration stays" in orch.output(),
                 what="the reload refused")
        victim = orch.loader_pid("alpha")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not process_alive(victim), what="the loader gone")
        status = wait_for(lambda: (s := orch.status())["all_ready"] and s["clients"]["alpha"]["pid"] != victim and s,
                          what="the killed loader replaced while a reload was refused")
        assert status["clients"]["alpha"]["restarts"] == 1
        assert "not a regular file" in orch.output() or "took longer than" in orch.output()


def test_sighup_after_an_informational_allocation_edit_keeps_the_loader_and_ready(tmp_path):
    # Any edit of an allocation once restarted its client's loader, and /ready was 503 until re-read.
    import json
    store = tmp_path / "store"
    add_model(store, "org/a1")
    allocation = {"mps_memory_limit_gb": 2.3, "calculated_requirement_gb": 2.0, "safety_margin_gb": 0.3,
                  "priority": "high", "models": ["org/a1"]}
    model_map, allocation_path = write_config(tmp_path, {"alpha": ["org/a1"]}, {"alpha": allocation})
    with Orchestrator(tmp_path, store, model_map, allocation_path) as orch:
        assert orch.wait_settled()["all_ready"]
        pid = orch.loader_pid("alpha")
        document = json.loads(allocation_path.read_text())
        document["mps_resource_allocation"]["agent_allocations"]["alpha"].update(
            priority="low", calculated_requirement_gb=1.5, safety_margin_gb=0.8, models=["org/a1", "org/b1"])
        allocation_path.write_text(json.dumps(document))
        os.kill(orch.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reloaded" in orch.output(), what="the reload applied")
        assert "changed=-" in orch.output()
        status = orch.status()
        assert status["all_ready"] and status["clients"]["alpha"]["pid"] == pid
        assert orch.get("/ready")[0] == 200
