"""What each command's --help ends with: the environment it reads and the exit codes it returns.

An operator writing a unit file needs both (Environment=, RestartPreventExitStatus=,
SuccessExitStatus=) and should not have to read the source for them.
"""

import argparse
from importlib import metadata

ORCHESTRATOR_URL = {
    "GPU_ORCHESTRATOR_HOST": "where the orchestrator listens, when --url is not given (default 127.0.0.1)",
    "GPU_ORCHESTRATOR_PORT": "its port, when --url is not given (default 8014)",
}
LOG = {"LOG_LEVEL": "DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO); anything else exits 78"}
SERVE_ENV = {
    "GPU_ORCHESTRATOR_HOST": "listen address, as --host (default 127.0.0.1)",
    "GPU_ORCHESTRATOR_PORT": "listen port, as --port (default 8014)",
    "GPU_ORCHESTRATOR_METRICS_LISTEN": "HOST:PORT for /metrics, /health and /ready alone, as --metrics-listen",
    "GPU_ORCHESTRATOR_TOKEN": "when set, POST routes need 'Authorization: Bearer <token>'",
    "ENABLE_NVML": "true: sample GPU telemetry through NVML (default false)",
    "ENABLE_MPS": "true: start or adopt the MPS control daemon, give loaders their limits (default false)",
    "CUDA_MPS_PIPE_DIRECTORY": "MPS pipe folder (default /tmp/nvidia-mps)",
    "CUDA_MPS_LOG_DIRECTORY": "MPS log folder (default /var/log/nvidia-mps)",
    **LOG,
}
STORE_ENV = {
    "MODEL_STORE_ROOT": "root of the immutable model snapshots, as --model-store (required)",
    "BASE_MODEL_DIR": "optional subfolder for agent-relative paths",
    "STRICT_MODEL_STORE": "1: never look in the Hugging Face cache (default 0)",
    "HF_HUB_CACHE, HF_HOME": "the Hugging Face cache read when not strict (read-only, never downloads)",
    "AGENT_MODEL_MAP": "path of AGENT_MODEL_MAP.json, as --model-map (default ./AGENT_MODEL_MAP.json)",
    "MPS_ALLOCATION_CONFIG": "path of mps_allocation_config.json, as --allocation",
    "GPU_ORCHESTRATOR_BACKEND": "default or torch, for every client without its own",
    "GPU_ORCHESTRATOR_SERVICE_PATTERN": "systemd units counted as a client's service (default *@{client}.service)",
    "NOTIFY_SOCKET, WATCHDOG_USEC": "set by systemd (Type=notify, WatchdogSec=)",
    "JOURNAL_STREAM": "set by systemd: log lines then carry their syslog priority",
}
SERVE_EXITS = {
    0: "stopped by SIGTERM or SIGINT",
    2: "usage error",
    69: "the port (or the metrics port) is in use",
    71: "/dev/shm has no room for the shared-memory channel",
    78: "configuration error (systemd: RestartPreventExitStatus=78)",
}
CLIENT_EXITS = {
    0: "done",
    2: "usage error",
    67: "the model map has no such client",
    69: "no orchestrator answers, or not as the API does",
    75: "MPS is configured but its daemon does not answer (see --allow-without-mps)",
    78: "invalid LOG_LEVEL",
}
COMMANDS = {
    "serve": ({**SERVE_ENV, **STORE_ENV}, SERVE_EXITS),
    "demo": (SERVE_ENV, SERVE_EXITS),
    "gate": ({**ORCHESTRATOR_URL,
              "GATE_TIMEOUT": "seconds to wait, as --timeout (default 180)",
              "GPU_ORCHESTRATOR_TOKEN": "sent with the preload request, made only when no warm-up is under way",
              "XDG_CACHE_HOME": "where the result summary is written (default ~/.cache)", **LOG},
             {0: "the models are ready", 1: "they failed, the timeout passed, or no orchestrator answers",
              2: "usage error", 67: "the model map has no such client", 78: "invalid LOG_LEVEL"}),
    "status": ({**ORCHESTRATOR_URL, "COLUMNS": "the width to fit (default the terminal's, at least 80)",
                "NO_COLOR": "set: no colour even on a terminal", **LOG},
               {0: "shown", 1: "no orchestrator answers, or not as the API does", 2: "usage error",
                67: "the model map has no such client", 78: "invalid LOG_LEVEL",
                141: "the reader of its output went away (| head)"}),
    "mps-diag": ({"CUDA_MPS_PIPE_DIRECTORY": "MPS pipe folder, as --pipe-dir (default /tmp/nvidia-mps)",
                  "CUDA_MPS_LOG_DIRECTORY": "MPS log folder, as --log-dir (default /var/log/nvidia-mps)",
                  "PATH": "where nvidia-cuda-mps-control is found", **LOG},
                 {0: "all is well", 1: "a problem was found (each says what to do)",
                  2: "a check could not run, or usage error", 78: "invalid LOG_LEVEL"}),
    "gpu-check": ({"PATH": "where nvidia-cuda-mps-control is found", **LOG},
                  {0: "every step worked, or there is no GPU: no NVIDIA driver or library, or none NVML sees",
                   1: "a step that should work did not, NVML's start on a broken driver included",
                   2: "usage error", 78: "invalid LOG_LEVEL"}),
    "bench": ({}, {0: "measured (BENCHMARKS.md written unless --smoke)", 2: "usage error"}),
    "bench-gpu": ({"CUDA_VISIBLE_DEVICES": "which GPU is cuda:0"},
                  {0: "measured, or there is no GPU (it says so)", 2: "usage error", 69: "torch is not installed"}),
    "env": (ORCHESTRATOR_URL | LOG, CLIENT_EXITS),
    "exec": (ORCHESTRATOR_URL | LOG, {**CLIENT_EXITS, 0: "never: COMMAND replaces it (its own status counts)",
                                      127: "COMMAND cannot be run"}),
}


def epilog(command: str) -> str:
    environment, exits = COMMANDS[command]
    width = max(map(len, [*environment, "   "]))
    lines = ["environment:", *(f"  {name.ljust(width)}  {what}" for name, what in environment.items())] \
        if environment else ["environment: none read"]
    lines += ["", "exit status:", *(f"  {code:<3}  {what}" for code, what in exits.items())]
    return "\n".join(lines)


def describe(parser: argparse.ArgumentParser, command: str) -> None:
    """End `parser`'s --help with the command's environment and exit codes, laid out as written."""
    parser.epilog = epilog(command)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def version() -> str:
    try:
        return metadata.version("gpu-orchestrator")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"
