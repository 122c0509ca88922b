"""`gpu-orchestrator`: serve (what systemd runs), demo, gate, status, mps-diag, gpu-check, bench and bench-gpu."""

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

if sys.argv[1:2] in (["serve"], ["demo"]):
    # From the first line until the loop queues them (daemon.serve, then Arbiter.run), SIGHUP, SIGTERM
    # and SIGINT wait blocked: a reload asked for while falcon and the rest import (half a second)
    # would otherwise end the service silently, SIGHUP's default. Held, they are served once it runs.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})

from gpu_orchestrator.http.app import base_url, url_host
from gpu_orchestrator.loaders.logs import LogLevelError, for_stderr, setup_logging
from gpu_orchestrator.supervisor.clients import MIN_HEARTBEAT_TIMEOUT, Policy
from gpu_orchestrator.supervisor.commands import clientenv, demo, gpucheck, helptext
from gpu_orchestrator.supervisor.commands.api import UsageError, check_url, seconds
from gpu_orchestrator.supervisor.commands.diag import run_diag
from gpu_orchestrator.supervisor.commands.gate import run_gate
from gpu_orchestrator.supervisor.commands.statusview import run_status
from gpu_orchestrator.supervisor.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    METRICS_LISTEN_ENV,
    Config,
    ConfigError,
    load_config,
    metrics_listen_address,
    parse_port,
    token_problem,
)
from gpu_orchestrator.supervisor.daemon import serve
from gpu_orchestrator.supervisor.mps_control import MpsSettings, mps_folders
from gpu_orchestrator.supervisor.systemd import unit_instance

