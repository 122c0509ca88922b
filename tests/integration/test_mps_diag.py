"""`gpu-orchestrator mps-diag` against healthy and broken MPS setups, human and --json."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from support import Orchestrator, wait_for, write_config, write_figures

from gpu_orchestrator.supervisor.commands import diag as mps_diag
from gpu_orchestrator.supervisor.mps import process_alive
from gpu_orchestrator.supervisor.mps_control import MpsSettings

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


def foreign_problems(found, ours=()) -> bool:
    """Loaders of other runs on this machine, which mps-diag rightly flags: not pointed at our pipe folder."""
    return any(c["status"] == "problem" and not any(f"(pid {pid})" in c["detail"] for pid in ours)
               for c in found.get("loader limits", []))


def start_daemon(dirs) -> int:
    subprocess.run([str(FAKES / "nvidia-cuda-mps-control"), "-d"], env={**os.environ, **dirs}, check=True)
    return int((Path(dirs["CUDA_MPS_PIPE_DIRECTORY"]) / "nvidia-cuda-mps-control.pid").read_text())


def stop(pid):
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(pid), what=f"process {pid} gone")


@pytest.fixture
def daemon(dirs):
    pid = start_daemon(dirs)
    yield pid
    stop(pid)


@pytest.fixture
def other_dirs(dirs):
    """Another pipe and log folder, as a second orchestrator (or gpu-check) on the host uses."""
    base = Path(dirs["CUDA_MPS_PIPE_DIRECTORY"]).parent
    return {**dirs, "CUDA_MPS_PIPE_DIRECTORY": str(base / "other-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(base / "other-log")}


@pytest.fixture
def other_daemon(other_dirs):
    pid = start_daemon(other_dirs)
    yield pid
    stop(pid)


def test_healthy_setup_with_a_running_orchestrator(tmp_path, store, dirs):
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"]}, {"alpha": {"mps_memory_limit_gb": 2.0}})
    with Orchestrator(tmp_path, store, model_map, allocation, env={**dirs, "ENABLE_MPS": "true"}) as orch:
        orch.wait_settled()
        code, found = checks(dirs)
        foreign = foreign_problems(found, [orch.loader_pid("alpha")])
        assert code == (1 if foreign else 0), found
        assert found["control answers"][0]["status"] == "ok"
        # Only our loader: other runs on this machine may have loaders of their own named alpha.
        ours = f"client alpha (pid {orch.loader_pid('alpha')})"
        limits = [c["detail"] for c in found["loader limits"] if ours in c["detail"]]
        assert limits and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=2048M" in limits[0]
        assert found["compute mode"][0]["status"] == "skipped"
        code, human = diag(dirs)
        assert "ok       control answers" in human and "Traceback" not in human
        assert foreign or (code == 0 and "No problems found." in human)


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
    assert code == (1 if foreign_problems(found) else 0), found
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


def daemon_checks(found, pid) -> list[dict]:
    return [c for c in found["daemon process"] if c["detail"].startswith(f"pid {pid} (")]


def test_a_daemon_serving_another_pipe_directory_is_not_this_ones(dirs, other_dirs, other_daemon):
    """Seen on a host: 'control pipe ... is missing' next to 'ok daemon process' for a daemon elsewhere."""
    pipe, other = dirs["CUDA_MPS_PIPE_DIRECTORY"], other_dirs["CUDA_MPS_PIPE_DIRECTORY"]
    code, found = checks(dirs)
    assert code == 1
    [seen] = daemon_checks(found, other_daemon)
    assert seen["status"] == "warning" and seen["detail"].endswith(f"serves another pipe directory, {other}")
    assert f"mps-diag --pipe-dir {other}" in seen["fix"]
    assert [c["status"] for c in found["daemon process"] if c["status"] in ("ok", "problem")] == ["problem"]
    assert f"no nvidia-cuda-mps-control daemon serves {pipe}" in found["daemon process"][-1]["detail"]
    code, found = checks(other_dirs)  # pointed at its folder, mps-diag finds it well
    assert daemon_checks(found, other_daemon)[0]["status"] == "ok"
    assert daemon_checks(found, other_daemon)[0]["detail"].endswith(f"serving {other}")


def test_beside_this_folders_daemon_another_is_a_warning(dirs, daemon, other_daemon):
    code, found = checks(dirs)
    assert code == (1 if foreign_problems(found) else 0), found
    assert daemon_checks(found, daemon)[0]["status"] == "ok"
    assert daemon_checks(found, other_daemon)[0]["status"] == "warning"


def test_a_daemon_whose_environment_cannot_be_read(monkeypatch, dirs, other_dirs, daemon, other_daemon):
    """Another user's daemon: its pid file tells where it serves, else mps-diag says it cannot tell."""
    def denied(process):
        raise psutil.AccessDenied(process.pid)

    monkeypatch.setattr(psutil.Process, "environ", denied)
    settings = MpsSettings(dirs["CUDA_MPS_PIPE_DIRECTORY"], dirs["CUDA_MPS_LOG_DIRECTORY"])
    found = {"daemon process": [vars(c) for c in mps_diag.check_daemon_process(settings)]}
    assert daemon_checks(found, daemon)[0]["status"] == "ok"  # named by this folder's pid file
    [unknown] = daemon_checks(found, other_daemon)
    assert unknown["status"] == "warning" and "its environment cannot be read" in unknown["detail"]
    stop(daemon)
    found = {"daemon process": [vars(c) for c in mps_diag.check_daemon_process(settings)]}
    assert not [c for c in found["daemon process"] if c["status"] in ("ok", "problem")]
    assert found["daemon process"][-1]["status"] == "error" and f"pid {other_daemon}" in found["daemon process"][-1]["detail"]


def fake_loader(variables) -> subprocess.Popen:
    """A process mps-diag takes for a loader (its command line names gpu_orchestrator.loaders), with these variables."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "gpu_orchestrator.loaders"],
                            env={"PATH": os.environ["PATH"], "GPU_ORCHESTRATOR_CLIENT": "stray", **variables})


def loader_check(dirs, variables) -> tuple[int, dict]:
    loader = fake_loader(variables)
    try:
        code, found = checks(dirs)
    finally:
        loader.kill()
        loader.wait()
    [seen] = [c for c in found["loader limits"] if f"client stray (pid {loader.pid})" in c["detail"]]
    return code, seen


@pytest.mark.parametrize("variables, says, fix", [
    ({"CUDA_MPS_PIPE_DIRECTORY": "/elsewhere/pipe", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1024M"},
     "its pipe directory is not", "check it: gpu-orchestrator mps-diag --pipe-dir /elsewhere/pipe"),
    ({}, "no MPS variables: it runs without MPS and without a memory limit", "with the daemon answering"),
])
def test_a_loader_not_pointed_at_this_pipe_directory_is_a_problem(dirs, daemon, variables, says, fix):
    code, seen = loader_check(dirs, variables)
    assert code == 1 and seen["status"] == "problem", seen
    assert says in seen["detail"] and fix in seen["fix"]
    assert f"CUDA_MPS_PIPE_DIRECTORY={dirs['CUDA_MPS_PIPE_DIRECTORY']}" in seen["fix"]


def test_a_loader_without_mps_where_no_daemon_serves_is_a_warning(dirs):
    code, seen = loader_check(dirs, {})
    assert code == 1  # the missing daemon
    assert seen["status"] == "warning" and "runs without MPS" in seen["detail"]
