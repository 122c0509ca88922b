"""`gpu-orchestrator`: serve (the systemd service) and demo (a built-in store to try it on)."""

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile

import waitress

from gpu_orchestrator.http.app import create_app
from gpu_orchestrator.supervisor import channel, demo
from gpu_orchestrator.supervisor.arbiter import Arbiter, ShuttingDown
from gpu_orchestrator.supervisor.clients import Policy
from gpu_orchestrator.supervisor.config import EX_CONFIG, Config, ConfigError, load_config
from gpu_orchestrator.supervisor.logs import kv, setup_logging

log = logging.getLogger("supervisor")
EX_UNAVAILABLE = 69
HTTP_THREADS = 8


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (GPU_ORCHESTRATOR_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (GPU_ORCHESTRATOR_PORT, default 8014)")
    parser.add_argument("--no-preload", action="store_true", help="do not start a warm-up at start")
    parser.add_argument("--heartbeat-timeout", type=float, default=Policy.heartbeat_timeout, metavar="SECONDS",
                        help="kill and restart a loader silent this long (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-orchestrator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the orchestrator (what systemd starts)")
    add_serve_flags(serve_parser)
    serve_parser.add_argument("--model-store", help="MODEL_STORE_ROOT")
    serve_parser.add_argument("--model-map", help="AGENT_MODEL_MAP (path of AGENT_MODEL_MAP.json)")
    serve_parser.add_argument("--allocation", help="MPS_ALLOCATION_CONFIG (path of mps_allocation_config.json)")
    demo_parser = commands.add_parser("demo", help="write a small demo model store and serve it")
    add_serve_flags(demo_parser)
    demo_parser.add_argument("--dir", help="write the demo here and keep it (default: a temporary folder, removed at exit)")
    return parser


def listen(config: Config) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    return socket.create_server((config.host, config.port), family=family, backlog=1024)


def serve(config: Config, policy: Policy = Policy(), on_listening=None) -> int:
    """Run until SIGTERM/SIGINT. Order matters: nothing is started if the port is taken."""
    for warning in config.warnings:
        log.warning(warning)
    if config.enable_mps:
        log.warning(kv("ENABLE_MPS=true, but MPS management is not implemented in this version: "
                       "loaders run WITHOUT MPS memory limits"))
    try:
        sock = listen(config)
    except OSError as exc:
        log.error(kv("cannot listen", host=config.host, port=config.port, error=exc.strerror,
                     hint="another orchestrator may be running; pick another --port"))
        return EX_UNAVAILABLE
    for name in channel.remove_stale_segments():
        log.warning(kv("removed a stale shared-memory segment from a killed run", segment=name))
    # Slot 0 is kept for the telemetry sampler; loaders write slots 1..n.
    segment = channel.Segment.create(channel.segment_name(os.getpid()), slots=len(config.clients) + 1,
                                     slot_size=slot_size_for(config))
    try:
        arbiter = Arbiter(config, segment, policy)
        app = create_app(arbiter, token=config.token, unavailable_errors=(ShuttingDown,))
        # channel_timeout drops idle keep-alive clients; connection_limit bounds sockets so
        # abandoned connections cannot exhaust file descriptors.
        arbiter.server = waitress.create_server(app, sockets=[sock], threads=HTTP_THREADS, channel_timeout=30,
                                                connection_limit=256, ident="gpu-orchestrator")
        host, port = sock.getsockname()[:2]
        log.info(kv("listening", url=f"http://{host}:{port}", clients=len(config.clients), segment=segment.name))
        if on_listening is not None:
            on_listening(port)
        arbiter.run()
    finally:
        segment.close()  # idempotent; covers a failure before the loop owned it
    return 0


def slot_size_for(config: Config) -> int:
    """Room for the largest client's state with long errors (the list of paths tried)."""
    largest = max((len(models) for models in config.clients.values()), default=0)
    size = 16 * 1024 + largest * 6 * 1024
    return (size + 4095) // 4096 * 4096


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
    if not args.heartbeat_timeout > 0:
        raise ConfigError(f"--heartbeat-timeout: must be > 0, got {args.heartbeat_timeout}")
    return Policy(heartbeat_timeout=args.heartbeat_timeout)


def run_demo(args: argparse.Namespace) -> int:
    directory = args.dir or tempfile.mkdtemp(prefix="gpu-orchestrator-demo-")
    try:
        files = demo.write_demo(directory)
        overrides = overrides_from(args) | {
            "model_store_root": files.store, "agent_model_map": files.model_map,
            "mps_allocation_config": files.allocation, "strict_model_store": True}
        config = load_config(env=demo_environment(), overrides=overrides)
        print(f"Demo model store written to {directory}", file=sys.stderr)
        return serve(config, policy_from(args),
                     on_listening=lambda port: print(demo.instructions(config.host, port), file=sys.stderr))
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


def demo_environment() -> dict:
    """The demo ignores any production settings in the environment but the listen address."""
    keep = ("GPU_ORCHESTRATOR_HOST", "GPU_ORCHESTRATOR_PORT", "GPU_ORCHESTRATOR_TOKEN", "LOG_LEVEL")
    return {name: os.environ[name] for name in keep if name in os.environ}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        if args.command == "demo":
            return run_demo(args)
        return serve(load_config(overrides=overrides_from(args)), policy_from(args))
    except ConfigError as exc:
        print(f"gpu-orchestrator: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())