log = logging.getLogger("supervisor")
EX_USAGE = 2  # argparse's own status for a bad argument; ours for a bad value of one
EX_BROKEN_PIPE = 141  # what a shell reports for a command killed by SIGPIPE (`| head`)


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, like every other error of these commands."""

    def error(self, message: str):
        self.exit(EX_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (GPU_ORCHESTRATOR_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (GPU_ORCHESTRATOR_PORT, default 8014)")
    parser.add_argument("--no-preload", action="store_true", help="do not start a warm-up at start")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="also serve GET /metrics, /health and /ready here, e.g. 0.0.0.0:9014 "
                             f"({METRICS_LISTEN_ENV}, default off)")
    parser.add_argument("--heartbeat-timeout", type=float, default=Policy.heartbeat_timeout, metavar="SECONDS",
                        help="kill and restart a loader silent this long (default %(default)s)")
    parser.add_argument("--telemetry-interval", type=float, default=2.0, metavar="SECONDS",
                        help="NVML sampling period with ENABLE_NVML=true (default %(default)s)")
    parser.add_argument("--mps-probe-interval", type=float, default=MpsSettings.probe_interval, metavar="SECONDS",
                        help="how often the MPS control daemon is probed (default %(default)s)")
    parser.add_argument("--mps-timeout", type=float, default=MpsSettings.command_timeout, metavar="SECONDS",
                        help="how long one MPS control command may take (default %(default)s)")
    parser.add_argument("--mps-start-timeout", type=float, default=MpsSettings.start_timeout, metavar="SECONDS",
                        help="how long a starting MPS control daemon may take to answer (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="gpu-orchestrator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {helptext.version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the orchestrator (what systemd starts)")
    add_serve_flags(serve_parser)
    serve_parser.add_argument("--model-store", help="MODEL_STORE_ROOT")
    serve_parser.add_argument("--model-map", help="AGENT_MODEL_MAP (path of AGENT_MODEL_MAP.json)")
    serve_parser.add_argument("--allocation", help="MPS_ALLOCATION_CONFIG (path of mps_allocation_config.json)")
    demo_parser = commands.add_parser("demo", help="write a small demo model store and serve it")
    add_serve_flags(demo_parser)
    demo_parser.add_argument("--dir", help="write the demo here and keep it (default: a temporary folder, removed at exit)")
    gate_parser = commands.add_parser("gate", help="wait until a client's models are ready (for ExecStartPre=)")
    gate_parser.add_argument("instance", nargs="?", help="only this client's models (default: all clients)")
    gate_parser.add_argument("--url", help="orchestrator URL (default from GPU_ORCHESTRATOR_HOST/PORT, "
                                           "else http://127.0.0.1:8014)")
    gate_parser.add_argument("--timeout", help="seconds to wait, all requests included (GATE_TIMEOUT, default 180)")
    gate_parser.add_argument("--summary-dir", help="where the result summary goes "
                                                   "(default $XDG_CACHE_HOME/gpu-orchestrator/preflight)")
    diag_parser = commands.add_parser("mps-diag", help="diagnose the MPS pipe and log folders, daemon and limits")
    diag_parser.add_argument("--json", action="store_true", help="machine-readable output")
    diag_parser.add_argument("--pipe-dir", help="CUDA_MPS_PIPE_DIRECTORY (default from the environment, else /tmp/nvidia-mps)")
    diag_parser.add_argument("--log-dir", help="CUDA_MPS_LOG_DIRECTORY (default from the environment, else /var/log/nvidia-mps)")
    diag_parser.add_argument("--timeout", default="5", help="seconds the daemon has to answer (default 5)")
    check_parser = commands.add_parser("gpu-check", help="exercise the real NVML and MPS paths on a GPU host")
    check_parser.add_argument("--model-dir", help="a safetensors snapshot to load with the torch backend under MPS")
    commands.add_parser("bench", help="benchmarks (scripts/bench): prints a table, writes BENCHMARKS.md",
                        add_help=False)
    commands.add_parser("bench-gpu", help="warm-up onto the GPU against the pinned host-to-device copy",
                        add_help=False)
    for name, what in (("env", "print a client's MPS environment as KEY=value lines (for EnvironmentFile=)"),
                       ("exec", "run COMMAND as this client's service, under its MPS environment")):
        client_parser = commands.add_parser(name, help=what)
        client_parser.add_argument("client", help="a client of the model map")
        client_parser.add_argument("--url", help="orchestrator URL (default from GPU_ORCHESTRATOR_HOST/PORT)")
        client_parser.add_argument("--allow-without-mps", action="store_true",
                                   help="go on when MPS is configured but its daemon does not answer (no limits)")
        if name == "exec":
            client_parser.usage = "gpu-orchestrator exec [-h] [--url URL] [--allow-without-mps] CLIENT -- COMMAND [ARGS...]"
    status_parser = commands.add_parser("status", help="show a running orchestrator: GPUs, clients, models, MPS")
    status_parser.add_argument("client", nargs="?", help="show this client in detail, its errors in full")
    status_parser.add_argument("-v", "--verbose", action="store_true", help="each model's state and warm-up progress")
    status_parser.add_argument("--url", help="orchestrator URL (default from GPU_ORCHESTRATOR_HOST/PORT)")
    status_parser.add_argument("--json", action="store_true", help="print /models/status and /gpu/info as JSON")
    status_parser.add_argument("--watch", nargs="?", const="2", metavar="SECONDS",
                               help="refresh every SECONDS (default 2) until Ctrl-C")
    for name, subparser in commands.choices.items():
        helptext.describe(subparser, name)
    return parser


def overrides_from(args: argparse.Namespace) -> dict:
    return {
        "gpu_orchestrator_host": args.host,
        "gpu_orchestrator_port": args.port,
        "model_store_root": getattr(args, "model_store", None),
        "agent_model_map": getattr(args, "model_map", None),
        "mps_allocation_config": getattr(args, "allocation", None),
        "no_preload": args.no_preload,
    }


def policy_from(args: argparse.Namespace) -> Policy:
    for flag in ("heartbeat_timeout", "mps_probe_interval", "mps_timeout", "mps_start_timeout", "telemetry_interval"):
        if not getattr(args, flag) > 0:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be > 0, got {getattr(args, flag)}")
    if not args.heartbeat_timeout >= MIN_HEARTBEAT_TIMEOUT:  # nan too
        raise ConfigError(f"--heartbeat-timeout: must be at least {MIN_HEARTBEAT_TIMEOUT} s, got {args.heartbeat_timeout} "
                          f"(a loader publishes every quarter of the timeout; below {MIN_HEARTBEAT_TIMEOUT} s a busy "
                          "host's scheduling delays alone would get healthy loaders killed)")
    return Policy(heartbeat_timeout=args.heartbeat_timeout)


def mps_settings_from(config: Config, args: argparse.Namespace) -> MpsSettings:
    return MpsSettings(config.mps_pipe_dir, config.mps_log_dir, probe_interval=args.mps_probe_interval,
                       command_timeout=args.mps_timeout, start_timeout=args.mps_start_timeout)


def run_demo(args: argparse.Namespace) -> int:
    directory = args.dir or tempfile.mkdtemp(prefix="gpu-orchestrator-demo-")
    try:
        files = demo.write_demo(directory)
        overrides = overrides_from(args) | {
            "model_store_root": files.store, "agent_model_map": files.model_map,
            "mps_allocation_config": files.allocation, "strict_model_store": True}
        config = load_config(env=demo_environment(), overrides=overrides)
        print(f"Demo model store written to {directory}", file=sys.stderr)
        return serve(config, policy_from(args), mps=mps_settings_from(config, args),
                     telemetry_interval=args.telemetry_interval,
                     metrics_listen=metrics_listen_address(args.metrics_listen, os.environ),
                     on_listening=lambda port: print(demo.instructions(url_host(config.host), port, args.dir),
                                                     file=sys.stderr))
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


def demo_environment() -> dict:
    """The demo uses its own store and files; of the environment it keeps where to listen and what to run."""
    keep = ("GPU_ORCHESTRATOR_HOST", "GPU_ORCHESTRATOR_PORT", "GPU_ORCHESTRATOR_TOKEN", "LOG_LEVEL",
            "ENABLE_NVML", "ENABLE_MPS", "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
    return {name: os.environ[name] for name in keep if name in os.environ}


def client_url(args: argparse.Namespace) -> str:
    """--url, else where GPU_ORCHESTRATOR_HOST/PORT say the orchestrator listens."""
    if args.url:
        return check_url(args.url)
    env = os.environ
    try:  # read as `serve` reads it: an empty port must not mean port 80
        port = parse_port("GPU_ORCHESTRATOR_PORT", env.get("GPU_ORCHESTRATOR_PORT", DEFAULT_PORT))
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return check_url(base_url(env.get("GPU_ORCHESTRATOR_HOST", DEFAULT_HOST), port),
                     "GPU_ORCHESTRATOR_HOST/GPU_ORCHESTRATOR_PORT")


def run_gate_command(args: argparse.Namespace) -> int:
    env = os.environ
    timeout = seconds(args.timeout, "--timeout") if args.timeout is not None else \
        seconds(env.get("GATE_TIMEOUT", "180"), "GATE_TIMEOUT")
    token = env.get("GPU_ORCHESTRATOR_TOKEN") or None
    if token is not None and (problem := token_problem(token)):
        raise UsageError(problem)
    directory = Path(args.summary_dir) if args.summary_dir else None
    instance = unit_instance(args.instance) if args.instance is not None else None
    return run_gate(instance, client_url(args), timeout, token, directory)


def run_command(args: argparse.Namespace) -> int:
    if args.command == "gate":
        return run_gate_command(args)
    if args.command == "status":
        watch = seconds(args.watch, "--watch") if args.watch is not None else None
        return run_status(client_url(args), args.json, watch, args.client, args.verbose)
    if args.command == "gpu-check":
        return gpucheck.check(args.model_dir)
    if args.command == "env":
        return clientenv.run_env(client_url(args), unit_instance(args.client), args.allow_without_mps)
    if args.command == "exec":
        return clientenv.run_exec(client_url(args), unit_instance(args.client), args.command_line, args.allow_without_mps)
    if args.command == "mps-diag":
        return run_diag(MpsSettings(
            args.pipe_dir or mps_folders(os.environ)[0],
            args.log_dir or mps_folders(os.environ)[1],
            command_timeout=seconds(args.timeout, "--timeout")), args.json)
    if args.command == "demo":
        return run_demo(args)
    config = load_config(overrides=overrides_from(args))
    return serve(config, policy_from(args), mps=mps_settings_from(config, args),
                 telemetry_interval=args.telemetry_interval,
                 metrics_listen=metrics_listen_address(args.metrics_listen, os.environ))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from gpu_orchestrator.supervisor.commands import bench  # only the benchmark needs its helpers
        return bench.main(argv[1:])
    if argv[:1] == ["bench-gpu"]:
        from gpu_orchestrator.supervisor.commands import gpubench
        return gpubench.main(argv[1:])
    # exec's COMMAND is everything after '--', its options included: argparse must never see them.
    command_line = []
    if argv[:1] == ["exec"] and "--" in argv:
        cut = argv.index("--")
        argv, command_line = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.command_line = command_line
    try:
        setup_logging()
        code = run_command(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled, not at exit
        return code
    except UsageError as exc:
        print(for_stderr(f"gpu-orchestrator {args.command}: error: {exc}"), file=sys.stderr)
        return EX_USAGE
    except (ConfigError, LogLevelError) as exc:
        print(for_stderr(f"gpu-orchestrator: configuration error: {exc}"), file=sys.stderr)
        return os.EX_CONFIG
    except BrokenPipeError:
        # The reader went away (`status --json | head -c 10`): stop as cat does, without a traceback,
        # and keep the interpreter's own last flush from failing on the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
