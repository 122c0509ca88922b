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
from support import Orchestrator, wait_for, write_config, write_figures

from gpu_orchestrator.supervisor.mps import process_alive

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
    result = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "mps-diag", "--timeout", "1", *args],
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
        # Only our loader: other runs on this machine may have loaders of their own named alpha.
        ours = f"client alpha (pid {orch.loader_pid('alpha')})"
        limits = [c["detail"] for c in found["loader limits"] if ours in c["detail"]]
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


def one_line_per_check(dirs) -> tuple[int, dict, str]:
    """The human report and the JSON one, each ending without a traceback."""
    code, human = diag(dirs)
    json_code, found = checks(dirs)
    assert code == json_code and "Traceback" not in human
    return code, found, human


def test_a_pipe_folder_under_a_file(dirs):
    blocker = Path(dirs["CUDA_MPS_PIPE_DIRECTORY"]).parent / "a-file"
    blocker.write_text("in the way")
    dirs = {**dirs, "CUDA_MPS_PIPE_DIRECTORY": str(blocker / "pipe")}
    code, found, human = one_line_per_check(dirs)
    assert code == 1
    folder = found["pipe directory"][0]
    assert folder["status"] == "problem" and "a folder above it is a file" in folder["detail"]
    assert found["pid file"][0]["detail"].endswith("Not a directory")


@pytest.mark.parametrize("content", ["-1", "0", "garbage\n"])
def test_a_pid_file_that_names_no_process(dirs, content):
    pipe = Path(dirs["CUDA_MPS_PIPE_DIRECTORY"])
    pipe.mkdir(mode=0o755)
    (pipe / "nvidia-cuda-mps-control.pid").write_text(content)
    code, found, _ = one_line_per_check(dirs)
    assert code == 1
    pid = found["pid file"][0]
    assert pid["status"] == "problem" and f"holds {content.strip()!r}, not a process id" in pid["detail"]
    assert "remove" in pid["fix"]


def test_fifos_where_files_belong_are_refused_not_waited_on(dirs):
    pipe, logs = Path(dirs["CUDA_MPS_PIPE_DIRECTORY"]), Path(dirs["CUDA_MPS_LOG_DIRECTORY"])
    pipe.mkdir(mode=0o755)
    logs.mkdir(mode=0o755)
    os.mkfifo(logs / "control.log")  # opening it to read would wait for a writer for ever
    os.mkfifo(pipe / "nvidia-cuda-mps-control.pid")
    code, found, _ = one_line_per_check(dirs)
    assert code == 1
    assert found["control.log"][0]["status"] == "problem"
    assert found["control.log"][0]["detail"] == f"{logs / 'control.log'} is a FIFO, not a regular file"
    assert found["pid file"][0]["detail"].endswith("nvidia-cuda-mps-control.pid is a FIFO, not a regular file")


def test_only_the_tail_of_a_huge_log_is_read(dirs):
    logs = Path(dirs["CUDA_MPS_LOG_DIRECTORY"])
    logs.mkdir(mode=0o755)
    huge = logs / "server.log"
    with open(huge, "wb") as out:  # sparse: 512 MiB to read, nothing on disk
        out.truncate(512 * 1024 * 1024)
        out.seek(0, os.SEEK_END)
        out.write(b"\n[ERROR] Failed to allocate device memory for client 4242\n")
    # How much the command read in all (rchar), imports included: the log read whole would be 512 MiB.
    script = ("import sys; from gpu_orchestrator.supervisor.commands.cli import main; code = main(sys.argv[1:]); "
              "print(open('/proc/self/io').read(), file=sys.stderr); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, "mps-diag", "--json", "--timeout", "1"],
                            capture_output=True, text=True, env={**os.environ, **dirs}, timeout=60)
    read = int(next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("rchar:")))
    assert read < 64 * 1024 * 1024, f"read {read} bytes"
    server_log = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "server.log")
    assert server_log["status"] == "warning" and "Failed to allocate device memory" in server_log["detail"]
    write_figures("mps-diag with a 512 MiB server.log", bytes_read_by_the_command=read)


def test_bad_arguments_are_one_line_and_exit_2(dirs):
    result = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "mps-diag", "--timeout", "nan"],
                            capture_output=True, text=True, env={**os.environ, **dirs}, timeout=60)
    assert result.returncode == 2
    assert result.stderr == ("gpu-orchestrator mps-diag: error: --timeout: "
                             "expected a positive number of seconds up to 604800, got 'nan'\n")
