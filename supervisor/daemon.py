"""The daemon assembled: listen, create the channel, start the arbiter's loop and the HTTP server.

`serve` is what `gpu-orchestrator serve` (and `demo`) runs; the order of its steps is the
contract that a taken port or a full /dev/shm starts nothing at all.
"""

import errno
import logging
import os
import signal
import socket

from gpu_orchestrator.http import server
from gpu_orchestrator.http.app import base_url, create_app, is_loopback
from gpu_orchestrator.http.metrics import RequestCounter
from gpu_orchestrator.loaders import channel
from gpu_orchestrator.loaders.logs import kv
from gpu_orchestrator.supervisor.answers import ShuttingDown
from gpu_orchestrator.supervisor.arbiter import QUEUED_SIGNALS, Arbiter
from gpu_orchestrator.supervisor.clients import Policy
from gpu_orchestrator.supervisor.config import METRICS_LISTEN_ENV, Config
from gpu_orchestrator.supervisor.mps_control import MpsSettings
from gpu_orchestrator.supervisor.slots import create_segment

log = logging.getLogger("supervisor")
HTTP_THREADS = 8


class CannotStart(Exception):
    """Start-up stopped before anything ran; the error is logged, `status` is the exit status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def serve(config: Config, policy: Policy = Policy(), on_listening=None, mps: MpsSettings | None = None,
          telemetry_interval: float = 2.0, metrics_listen: tuple[str, int] | None = None) -> int:
    """Run until SIGTERM/SIGINT. Until the loop queues them (Arbiter.run), SIGHUP, SIGTERM and SIGINT
    wait blocked: a reload asked for while we start, whose default action would end us silently, is
    served once the loop runs; a SIGTERM then stops us as cleanly as later. The mask is ours again after."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, QUEUED_SIGNALS)
    try:
        return start_and_run(config, policy, on_listening, mps, telemetry_interval, metrics_listen)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def start_and_run(config: Config, policy: Policy, on_listening, mps: MpsSettings | None, telemetry_interval: float,
                  metrics_listen: tuple[str, int] | None) -> int:
    """Order matters: nothing is started if a port is taken or the channel cannot be made (no
    loader, no MPS daemon, no segment left behind)."""
    for warning in config.warnings:
        log.warning(warning)
    if not server.keep_heap_for_answers():
        log.debug("malloc keeps its defaults (not glibc): large answers cost page faults")
    try:
        sockets = open_sockets(config, metrics_listen)
        try:
            segment = open_channel(config)
        except CannotStart:
            for sock in sockets:
                sock.close()
            raise
    except CannotStart as exc:
        return exc.status
    try:
        arbiter = Arbiter(config, segment, policy, mps=mps if config.enable_mps else None,
                          telemetry_interval=telemetry_interval)
        arbiter.server = http_server(arbiter.answers, config, *sockets)
        log.info(kv("listening", url=base_url(*sockets[0].getsockname()[:2]), clients=len(config.clients),
                    segment=segment.name))
        if on_listening is not None:
            on_listening(sockets[0].getsockname()[1])
        arbiter.run()
    finally:
        segment.close()  # idempotent; covers a failure before the loop owned it
    return 0


def open_sockets(config: Config, metrics_listen: tuple[str, int] | None) -> list:
    """The API's listening socket, and the metrics listener's when asked for; CannotStart if one is taken."""
    try:
        sockets = [server.listen(config.host, config.port)]
    except OSError as exc:
        log.error(kv("cannot listen", host=config.host, port=config.port, error=exc.strerror or str(exc),
                     hint=listen_hint(exc, "--host/GPU_ORCHESTRATOR_HOST", "--port")))
        raise CannotStart(os.EX_UNAVAILABLE) from None
    if metrics_listen is not None:
        try:
            sockets.append(server.listen(*metrics_listen))
        except OSError as exc:
            sockets[0].close()
            flag = f"--metrics-listen ({METRICS_LISTEN_ENV})"
            log.error(kv("cannot listen for metrics", host=metrics_listen[0], port=metrics_listen[1],
                         error=exc.strerror or str(exc), hint=listen_hint(exc, flag, flag)))
            raise CannotStart(os.EX_UNAVAILABLE) from None
    return sockets


def listen_hint(exc: OSError, host_flag: str, port_flag: str) -> str:
    """What to do about a failed bind: a taken port is not a name that does not resolve."""
    # socket.create_server re-raises getaddrinfo's gaierror as a plain OSError: its errno (EAI_*) is negative.
    if isinstance(exc, socket.gaierror) or (exc.errno or 0) < 0:
        return f"the host name does not resolve here; give {host_flag} an address of this host (127.0.0.1)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"this host has no such address; give {host_flag} one of its own (127.0.0.1)"
    if exc.errno == errno.EACCES:
        return f"a port below 1024 needs CAP_NET_BIND_SERVICE; pick another {port_flag}"
    return f"another orchestrator may be running; pick another {port_flag}"


def open_channel(config: Config) -> channel.Segment:
    """A new segment, after removing what killed runs of ours left; CannotStart when /dev/shm has no room."""
    for name in channel.remove_stale_segments():
        log.warning(kv("removed a stale shared-memory segment from a killed run", segment=name))
    try:
        return create_segment(config)
    except channel.ChannelError as exc:
        log.error(kv("cannot create the shared-memory channel", error=exc))
        raise CannotStart(os.EX_OSERR) from None


def http_server(answers, config: Config, sock, metrics_sock=None):
    """The waitress server for the API and, on `metrics_sock`, the scrape-only app (same threads)."""
    host, port = sock.getsockname()[:2]
    warnings = exposure_warnings(host, config.token)
    for warning in warnings:
        log.warning(warning)
    requests = RequestCounter()  # one count for both listeners, whichever /metrics is scraped
    app = create_app(answers, token=config.token, unavailable_errors=(ShuttingDown,), served=(host, port),
                     warnings=warnings, requests=requests)
    http = server.create_server(app, sock, HTTP_THREADS)
    if metrics_sock is not None:
        metrics_host, metrics_port = metrics_sock.getsockname()[:2]
        scrape_app = create_app(answers, unavailable_errors=(ShuttingDown,), served=(metrics_host, metrics_port),
                                warnings=warnings, scrape_only=True, requests=requests)
        server.serve_also(http, scrape_app, metrics_sock)
        log.info(kv("metrics listening", url=base_url(metrics_host, metrics_port), routes="/metrics /health /ready"))
    return http


def exposure_warnings(address: str, token: str | None) -> tuple[str, ...]:
    """Listening beyond loopback without a token lets anyone who reaches the port start warm-ups."""
    if token or is_loopback(address):
        return ()
    return (f"LISTENING ON {address}, NOT LOOPBACK, WITHOUT GPU_ORCHESTRATOR_TOKEN: anyone who can reach this "
            "port can start warm-ups and read every path and error; set GPU_ORCHESTRATOR_TOKEN or listen on 127.0.0.1",)
