"""The MPS control daemon's settings, folders and environment, and how one command is sent to it:
what the daemon's supervision (mps.py), the launch of loaders and the diagnostics share."""

import os
import shutil
import subprocess
from dataclasses import dataclass

BINARY = "nvidia-cuda-mps-control"


class MpsError(Exception):
    """The control daemon did not answer, or answered with an error."""


@dataclass(frozen=True)
class MpsSettings:
    pipe_dir: str  # CUDA_MPS_PIPE_DIRECTORY, else DEFAULT_PIPE_DIR
    log_dir: str
    probe_interval: float = 5.0
    command_timeout: float = 5.0
    start_timeout: float = 15.0
    failures_to_restart: int = 2


DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"  # NVIDIA's defaults, used when the variables are unset
DEFAULT_LOG_DIR = "/var/log/nvidia-mps"


def mps_folders(env) -> tuple[str, str]:
    """The pipe and log folders an environment names, NVIDIA's defaults for what it leaves unset."""
    return env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIR, env.get("CUDA_MPS_LOG_DIRECTORY") or DEFAULT_LOG_DIR


# What a client process carries only as its client's (limits and folders), never inherited from ours:
# a loader or service of a client without MPS must not find a daemon through our folders.
CLIENT_MPS = frozenset({"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
                        "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"})


def mps_env(settings: MpsSettings) -> dict[str, str]:
    return {"CUDA_MPS_PIPE_DIRECTORY": settings.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": settings.log_dir}


def query(settings: MpsSettings, command: str, timeout: float | None = None) -> str:
    """Run one control command; return its output or raise MpsError saying what went wrong."""
    binary = shutil.which(BINARY)
    if binary is None:
        raise MpsError(f"{BINARY} not found on PATH")
    try:
        result = subprocess.run([binary], input=command + "\n", capture_output=True, text=True,
                                env={**os.environ, **mps_env(settings)},
                                timeout=timeout or settings.command_timeout)
    except subprocess.TimeoutExpired:
        raise MpsError(f"'{command}' got no answer within {timeout or settings.command_timeout:g} s: "
                       "the control daemon is hung") from None
    except OSError as exc:  # removed since which() found it, not executable, no memory or processes left
        raise MpsError(f"'{command}' could not run {binary} ({exc}); reinstall the NVIDIA driver's {BINARY} "
                       "or fix PATH") from None
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise MpsError(f"'{command}' failed (exit {result.returncode}): {output or 'no output'}")
    return result.stdout.strip()


def ensure_folders(settings: MpsSettings) -> None:
    """0755: MPS servers the daemon starts for other users must reach both folders. Raises MpsError
    naming the folder when one cannot be made (a read-only file system under ProtectSystem=strict,
    a file in the way): MPS is then off, reported like any other MPS failure, and the service serves on."""
    for variable, folder in mps_env(settings).items():
        try:
            os.makedirs(folder, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise MpsError(f"cannot create the MPS folder {folder} ({variable}): {exc.strerror or exc}; provision it "
                           "(scripts/systemd/gpu-orchestrator.tmpfiles, LogsDirectory=) or point "
                           f"{variable} at a writable folder") from None
