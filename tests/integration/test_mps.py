"""MPS with the fake nvidia-cuda-mps-control first on PATH: start, adopt, probe, restart, quit."""

import json
import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import nvml_hosts
import psutil
import pytest
from support import Orchestrator, wait_for, write_config

from gpu_orchestrator.supervisor.mps import process_alive

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "bin"
FAST = ("--mps-probe-interval", "0.3", "--mps-timeout", "1")


@pytest.fixture
def mps_dirs(tmp_path):
    return {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps-pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "mps-log")}


@pytest.fixture
def mps_env(mps_dirs):
    return {**mps_dirs, "ENABLE_MPS": "true", "PATH": f"{FAKES}:{os.environ['PATH']}",
            # Ours must never leak into a loader: each gets exactly its own.
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "9=9M"}


@pytest.fixture
def mps_setup(tmp_path, store):
    return write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"], "gamma": ["org/g1"]}, {
        "alpha": {"mps_memory_limit_gb": 1.0, "active_thread_percentage": 50},
        "beta": {"mps_memory_limit_gb": 0.5, "devices": [1, 2]},
    })


def environ(pid: int) -> dict:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


def mps_vars(pid: int) -> dict:
    return {k: v for k, v in environ(pid).items() if k.startswith("CUDA_")}


def ctl(mps_dirs, command):
    return subprocess.run([str(FAKES / "nvidia-cuda-mps-control")], input=command + "\n", text=True,
                          capture_output=True, env={**os.environ, **mps_dirs}, timeout=10)


def daemon_children(orch) -> list[psutil.Process]:
    """The control daemons (-f) the orchestrator runs now, not a probe's one-command client."""
    found = []
    for child in psutil.Process(orch.proc.pid).children():
        try:
            argv = child.cmdline()
        except psutil.Error:  # a probe client exiting, a killed daemon not yet reaped
            continue
        if "-f" in argv and "nvidia-cuda-mps-control" in " ".join(argv):
            found.append(child)
    return found


