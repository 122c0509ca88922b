"""`gpu-orchestrator mps-diag`: everything that goes wrong between MPS clients and the daemon.

Each check says ok, PROBLEM (with what to do), warning, skipped or error (could
not check). Exit 0 when all is well, 1 with problems, 2 when a check could not run.
"""

import json
import os
import pwd
import shutil
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from gpu_orchestrator.supervisor import mps, mps_control, nvml
from gpu_orchestrator.loaders.files import NotAFile, read_pid, read_tail

LOG_LINES = 200
LOG_TAIL_BYTES = 256 * 1024  # enough for LOG_LINES lines; a log may be gigabytes
ERROR_WORDS = ("error", "fail", "fatal")


@dataclass
class Check:
    name: str
    status: str  # ok | problem | warning | skipped | error
    detail: str
    fix: str | None = None


def describe_mode(mode: int) -> str:
    def who(shift):
        bits = (mode >> shift) & 7
        return "".join(flag if bits & mask else "-" for flag, mask in (("r", 4), ("w", 2), ("x", 1)))
    return f"{stat.S_IMODE(mode):04o} (owner {who(6)}, group {who(3)}, others {who(0)})"


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_binary() -> Check:
    path = shutil.which(mps_control.BINARY)
    if path:
        return Check("binary", "ok", path)
    return Check("binary", "problem", f"{mps_control.BINARY} is not on PATH",
                 "install the NVIDIA driver's compute utilities (nvidia-compute-utils) or add their folder to PATH")


def check_folder(name: str, folder: str) -> list[Check]:
    path = Path(folder)
    try:
        info = path.stat()
    except FileNotFoundError:
        return [Check(name, "problem", f"{folder} does not exist",
                      f"start the daemon (it creates it) or: install -d -m 0755 {folder}")]
    except NotADirectoryError:
        return [Check(name, "problem", f"{folder} cannot exist: a folder above it is a file",
                      "remove that file, or point the variable at another folder")]
    except PermissionError:
        return [Check(name, "error", f"cannot look at {folder}: permission denied", "run as root or as its owner")]
    except OSError as exc:
        return [Check(name, "error", f"cannot look at {folder}: {exc.strerror}", "check the path")]
    detail = f"{folder}: owner {owner_name(info.st_uid)}, mode {describe_mode(info.st_mode)}"
    found = [Check(name, "ok", detail)]
    if not stat.S_ISDIR(info.st_mode):
        return [Check(name, "problem", f"{folder} is not a directory", "remove it and restart the daemon")]
    if (info.st_mode & 0o005) != 0o005:
        found = [Check(name, "problem", detail + "; other users cannot enter it",
                       f"chmod 0755 {folder}: MPS servers started for other users crash-loop otherwise")]
    for parent in path.resolve().parents:
        try:
            mode = parent.stat().st_mode
        except OSError as exc:
            found.append(Check(name, "error", f"cannot look at parent {parent}: {exc.strerror}", "run as root"))
            continue
        if (mode & 0o001) == 0:
            found.append(Check(name, "problem", f"parent {parent} is not traversable by other users "
                               f"({describe_mode(mode)})", f"chmod o+x {parent}"))
    return found


def check_control_files(settings: mps_control.MpsSettings) -> list[Check]:
    pipe = Path(settings.pipe_dir) / mps.CONTROL_PIPE
    pid_file = Path(settings.pipe_dir) / mps.PID_FILE
    found = []
    if pipe.exists():
        found.append(Check("control pipe", "ok", f"{pipe} exists"))
    else:
        found.append(Check("control pipe", "problem", f"{pipe} is missing: no daemon serves this pipe directory",
                           "start it: nvidia-cuda-mps-control -d (or restart gpu-orchestrator with ENABLE_MPS=true)"))
    try:
        pid = read_pid(pid_file)
    except FileNotFoundError:
        found.append(Check("pid file", "problem", f"{pid_file} is missing", "start the control daemon"))
        return found
    except (NotAFile, ValueError) as exc:
        found.append(Check("pid file", "problem", str(exc), f"remove {pid_file} and restart the control daemon"))
        return found
    except OSError as exc:
        found.append(Check("pid file", "error", f"cannot read {pid_file}: {exc.strerror or exc}",
                           "run as root or as its owner"))
        return found
    if mps.process_alive(pid):
        found.append(Check("pid file", "ok", f"{pid_file}: pid {pid}, running"))
    else:
        found.append(Check("pid file", "problem", f"{pid_file} names pid {pid}, which is not running: the daemon died",
                           f"remove {pid_file} and {pipe}, then start the daemon"))
    return found


