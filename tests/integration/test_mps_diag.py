"""`gpu-orchestrator mps-diag` against healthy and broken MPS setups, human and --json."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gpu_orchestrator.supervisor.mps import process_alive
from support import Orchestrator, wait_for, write_config

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"


@pytest.fixture
def dirs():
    # pytest's own tmp folder is 0700, which diag rightly flags: MPS folders need traversable parents.
    base = Path(tempfile.mkdtemp(prefix="gpu-orchestrator-mps-"))
    base.chmod(0o755)
    yield {"CUDA_MPS_PIPE_DIRECTORY": str(base / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(base / "log"),
           "PATH": f"{FAKES}:{os.environ['PATH']}"}
    shutil.rmtree(base, ignore_errors=True)


def diag(dirs, *args):
    result = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.cli", "mps-diag", "--timeout", "1", *args],
                            capture_output=True, text=True, env={**os.environ, **dirs}, timeout=60)
    return result.returncode, result.stdout


def checks(dirs) -> tuple[int, dict]:
    code, out = diag(dirs, "--json")
    document = json.loads(out)
    assert document["exit_code"] == code
    by_name = {}
    for check in document["checks"]:
        by_name.setdefault(check["name"], []).append(check)
    return code, by_name


@pytest.fixture
def daemon(dirs):
    subprocess.run([str(FAKES / "nvidia-cuda-mps-control"), "-d"], env={**os.environ, **dirs}, check=True)
    pid = int((Path(dirs["CUDA_MPS_PIPE_DIRECTORY"]) / "nvidia-cuda-mps-control.pid").read_text())
    yield pid
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what="fake daemon gone")


def test_healthy_setup_with_a_running_orchestrator(tmp_path, store, dirs):
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"]}, {"alpha": {"mps_memory_limit_gb": 2.0}})
    with Orchestrator(tmp_path, store, model_map, allocation, env={**dirs, "ENABLE_MPS": "true"}) as orch:
        orch.wait_settled()
        code, found = checks(dirs)
        assert code == 0, found
        assert found["control answers"][0]["status"] == "ok"
        limits = [c["detail"] for c in found["loader limits"] if "client alpha" in c["detail"]]
        assert limits and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=2048M" in limits[0]
        assert found["compute mode"][0]["status"] == "skipped"
        code, human = diag(dirs)
        assert code == 0 and "No problems found." in human and "ok       control answers" in human


def test_missing_folders(dirs):
    code, found = checks(dirs)
    assert code == 1
    assert found["pipe directory"][0]["status"] == "problem" and "does not exist" in found["pipe directory"][0]["detail"]
    assert "install -d -m 0755" in found["pipe directory"][0]["fix"]
    code, human = diag(dirs)
    assert code == 1 and "PROBLEM  pipe directory" in human and "-> start the daemon" in human


def test_too_tight_permissions(dirs, daemon):
    os.chmod(dirs["CUDA_MPS_PIPE_DIRECTORY"], 0o700)
    code, found = checks(dirs)
    assert code == 1
    problem = found["pipe directory"][0]
    assert problem["status"] == "problem" and "other users cannot enter it" in problem["detail"]
    assert "chmod 0755" in problem["fix"]


def test_dead_daemon(dirs, daemon):
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not process_alive(daemon), what="fake daemon gone")
    code, found = checks(dirs)
    assert code == 1
    assert found["pid file"][0]["status"] == "problem" and "not running" in found["pid file"][0]["detail"]
    assert found["control answers"][0]["status"] == "problem"


def test_hung_daemon(dirs, daemon):
    os.kill(daemon, signal.SIGSTOP)
    try:
        code, found = checks(dirs)
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert code == 1
    answers = found["control answers"][0]
    assert answers["status"] == "problem" and "hung" in answers["detail"] and "kill" in answers["fix"]
    assert found["pid file"][0]["status"] == "ok"


def test_errors_in_the_logs_are_shown(dirs, daemon):
    with open(Path(dirs["CUDA_MPS_LOG_DIRECTORY"]) / "server.log", "w") as log:
        log.write("[INFO] fine\n[ERROR] Failed to allocate device memory for client 4242\n")
    code, found = checks(dirs)
    assert code == 0
    assert found["server.log"][0]["status"] == "warning"
    assert "Failed to allocate device memory" in found["server.log"][0]["detail"]


def test_script_wrapper(dirs):
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts" / "mps-diag"), "--json"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **dirs, "PATH": f"{bin_dir}:{dirs['PATH']}"})
    assert result.returncode == 1 and json.loads(result.stdout)["problems"] >= 1
