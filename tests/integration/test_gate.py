"""`gpu-orchestrator gate` against a live orchestrator, and its cached summaries."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from support import Orchestrator, free_port, wait_for, write_config

REPO = Path(__file__).resolve().parents[2]


def gate(tmp_path, *args, env=None):
    full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.cli", "gate", *args],
                          capture_output=True, text=True, env=full_env, timeout=120)


def summary_file(tmp_path, instance):
    return json.loads((tmp_path / "cache" / "gpu-orchestrator" / "preflight" / f"summary_{instance}.json").read_text())


def test_failures_are_listed_per_model_and_instances_filter(tmp_path, orchestrator):
    result = gate(tmp_path, "--url", orchestrator.url, "--timeout", "60")
    assert result.returncode == 1
    assert "agent=beta model=org/missing error=model org/missing not found" in result.stderr
    assert "total=5 done=4 failed=1" in result.stderr
    cached = summary_file(tmp_path, "all")
    assert cached["result"] == "failed" and cached["exit_code"] == 1
    assert cached["errors"][0]["model"] == "org/missing" and cached["summary"]["failed"] == 1

    alpha = gate(tmp_path, "alpha", "--url", orchestrator.url, "--timeout", "60")
    assert alpha.returncode == 0, alpha.stderr
    assert summary_file(tmp_path, "alpha")["result"] == "ready"
    beta = gate(tmp_path, "beta", "--url", orchestrator.url, "--timeout", "60")
    assert beta.returncode == 1 and "agent=beta model=org/missing" in beta.stderr
    assert "agent=alpha" not in beta.stderr


def test_ready_host_passes_and_the_wrapper_script_works(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"], "gamma": ["org/g1"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",)) as orch:
        # Nothing warmed yet: the gate itself asks for the warm-up and waits for it.
        result = gate(tmp_path, "gamma", "--url", orch.url)
        assert result.returncode == 0, result.stderr
        assert orch.status()["generation"] == 1
        cached = summary_file(tmp_path, "gamma")
        assert cached["result"] == "ready" and cached["instance"] == "gamma" and cached["elapsed_s"] >= 0
        port = orch.url.rsplit(":", 1)[1]
        bin_dir = str(Path(sys.executable).parent)
        wrapped = subprocess.run([str(REPO / "scripts" / "preflight.sh"), "--gate-only", "alpha"],
                                 capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "GPU_ORCHESTRATOR_PORT": port, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                      "XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert wrapped.returncode == 0, wrapped.stderr
        assert summary_file(tmp_path, "alpha")["result"] == "ready"


def test_timeout_when_a_warmup_never_finishes(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",)) as orch:
        wait_for(lambda: orch.status()["clients"]["alpha"]["pid"], what="loader up")
        frozen = orch.loader_pid("alpha")
        os.kill(frozen, signal.SIGSTOP)
        try:
            result = gate(tmp_path, "alpha", "--url", orch.url, env={"GATE_TIMEOUT": "2"})
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert result.returncode == 1
        assert "models not ready after 2 s" in result.stderr
        assert summary_file(tmp_path, "alpha")["result"] == "timeout"


def test_nothing_listening_and_the_orchestrator_itself(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = gate(tmp_path, "alpha", "--url", url, "--timeout", "1")
    assert result.returncode == 1 and f"nothing listens at {url}" in result.stderr
    assert summary_file(tmp_path, "alpha")["result"] == "unreachable"
    itself = gate(tmp_path, "gpu_orchestrator", "--url", url, "--timeout", "1")
    assert itself.returncode == 0 and summary_file(tmp_path, "gpu_orchestrator")["result"] == "skipped"