def daemon_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        names = {process.info["name"] or ""} | {os.path.basename(part) for part in cmdline[:2]}
        if mps_control.BINARY in names and ("-d" in cmdline or "-f" in cmdline) and mps.process_alive(process.pid):
            found.append(process)
    return found


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def served_folder(process: psutil.Process) -> str | None:
    """The pipe directory a control daemon serves: its CUDA_MPS_PIPE_DIRECTORY, NVIDIA's default
    when unset; None when its environment cannot be read (another user's process)."""
    try:
        return mps_control.mps_folders(process.environ())[0]
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        return None


def check_daemon_process(settings: mps_control.MpsSettings) -> list[Check]:
    """Each control daemon, judged by the pipe directory it serves: only this one's is ok here."""
    processes = daemon_processes()
    if not processes:
        return [Check("daemon process", "problem", "no nvidia-cuda-mps-control daemon is running",
                      "start it: nvidia-cuda-mps-control -d, or restart gpu-orchestrator with ENABLE_MPS=true")]
    try:  # the pid file names this folder's daemon even when its environment cannot be read
        listed = read_pid(Path(settings.pipe_dir) / mps.PID_FILE)
    except (OSError, NotAFile, ValueError):  # check_control_files says why
        listed = None
    found, unknown = [], []
    for process in processes:
        shown = f"pid {process.pid} ({' '.join(process.info['cmdline'] or [])})"
        folder = served_folder(process)
        if folder is None and process.pid == listed:
            folder = settings.pipe_dir
        if folder is None:
            unknown.append(process.pid)
            found.append(Check("daemon process", "warning", f"{shown}: which pipe directory it serves is unknown: "
                               "its environment cannot be read (another user's process)",
                               "run mps-diag as root or as that process's user"))
        elif same_folder(folder, settings.pipe_dir):
            found.append(Check("daemon process", "ok", f"{shown}, serving {settings.pipe_dir}"))
        else:
            found.append(Check("daemon process", "warning", f"{shown} serves another pipe directory, {folder}",
                               f"to check that one: gpu-orchestrator mps-diag --pipe-dir {folder} "
                               "(or with CUDA_MPS_PIPE_DIRECTORY set to it)"))
    if not any(check.status == "ok" for check in found):
        if unknown:  # one of those may serve this folder: only root can tell
            found.append(Check("daemon process", "error", f"no daemon is known to serve {settings.pipe_dir}; "
                               f"pid {', '.join(map(str, unknown))} may", "run mps-diag as root"))
        else:
            found.append(Check("daemon process", "problem", f"no nvidia-cuda-mps-control daemon serves {settings.pipe_dir}",
                               f"start one for it: CUDA_MPS_PIPE_DIRECTORY={settings.pipe_dir} nvidia-cuda-mps-control "
                               "-d, or restart gpu-orchestrator with ENABLE_MPS=true; or, if a daemon above is the "
                               "one meant, run mps-diag with --pipe-dir set to its folder"))
    return found


def check_answers(settings: mps_control.MpsSettings) -> Check:
    try:
        servers = mps_control.query(settings, "get_server_list").split()
    except mps_control.MpsError as exc:
        hung = "hung" in str(exc)
        fix = ("the daemon is hung: kill it (kill -9 its pid) and restart it" if hung
               else "start the control daemon for this pipe directory")
        return Check("control answers", "problem", str(exc), fix)
    return Check("control answers", "ok", f"answered within {settings.command_timeout:g} s; "
                 f"servers: {', '.join(servers) or 'none running'}")


def check_log(name: str, path: Path) -> Check:
    try:
        lines = read_tail(path, LOG_TAIL_BYTES).splitlines()[-LOG_LINES:]
    except FileNotFoundError:
        return Check(name, "skipped", f"{path} does not exist (yet)")
    except NotAFile as exc:
        return Check(name, "problem", str(exc), f"move it away: the daemon writes its log as {path}")
    except OSError as exc:
        return Check(name, "error", f"cannot read {path}: {exc.strerror or exc}", "run as root or as the daemon's user")
    errors = [line for line in lines if any(word in line.lower() for word in ERROR_WORDS)][-5:]
    if not errors:
        return Check(name, "ok", f"{path}: no errors in the last {len(lines)} lines")
    return Check(name, "warning", f"{path}: last errors:\n" + "\n".join(errors),
                 "read the whole log; a server that cannot start usually says why there")


