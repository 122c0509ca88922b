"""Access: loopback by default, a token on POSTs, nothing outside the store, private modes."""

import os
import stat
from pathlib import Path

import psutil
from support import Orchestrator, add_model, status_code, write_config

from gpu_orchestrator.loaders import channel
from gpu_orchestrator.supervisor.config import load_config

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"


def test_default_bind_is_loopback(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    assert load_config({"MODEL_STORE_ROOT": str(store), "AGENT_MODEL_MAP": str(model_map)}).host == "127.0.0.1"
    with Orchestrator(tmp_path, store, model_map) as orch:
        listening = [c.laddr for c in psutil.Process(orch.proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert [addr.ip for addr in listening] == ["127.0.0.1"]


def test_token_store_confinement_and_modes(tmp_path, store, record):
    outside = tmp_path / "secret-model"
    add_model(tmp_path, "secret-model")
    (store / "org" / "escape").symlink_to(outside)
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1", "org/escape"]})
    env = {"GPU_ORCHESTRATOR_TOKEN": "s3cr3t-token", "ENABLE_MPS": "true", "PATH": f"{FAKES}:{os.environ['PATH']}",
           "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps" / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps" / "log")}
    with Orchestrator(tmp_path, store, model_map, env=env) as orch:
        status = orch.wait_settled()
        error = next(e["error"] for e in status["errors"] if e["model"] == "org/escape")
        assert "outside MODEL_STORE_ROOT" in error and "refused" in error
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cr3t-token"},
                        {"Authorization": "Bearer s3cr3t-toke"}, {"Authorization": "Bearer s3cr3t-tokenX"},
                        {"Authorization": "Basic s3cr3t-token"}):
            code, body = orch.post("/models/preload", {"refresh": True}, headers)
            assert code == 401 and body["status"] == 401
        assert orch.status()["generation"] == status["generation"]
        for path in ("/health", "/models/status", "/gpu/info", "/mps/allocation", "/metrics"):
            assert status_code(orch.url + path) == 200, path  # GETs need no token
        assert status_code(orch.url + "/ready") == 503  # org/escape failed: open, and truthful
        assert orch.post("/models/preload", {"refresh": True}, {"Authorization": "Bearer s3cr3t-token"})[0] == 202
        segment_mode = stat.S_IMODE(os.stat(channel.segment_path(orch.segment)).st_mode)
        assert segment_mode == 0o600
        for folder in ("pipe", "log"):
            assert stat.S_IMODE((tmp_path / "mps" / folder).stat().st_mode) == 0o755
        assert "s3cr3t-token" not in orch.output()
    record("access", wrong_tokens_refused=6, escape_refused=True, segment_mode="0600", mps_folders="0755",
           token_in_logs=False)