def test_managed_daemon_limits_status_and_quit(tmp_path, store, mps_setup, mps_env, mps_dirs):
    model_map, allocation = mps_setup
    with Orchestrator(tmp_path, store, model_map, allocation, extra_args=FAST, env=mps_env) as orch:
        status = orch.wait_settled()
        assert status["all_ready"] and status["mps"] == {"enabled": True, "managed": True, "restarts": 0, "error": None}
        info = orch.get("/gpu/info")[1]
        mps = info["mps"]
        assert info["mps_enabled"] is True and mps["enabled"] and mps["managed"] and mps["control_process"]
        daemon = psutil.Process(mps["control_pid"])
        assert daemon.ppid() == orch.proc.pid and "-f" in daemon.cmdline()
        pipe, logs = Path(mps_dirs["CUDA_MPS_PIPE_DIRECTORY"]), Path(mps_dirs["CUDA_MPS_LOG_DIRECTORY"])
        assert (pipe / "control").exists() and (pipe / "nvidia-cuda-mps-control.pid").exists()
        for folder in (pipe, logs):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        common = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
        assert mps_vars(orch.loader_pid("alpha")) == {**common, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=1024M",
                                                      "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}
        assert mps_vars(orch.loader_pid("beta")) == {**common, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=512M,1=512M",
                                                     "CUDA_VISIBLE_DEVICES": "1,2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        assert mps_vars(orch.loader_pid("gamma")) == common
        if shutil.which("jq"):
            out = subprocess.run(["bash", "-c", f"curl -s {orch.url}/gpu/info | jq '{{mps_enabled, mps}}'"],
                                 capture_output=True, text=True, check=True).stdout
            assert json.loads(out)["mps"]["pipe_dir"] == str(pipe)
        assert orch.stop() == 0
        assert "Received command: quit" in (logs / "control.log").read_text()
        assert not daemon.is_running()
        assert not (pipe / "control").exists() and not (pipe / "nvidia-cuda-mps-control.pid").exists()


def test_running_daemon_is_adopted_and_left_running(tmp_path, store, mps_setup, mps_env, mps_dirs):
    model_map, allocation = mps_setup
    subprocess.run([str(FAKES / "nvidia-cuda-mps-control"), "-d"], env={**os.environ, **mps_dirs}, check=True)
    pid = int((Path(mps_dirs["CUDA_MPS_PIPE_DIRECTORY"]) / "nvidia-cuda-mps-control.pid").read_text())
    try:
        with Orchestrator(tmp_path, store, model_map, allocation, extra_args=FAST, env=mps_env) as orch:
            orch.wait_settled()
            mps = orch.get("/gpu/info")[1]["mps"]
            assert mps["enabled"] and mps["managed"] is False and mps["control_pid"] == pid
            assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in mps_vars(orch.loader_pid("alpha"))
            assert orch.stop() == 0
        assert process_alive(pid) and ctl(mps_dirs, "get_server_list").returncode == 0
    finally:
        ctl(mps_dirs, "quit")
        wait_for(lambda: not process_alive(pid), what="adopted daemon gone")


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_dead_or_hung_daemon_is_restarted_and_loaders_follow(tmp_path, store, mps_setup, mps_env, fault):
    model_map, allocation = mps_setup
    with Orchestrator(tmp_path, store, model_map, allocation, extra_args=FAST, env=mps_env) as orch:
        orch.wait_settled()
        first = orch.get("/gpu/info")[1]["mps"]["control_pid"]
        loaders = {c: orch.loader_pid(c) for c in ("alpha", "beta", "gamma")}
        os.kill(first, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        try:
            down = wait_for(lambda: (m := orch.get("/gpu/info")[1]["mps"]) and not m["enabled"] and m,
                            what="MPS reported down")
            assert down["error"]
            assert orch.status()["mps"]["enabled"] is False

            def recovered():
                status = orch.status()
                mps = orch.get("/gpu/info")[1]["mps"]
                fresh = all(status["clients"][c]["pid"] not in (None, loaders[c]) for c in loaders)
                return (mps, status) if mps["enabled"] and mps["restarts"] >= 1 and fresh and status["all_ready"] else None

            mps, status = wait_for(recovered, what="daemon and loaders back")
            assert mps["control_pid"] != first and mps["managed"]
            assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in mps_vars(status["clients"]["alpha"]["pid"])
            if fault == "hung":
                assert "stopped answering; killing it" in orch.output()
            assert not process_alive(first)
        finally:
            if process_alive(first):
                os.kill(first, signal.SIGKILL)


def test_loop_keeps_supervising_while_a_restarted_daemon_comes_up(tmp_path, store, mps_setup, mps_env):
    """The loop never waits on the daemon: a loader that dies while the new daemon is still
    coming up is restarted before that daemon answers (or is given up on), and once it
    answers every loader follows it."""
    model_map, allocation = mps_setup
    hold = tmp_path / "hold-mps-start"
    env = {**mps_env, "FAKE_MPS_HOLD": str(hold)}
    args = (*FAST, "--mps-start-timeout", "120")
    with Orchestrator(tmp_path, store, model_map, allocation, extra_args=args, env=env) as orch:
        orch.wait_settled()
        report = orch.get("/gpu/info")[1]["mps"]
        first = report["control_pid"]
        assert first is not None, f"settled, yet no control daemon pid: {report}"
        hold.touch()
        os.kill(first, signal.SIGKILL)

        second = wait_for(lambda: next((p for p in daemon_children(orch) if p.pid != first), None),
                          what="the replacement daemon to be spawned")
        victim = orch.loader_pid("gamma")
        os.kill(victim, signal.SIGKILL)
        back = wait_for(lambda: (c := orch.status()["clients"]["gamma"])["pid"] not in (None, victim)
                        and c["state"] == "RUNNING" and c, what="gamma restarted while MPS is coming up")
        assert second.is_running() and not orch.get("/gpu/info")[1]["mps"]["enabled"]
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in mps_vars(back["pid"])  # no daemon: no limits
        hold.unlink()

        def followed():
            status, mps = orch.status(), orch.get("/gpu/info")[1]["mps"]
            fresh = status["clients"]["gamma"]["pid"] != back["pid"]
            return mps if mps["enabled"] and fresh and status["all_ready"] else None

        assert wait_for(followed, what="daemon answering and loaders following it")["control_pid"] == second.pid
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in mps_vars(orch.loader_pid("alpha"))
        assert orch.stop() == 0


def test_daemon_silent_at_start_is_killed_after_the_start_timeout_and_retried(tmp_path, store, mps_setup, mps_env):
    model_map, allocation = mps_setup
    hold = tmp_path / "hold-mps-start"
    hold.touch()  # every daemon we spawn stays silent until the file goes
    args = (*FAST, "--mps-start-timeout", "1")
    with Orchestrator(tmp_path, store, model_map, allocation, extra_args=args,
                      env={**mps_env, "FAKE_MPS_HOLD": str(hold)}) as orch:
        status = orch.wait_settled()
        assert status["all_ready"] and status["mps"]["enabled"] is False
        assert "did not answer within 1 s" in orch.get("/gpu/info")[1]["mps"]["error"]
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in mps_vars(orch.loader_pid("alpha"))  # none in force
        wait_for(lambda: orch.output().count("did not answer within 1 s") >= 2, what="a second try given up")
        assert len(daemon_children(orch)) <= 1, "a given-up daemon was left running"
        hold.unlink()
        wait_for(lambda: orch.get("/gpu/info")[1]["mps"]["enabled"], timeout=60, what="a later try answering")
        wait_for(lambda: "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in mps_vars(orch.loader_pid("alpha")),
                 what="loaders restarted under it")
        assert orch.stop() == 0


def test_sigterm_while_the_daemon_is_still_coming_up_at_start(tmp_path, store, mps_setup, mps_env):
    """Start-up waits for the daemon before any loader, but not past a SIGTERM."""
    model_map, allocation = mps_setup
    hold = tmp_path / "hold-mps-start"
    hold.touch()
    args = (*FAST, "--mps-start-timeout", "300")
    with Orchestrator(tmp_path, store, model_map, allocation, extra_args=args,
                      env={**mps_env, "FAKE_MPS_HOLD": str(hold)}) as orch:
        held = wait_for(lambda: daemon_children(orch), what="the daemon spawned and held")[0]
        assert orch.stop(timeout=30) == 0  # not the 300 s start timeout
        assert not process_alive(held.pid)
        assert "loader started" not in orch.log_path.read_text()


def test_a_hung_daemon_we_did_not_start_is_never_clobbered_and_adopted_once_it_answers(
        tmp_path, store, mps_setup, mps_env, mps_dirs):
    model_map, allocation = mps_setup
    subprocess.run([str(FAKES / "nvidia-cuda-mps-control"), "-d"], env={**os.environ, **mps_dirs}, check=True)
    pipe = Path(mps_dirs["CUDA_MPS_PIPE_DIRECTORY"])
    other = int((pipe / "nvidia-cuda-mps-control.pid").read_text())
    os.kill(other, signal.SIGSTOP)
    try:
        with Orchestrator(tmp_path, store, model_map, allocation, extra_args=FAST, env=mps_env) as orch:
            # Ours is spawned, finds the other alive, exits; the other's pipe and pid file stay.
            wait_for(lambda: "exited with 1 while starting" in orch.output(), what="our daemon refused")
            assert (pipe / "control").exists() and (pipe / "nvidia-cuda-mps-control.pid").exists()
            assert orch.get("/gpu/info")[1]["mps"]["enabled"] is False
            os.kill(other, signal.SIGCONT)
            mps = wait_for(lambda: (m := orch.get("/gpu/info")[1]["mps"])["enabled"] and m, what="adoption")
            assert mps["managed"] is False and mps["control_pid"] == other
            wait_for(lambda: "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in mps_vars(orch.loader_pid("alpha")),
                     what="loaders restarted under the adopted daemon")
            assert orch.stop() == 0
        assert process_alive(other) and ctl(mps_dirs, "get_server_list").returncode == 0
    finally:
        os.kill(other, signal.SIGCONT)
        ctl(mps_dirs, "quit")
        wait_for(lambda: not process_alive(other), what="the other daemon gone")


def test_missing_binary_serves_without_mps_and_says_so(tmp_path, store, mps_setup, mps_dirs):
    model_map, allocation = mps_setup
    env = {**mps_dirs, "ENABLE_MPS": "true", "PATH": "/usr/bin:/bin"}
    with Orchestrator(tmp_path, store, model_map, allocation, env=env) as orch:
        assert orch.wait_settled()["all_ready"]
        info = orch.get("/gpu/info")[1]
        assert info["mps_enabled"] is False and "not found on PATH" in info["mps"]["error"]
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in mps_vars(orch.loader_pid("alpha"))
        assert "loaders run WITHOUT MPS limits" in orch.output()


def test_an_mps_folder_that_cannot_be_made_is_an_mps_error_and_the_service_serves_on(
        tmp_path, store, mps_setup, mps_env, mps_dirs):
    # A read-only /tmp under ProtectSystem=strict fails the same way: makedirs raises OSError.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**mps_env, "CUDA_MPS_PIPE_DIRECTORY": str(blocker / "nvidia-mps")}
    model_map, allocation = mps_setup
    with Orchestrator(tmp_path, store, model_map, allocation, extra_args=FAST, env=env) as orch:
        assert orch.wait_settled()["all_ready"]
        info = orch.get("/gpu/info")[1]
        assert info["mps_enabled"] is False
        assert f"cannot create the MPS folder {blocker}/nvidia-mps (CUDA_MPS_PIPE_DIRECTORY): Not a directory" \
            in info["mps"]["error"]
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in mps_vars(orch.loader_pid("alpha"))
        assert "ERROR mps: MPS control daemon failed reason=\"cannot create the MPS folder" in orch.output()
        assert orch.stop() == 0


def test_overcommit_is_flagged_not_refused(tmp_path, store):
    model_map = tmp_path / "AGENT_MODEL_MAP.json"
    model_map.write_text(json.dumps({"alpha": ["org/a1"], "gamma": ["org/g1"]}))
    allocation = tmp_path / "alloc.json"
    allocation.write_text(json.dumps({"mps_resource_allocation": {
        "agent_allocations": {"alpha": {"mps_memory_limit_gb": 1.0}, "gamma": {"mps_memory_limit_gb": 0.75}},
        "mps_configuration": {"total_gpu_memory_gb": 1.5}}}))
    with Orchestrator(tmp_path, store, model_map, allocation) as orch:
        summary = orch.get("/mps/allocation")[1]["mps_resource_allocation"]["system_summary"]
        assert summary["overcommitted"] is True and summary["overcommit_gb"] == 0.25
        assert orch.get("/gpu/info")[1]["mps"]["allocation_overcommitted"] is True
        # The loop logs it on its first step, which may come after the first answers.
        wait_for(lambda: "MPS allocations over-commit the GPU memory" in orch.output(), what="the over-commit warning")


def test_overcommit_is_judged_per_gpu_from_nvml_and_logged(tmp_path, store):
    # The fake host: GPU 0 80 GiB, GPU 1 24 GiB, GPU 2 lost. 32 GB of limits on 104 GiB looks fine
    # in total, but alpha and beta are both pinned to the 24 GiB GPU.
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"], "gamma": ["org/g1"]}, {
        "alpha": {"mps_memory_limit_gb": 20.0, "devices": [1]},
        "beta": {"mps_memory_limit_gb": 8.0, "devices": [1]},
        "gamma": {"mps_memory_limit_gb": 4.0, "devices": [2]},
    })
    with Orchestrator(tmp_path, store, model_map, allocation, env=nvml_hosts.env(tmp_path)) as orch:
        summary = wait_for(lambda: (s := orch.get("/mps/allocation")[1]["mps_resource_allocation"]["system_summary"])
                           .get("per_gpu") and s, what="the summary judged on the first NVML sample")
        assert summary["overcommitted"] is True and summary["overcommit_gb"] == 4.0
        assert [(g["index"], g["clients"], g["overcommitted"]) for g in summary["per_gpu"]] == [
            (0, [], False), (1, ["alpha", "beta"], True)]
        assert summary["devices_not_present"] == {"gamma": [2]}
        assert orch.get("/gpu/info")[1]["mps"]["allocation_overcommitted"] is True
        logged = wait_for(lambda: "pinned to GPUs NVML does not see" in (out := orch.output()) and out,
                          what="the over-commit warnings")
        assert "over-commit the GPU memory; clients may run out of memory gpu=1 limits_gb=28.0 gpu_gb=24.0" in logged
        assert "gpu=0" not in logged


@pytest.mark.parametrize("pid_file", ["missing", "garbage", "a pid we cannot see"])
def test_a_daemon_of_ours_that_never_answered_leaves_another_daemons_pipe(tmp_path, mps_dirs, pid_file):
    """Another daemon serves the folder but its pid file does not name it to us (still starting,
    unreadable, another pid namespace); ours exited 'already running'. Its pipe must stay."""
    from gpu_orchestrator.supervisor.mps import PID_FILE, MpsDaemon
    from gpu_orchestrator.supervisor.mps_control import MpsSettings
    other = subprocess.Popen([str(FAKES / "nvidia-cuda-mps-control"), "-f"], env={**os.environ, **mps_dirs})
    try:
        pipe = Path(mps_dirs["CUDA_MPS_PIPE_DIRECTORY"])
        wait_for(lambda: ctl(mps_dirs, "get_default_active_thread_percentage").returncode == 0, 20)
        {"missing": lambda: (pipe / PID_FILE).unlink(),
         "garbage": lambda: (pipe / PID_FILE).write_text("not a pid\n"),
         "a pid we cannot see": lambda: (pipe / PID_FILE).write_text("4194303\n")}[pid_file]()
        daemon = MpsDaemon(MpsSettings(mps_dirs["CUDA_MPS_PIPE_DIRECTORY"], mps_dirs["CUDA_MPS_LOG_DIRECTORY"]))
        daemon.proc = subprocess.Popen(["true"])  # ours, gone at once as after "already running"
        daemon.proc.wait()
        daemon.reap(0.0)
        assert (pipe / "control").exists()
        assert ctl(mps_dirs, "get_default_active_thread_percentage").stdout.strip() == "100.0"
    finally:
        other.terminate()
        other.wait(10)


def test_a_daemon_of_ours_killed_before_it_answered_leaves_no_pipe(tmp_path, mps_dirs):
    """It made its pipe and wrote its pid file, then died before a probe heard it: the pid file
    still names it, so that pipe is ours to remove (a client would try to reach it)."""
    from gpu_orchestrator.supervisor.mps import CONTROL_PIPE, PID_FILE, MpsDaemon
    from gpu_orchestrator.supervisor.mps_control import MpsSettings
    pipe = Path(mps_dirs["CUDA_MPS_PIPE_DIRECTORY"])
    pipe.mkdir()
    daemon = MpsDaemon(MpsSettings(str(pipe), mps_dirs["CUDA_MPS_LOG_DIRECTORY"]))
    daemon.proc = subprocess.Popen(["sleep", "60"], process_group=0)  # ours, as spawn() starts it
    os.mkfifo(pipe / CONTROL_PIPE)
    (pipe / PID_FILE).write_text(f"{daemon.proc.pid}\n")
    daemon.kill()
    assert not (pipe / CONTROL_PIPE).exists() and not (pipe / PID_FILE).exists()