def check_loader_limits(settings: mps_control.MpsSettings, served: bool) -> list[Check]:
    """Each loader's MPS variables: pointed at this pipe directory, or, when its daemon runs
    (`served`) and MPS is therefore expected, a problem; without a daemon, a warning."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if "gpu_orchestrator.loaders" not in (process.info["cmdline"] or []):
            continue
        try:
            env = process.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            found.append(Check("loader limits", "error", f"cannot read the environment of loader pid {process.pid}",
                               "run as root or as the orchestrator's user"))
            continue
        limits = {k: v for k, v in env.items() if k.startswith("CUDA_MPS_") or k == "CUDA_VISIBLE_DEVICES"}
        shown = " ".join(f"{k}={v}" for k, v in sorted(limits.items())) or "no MPS variables"
        detail = f"client {env.get('GPU_ORCHESTRATOR_CLIENT', '?')} (pid {process.pid}): {shown}"
        folder = env.get("CUDA_MPS_PIPE_DIRECTORY")
        if folder is None:
            # How the orchestrator starts a loader when MPS is off or its daemon did not answer.
            found.append(Check("loader limits", "problem" if served else "warning",
                               detail + ": it runs without MPS and without a memory limit",
                               "it was started with MPS off or its daemon not answering: with the daemon answering, "
                               f"restart gpu-orchestrator (ENABLE_MPS=true, CUDA_MPS_PIPE_DIRECTORY={settings.pipe_dir})"))
        elif not same_folder(folder, settings.pipe_dir):
            found.append(Check("loader limits", "problem", detail + f": its pipe directory is not {settings.pipe_dir}, "
                               "so its limits are not this daemon's to enforce",
                               f"restart gpu-orchestrator with CUDA_MPS_PIPE_DIRECTORY={settings.pipe_dir}; or, "
                               f"if {folder} is the one meant, check it: gpu-orchestrator mps-diag --pipe-dir {folder}"))
        else:
            found.append(Check("loader limits", "ok", detail))
    return found or [Check("loader limits", "skipped", "no loader is running")]


def check_compute_mode() -> list[Check]:
    module, error = nvml.nvml()
    if module is None:
        return [Check("compute mode", "skipped", f"NVML not available: {error}")]
    found = []
    names = {module.NVML_COMPUTEMODE_DEFAULT: "DEFAULT", module.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS: "EXCLUSIVE_PROCESS",
             module.NVML_COMPUTEMODE_PROHIBITED: "PROHIBITED"}
    for index in range(module.nvmlDeviceGetCount()):
        try:
            mode = module.nvmlDeviceGetComputeMode(module.nvmlDeviceGetHandleByIndex(index))
        except Exception as exc:
            found.append(Check("compute mode", "error", f"GPU {index}: {nvml.describe(exc)}"))
            continue
        name = names.get(mode, str(mode))
        if name == "EXCLUSIVE_PROCESS":
            found.append(Check("compute mode", "ok", f"GPU {index}: EXCLUSIVE_PROCESS"))
        elif name == "DEFAULT":
            found.append(Check("compute mode", "warning", f"GPU {index}: DEFAULT; MPS wants EXCLUSIVE_PROCESS so "
                               "only the MPS server holds a context", f"nvidia-smi -i {index} -c EXCLUSIVE_PROCESS"))
        else:
            found.append(Check("compute mode", "problem", f"GPU {index}: {name}: no process can use it",
                               f"nvidia-smi -i {index} -c EXCLUSIVE_PROCESS"))
    return found


def run_checks(settings: mps_control.MpsSettings) -> list[Check]:
    checks = [check_binary()]
    checks += check_folder("pipe directory", settings.pipe_dir)
    checks += check_folder("log directory", settings.log_dir)
    checks += check_control_files(settings)
    daemons = check_daemon_process(settings)
    checks += daemons
    if checks[0].status == "ok":
        checks.append(check_answers(settings))
    checks.append(check_log("control.log", Path(settings.log_dir) / "control.log"))
    checks.append(check_log("server.log", Path(settings.log_dir) / "server.log"))
    checks += check_loader_limits(settings, any(check.status == "ok" for check in daemons))
    checks += check_compute_mode()
    return checks


def exit_code(checks: list[Check]) -> int:
    if any(c.status == "problem" for c in checks):
        return 1
    return 2 if any(c.status == "error" for c in checks) else 0


def render(checks: list[Check], settings: mps_control.MpsSettings) -> str:
    lines = [f"MPS diagnostics: pipe directory {settings.pipe_dir}, log directory {settings.log_dir}"]
    for check in checks:
        label = check.status.upper() if check.status in ("problem", "error") else check.status
        first, *rest = check.detail.splitlines()
        lines.append(f"  {label:<8} {check.name:<16} {first}")
        lines += [f"  {'':<8} {'':<16} {line}" for line in rest]
        if check.fix and check.status != "ok":
            lines.append(f"  {'':<8} {'':<16} -> {check.fix}")
    problems = sum(c.status == "problem" for c in checks)
    lines.append(f"{problems} problem(s) found." if problems else "No problems found.")
    return "\n".join(lines)


def run_diag(settings: mps_control.MpsSettings, as_json: bool) -> int:
    checks = run_checks(settings)
    code = exit_code(checks)
    if as_json:
        print(json.dumps({"pipe_dir": settings.pipe_dir, "log_dir": settings.log_dir, "exit_code": code,
                          "problems": sum(c.status == "problem" for c in checks),
                          "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render(checks, settings), file=sys.stdout)
    return code
