"""The metrics listener (`--metrics-listen HOST:PORT`): GET /metrics, /health and /ready on a second
address, so a central Prometheus (or a kubelet's probes) can reach them while the API, whose POST
routes start warm-ups, stays on loopback. It is served by the API server's own event loop and
threads, with the same guards (http/server.py); nothing else is listening for it.
"""

import urllib.parse

from gpu_orchestrator.supervisor.config import ConfigError

ENV = "GPU_ORCHESTRATOR_METRICS_LISTEN"


def parse_listen(value: str, source: str) -> tuple[str, int]:
    """'0.0.0.0:9014', '127.0.0.1:9014', '[::]:9014' -> (host, port); ConfigError naming `source`."""
    try:
        parts = urllib.parse.urlsplit("//" + value)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"{source}: {value!r} is not HOST:PORT ({exc})") from None
    if not host or port is None or port == 0 or parts.path or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{source}: expected HOST:PORT with a port from 1 to 65535 "
                          f"(e.g. 0.0.0.0:9014 or [::]:9014), got {value!r}")
    return host, port


def listen_address(flag: str | None, env: dict) -> tuple[str, int] | None:
    """The flag, else the variable; None (off, the default) when neither is set."""
    if flag is not None:
        return parse_listen(flag, "--metrics-listen")
    if env.get(ENV):
        return parse_listen(env[ENV], ENV)
    return None

