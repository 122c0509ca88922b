"""The operations doc's readiness story against a real orchestrator on a real socket."""

import os
import re
import signal

import msgspec
from support import add_model, wait_for

from gpu_orchestrator.supervisor.commands.api import ModelsStatus


def test_missing_model_then_fix_then_refresh(orchestrator, store):
    status = orchestrator.wait_settled()
    assert status["in_progress"] is False and status["all_ready"] is False
    # Warm-up progress is in the log, one key=value line per event. A loader's lines reach it through
    # the supervisor's loop, which may relay the last one after the slot has already said "settled".
    lines = (r"INFO loader: model loading client=alpha model=org/a1",
             r"INFO loader: model ready client=alpha model=org/a1 bytes=\d+ seconds=[\d.]+",
             r"ERROR loader: model failed client=beta model=org/missing error=")
    wait_for(lambda: (log := orchestrator.output()) and all(re.search(line, log) for line in lines),
             what="the loaders' lines relayed")
    assert status["summary"] == {"total": 5, "done": 4, "failed": 1, "loading": 0, "pending": 0}
    assert [(e["agent"], e["model"]) for e in status["errors"]] == [("beta", "org/missing")]
    assert "tried:" in status["errors"][0]["error"] and str(store / "org" / "missing") in status["errors"][0]["error"]
    beta = status["clients"]["beta"]
    assert beta["state"] in ("STARTING", "RUNNING") and beta["pid"] > 0 and beta["ready"] is False
    assert [m["status"] for m in beta["models"]] == ["ready", "failed"]
    assert beta["models"][0]["bytes"] == beta["models"][0]["bytes_total"] > 0
    assert beta["memory_limit_bytes"] == 512 * 1024**2
    msgspec.convert(status, ModelsStatus)  # the shape gate and status read: the composer must keep to it

    code, body = orchestrator.post("/models/preload", {"refresh": False})
    assert code == 503 and body["errors"] == status["errors"] and body["started"] is False

    add_model(store, "org/missing")
    code, body = orchestrator.post("/models/preload", {"refresh": True})
    assert code == 202 and body["started"] is True and body["generation"] == status["generation"] + 1
    code, again = orchestrator.post("/models/preload", {"refresh": True})
    # Nothing new starts while a warm-up runs; these models are small enough that the first may
    # already have finished, and then a refresh rightly starts the next one. (The loop's own test,
    # tests/unit/test_arbiter_loop.py, holds a warm-up open to check the first case every time.)
    expected = body["generation"] + 1 if again["started"] else body["generation"]
    assert code in (200, 202) and again["generation"] == expected

    status = orchestrator.wait_settled()
    assert status["all_ready"] is True and status["errors"] == []
    assert status["summary"]["done"] == 5
    code, body = orchestrator.post("/models/preload", {"refresh": False})
    assert code == 200 and body["all_ready"] is True and body["started"] is False
    assert orchestrator.get("/ready")[0] == 200


def test_bad_http_input_changes_nothing(orchestrator):
    before = orchestrator.wait_settled()
    for body in (b'{"refresh": tru', b'{"refresh": "yes"}', b'{"refresh": false, "x": 1}', b"[1]", b"\xff"):
        code, answer = orchestrator.post("/models/preload", body)
        assert code == 400 and "error" in answer
    code, answer = orchestrator.post("/models/preload", b"{" + b" " * 70000 + b"}")
    assert code == 413
    assert orchestrator.get("/nope")[0] == 404
    after = orchestrator.status()
    assert after["generation"] == before["generation"] and after["started_at"] == before["started_at"]
    assert orchestrator.get("/health")[0] == 200


def test_gpu_info_without_a_gpu(orchestrator):
    code, info = orchestrator.get("/gpu/info")
    assert code == 200
    assert info["available"] is False and info["gpus"] == [] and info["mps_enabled"] is False
    assert info["mps"]["enabled"] is False and info["mps"]["pipe_dir"] == "/tmp/nvidia-mps"


def test_mps_allocation_recomputes_the_summary(orchestrator):
    code, body = orchestrator.get("/mps/allocation")
    summary = body["mps_resource_allocation"]["system_summary"]
    assert code == 200
    assert summary["total_agents"] == 2 and summary["total_allocated_memory_gb"] == 1.5
    assert summary["agents_without_allocation"] == ["gamma"]
    assert set(body["mps_resource_allocation"]["agent_allocations"]) == {"alpha", "beta"}


def test_no_preload_waits_for_a_request(tmp_path, store):
    from support import Orchestrator, write_config
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",)) as orch:
        wait_for(lambda: orch.status()["clients"]["alpha"]["state"] == "RUNNING", what="loader running")
        status = orch.status()
        assert status["generation"] == 0 and not status["in_progress"] and not status["all_ready"]
        assert orch.get("/ready")[0] == 503
        assert orch.post("/models/preload", {"refresh": False})[0] == 202
        assert orch.wait_settled()["all_ready"]


def test_token_protects_preload_end_to_end(tmp_path, store):
    from support import Orchestrator, write_config
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map, env={"GPU_ORCHESTRATOR_TOKEN": "t0ken"}) as orch:
        orch.wait_settled()
        assert orch.post("/models/preload", {"refresh": True})[0] == 401
        assert orch.post("/models/preload", {"refresh": True}, {"Authorization": "Bearer t0ken"})[0] == 202
        assert "t0ken" not in orch.output()
        os.kill(orch.proc.pid, signal.SIGTERM)
        assert orch.proc.wait(10) == 0
