"""`gpu-orchestrator env CLIENT` and `gpu-orchestrator exec CLIENT -- COMMAND [ARGS...]`.

A client's limits must reach the service that really runs its models, not only its
loader. Both commands ask the running orchestrator for the client's environment
(the one its loader runs with now: after reloads, with MPS in force or not), so
an operator never copies limits by hand. `env` prints it as KEY=value lines (the
format of systemd's EnvironmentFile= and of env); `exec` replaces itself with the
command, that environment added (same pid: systemd supervises the service itself),
less the API token (the service does not need it; its /proc/PID/environ would show it).

Exit status: 0; 2 bad arguments; 67 no such client; 69 no orchestrator answers (or
not as one); 75 MPS is configured but its daemon does not answer (the service
would run without its limits; --allow-without-mps runs it anyway); 127 the command
cannot be run.
"""

import os
import sys
import time
import urllib.parse

import msgspec

from gpu_orchestrator.supervisor.commands.api import BadAnswer, Unreachable, call, error_of
from gpu_orchestrator.supervisor.config import TOKEN_VARIABLE
from gpu_orchestrator.supervisor.mps_control import CLIENT_MPS

EX_NOT_FOUND = 127
ASK_TIMEOUT = 10.0


class ClientEnvironment(msgspec.Struct):
    client: str
    mps_configured: bool
    mps_in_force: bool
    mps_error: str | None
    environment: dict[str, str]
    memory_limit_bytes: int | None = None  # the client's limit, whether or not MPS enforces it


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def fetch(url: str, client: str, allow_without_mps: bool, timeout: float = ASK_TIMEOUT) -> ClientEnvironment:
    """The client's variables from the orchestrator at `url`, or Refused saying why not."""
    where = f"{url}/clients/{urllib.parse.quote(client, safe='')}/environment"
    try:
        status, document = call(where, time.monotonic() + timeout, ClientEnvironment)
    except Unreachable as exc:
        raise Refused(os.EX_UNAVAILABLE, f"no orchestrator answers at {url} ({exc}); is it running?") from None
    except BadAnswer as exc:
        raise Refused(os.EX_UNAVAILABLE, str(exc)) from None
    if status == 404:
        raise Refused(os.EX_NOUSER, f"client {client!r}: {error_of(status, document)}")
    if status != 200:
        raise Refused(os.EX_UNAVAILABLE, f"{where} answered {error_of(status, document)}")
    answer = msgspec.convert(document, ClientEnvironment)
    if answer.mps_configured and not answer.mps_in_force and not allow_without_mps:
        raise Refused(os.EX_TEMPFAIL, f"client {client!r}: MPS is configured but its control daemon does not answer "
                                   f"({answer.mps_error or 'no reason given'}), so this would run without its "
                                   "memory limit; start the daemon, or pass --allow-without-mps")
    return answer


def unenforced(answer: ClientEnvironment) -> list[str]:
    """A limit that MPS is off for (ENABLE_MPS=false, the operator's choice): run, but say so."""
    if answer.memory_limit_bytes is None or answer.mps_configured:
        return []
    return [f"client {answer.client!r} has a limit of {answer.memory_limit_bytes // 2**20} MiB, but the orchestrator "
            "runs with ENABLE_MPS=false, so nothing enforces it on this service; set ENABLE_MPS=true to enforce it"]


def overridden(own: dict[str, str], environment: dict[str, str]) -> list[str]:
    """The service's own MPS variables that the client's replace (or drop): said, not silently lost."""
    return [f"the service's own {key}={own[key]} is replaced by the client's "
            f"{key + '=' + environment[key] if key in environment else '(none: not set for this client)'}"
            for key in sorted(CLIENT_MPS & own.keys()) if own[key] != environment.get(key)]


def environment_lines(environment: dict[str, str]) -> str:
    """KEY=value lines; a value with a newline could forge another line, so none is printed."""
    for key, value in environment.items():
        if "\n" in key or "\n" in value or "=" in key:
            raise Refused(os.EX_UNAVAILABLE, f"the orchestrator sent an unusable variable {key!r}")
    return "".join(f"{key}={value}\n" for key, value in sorted(environment.items()))


def run_env(url: str, client: str, allow_without_mps: bool) -> int:
    try:
        answer = fetch(url, client, allow_without_mps)
        sys.stdout.write(environment_lines(answer.environment))
    except Refused as exc:
        print(f"gpu-orchestrator env: {exc}", file=sys.stderr)
        return exc.status
    for warning in unenforced(answer):
        print(f"gpu-orchestrator env: warning: {warning}", file=sys.stderr)
    return 0


def run_exec(url: str, client: str, command: list[str], allow_without_mps: bool) -> int:
    """Only returns when it could not exec."""
    if not command:
        print("gpu-orchestrator exec: no command given; usage: gpu-orchestrator exec CLIENT -- COMMAND [ARGS...]",
              file=sys.stderr)
        return 2
    try:
        answer = fetch(url, client, allow_without_mps)
        environment_lines(answer.environment)
    except Refused as exc:
        print(f"gpu-orchestrator exec: {exc}", file=sys.stderr)
        return exc.status
    for warning in unenforced(answer) + overridden(dict(os.environ), answer.environment):
        print(f"gpu-orchestrator exec: warning: {warning}", file=sys.stderr)
    withheld = CLIENT_MPS | {TOKEN_VARIABLE}
    merged = {k: v for k, v in os.environ.items() if k not in withheld} | answer.environment
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, merged)
    except OSError as exc:
        print(f"gpu-orchestrator exec: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return EX_NOT_FOUND
