"""`gpu-orchestrator gate [INSTANCE]`: block a dependent service until its models are ready.

Run as ExecStartPre= of the services that use the GPU. Exit 0 when ready; exit 1,
with one `agent=... model=... error=...` line per failed model and the summary,
when the warm-up failed, on timeout, when nothing answers, or when what answers is
not the orchestrator's API; exit 67 when the instance is not one of its clients. A
warm-up under way (the boot's) is waited for; one is asked for only when none is. The whole run, every request included, ends within
--timeout. Every run leaves its result in
$XDG_CACHE_HOME/gpu-orchestrator/preflight/summary_<instance>.json when it can
(a read-only cache only costs a warning: the verdict is what the unit waits for).
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from gpu_orchestrator.loaders.store import ORCHESTRATOR_NAMES, StoreError, check_client_name
from gpu_orchestrator.supervisor.commands.api import BadAnswer, ModelsStatus, Unreachable, UsageError, call, error_of

MAX_POLL = 8.0
NO_SUCH_CLIENT = 67  # EX_NOUSER, as `env`, `exec` and `status` answer for a name the model map lacks


class NoSuchClient(Exception):
    """The instance is not a client of this orchestrator: a typo must not leave a service ungated."""


def check_instance(instance: str) -> None:
    """An instance is a client name (the same rule the model map's names follow), and it becomes
    part of the summary's file name: '../../x' must never reach the disk."""
    try:
        check_client_name(instance)
    except StoreError as exc:
        raise UsageError(f"instance: {exc}") from None


def verdict(status: dict, instance: str | None) -> tuple[str | None, list[dict]]:
    """('ready' | 'failed' | None while undecided, the failures that matter to this instance)."""
    if instance is None:
        if status["all_ready"]:
            return "ready", []
        if not status["in_progress"] and status["generation"]:
            return "failed", status["errors"]
        return None, []
    client = status["clients"][instance]
    if client["ready"]:
        return "ready", []
    failures = [e for e in status["errors"] if e["agent"] == instance]
    if failures and not client["in_progress"]:
        return "failed", failures
    return None, []


def summary_dir() -> Path:
    """Where summaries go without --summary-dir: $XDG_CACHE_HOME/gpu-orchestrator/preflight."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpu-orchestrator" / "preflight"


def cache_path(instance: str | None, directory: Path | None = None) -> Path:
    return (directory or summary_dir()) / f"summary_{instance or 'all'}.json"


def write_summary(path: Path, result: dict) -> None:
    """Atomically (a reader never sees half a file) and at best: a unit with ProtectHome=read-only
    must still start when its models are ready."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".summary-")
        with os.fdopen(handle, "w") as out:
            json.dump(result, out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except OSError as exc:
        print(f"gate: warning: the summary was not written to {path} ({exc.strerror or exc}); "
              "the result stands. Point XDG_CACHE_HOME at a writable folder to keep it", file=sys.stderr)
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


class Gate:
    def __init__(self, url: str, instance: str | None, timeout: float, token: str | None):
        self.url = url
        self.instance = instance
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.token = token
        self.last_status: dict | None = None

    def wait_until_serving(self) -> None:
        """Until /health answers "ok": nothing listening yet, or an orchestrator that is stopping
        (systemd starts it again), is waited out until the deadline, not taken for an answer."""
        delay = 0.25
        while True:
            try:
                if not self.stopping():
                    return
                problem = f"the orchestrator at {self.url} is stopping and did not come back"
            except Unreachable as exc:
                problem = f"nothing answers at {self.url} ({exc})"
            if time.monotonic() + delay > self.deadline:
                raise Unreachable(problem) from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def stopping(self) -> bool:
        code, body = call(self.url + "/health", self.deadline)
        return code == 200 and isinstance(body, dict) and body.get("status") == "stopping"

    def status(self) -> dict:
        code, body = call(self.url + "/models/status", self.deadline, ModelsStatus)
        if code == 503 and self.stopping():  # it began stopping after /health said "ok"
            self.wait_until_serving()
            return self.status()
        if code != 200:
            raise BadAnswer(f"{self.url}/models/status answered {error_of(code, body)}")
        self.last_status = body
        return body

    def run(self) -> tuple[str, list[dict], str]:
        """(result, failures, message)."""
        self.wait_until_serving()
        status = self.status()
        if self.instance is not None and self.instance not in status["clients"]:
            raise NoSuchClient(f"{self.instance} is not a client in the orchestrator's model map (its clients: "
                               f"{', '.join(sorted(status['clients'])) or 'none'}); a unit's instance name must be "
                               "its client's name")
        result, failures = verdict(status, self.instance)
        if result is not None:
            return result, failures, result
        if not status["in_progress"]:
            # Nothing under way (started with --no-preload): ask for the warm-up. One under way, such
            # as the boot's own, is only waited for: asking again changes nothing, and where POST
            # needs a token this unit may not hold, asking would fail a gate that only has to wait.
            code, body = call(self.url + "/models/preload", self.deadline, method="POST",
                              body=b'{"refresh": false}', token=self.token)
            if code == 401:
                return "failed", [], ("no warm-up is under way and the orchestrator refused to start one (401): "
                                      "give the unit GPU_ORCHESTRATOR_TOKEN, or let the orchestrator preload at start")
            if code not in (200, 202, 503):
                raise BadAnswer(f"{self.url}/models/preload answered {error_of(code, body)}")
        delay = 0.5
        while True:
            result, failures = verdict(self.status(), self.instance)
            if result is not None:
                return result, failures, result
            if time.monotonic() + delay > self.deadline:
                return "timeout", [], f"models not ready after {self.timeout:g} s"
            time.sleep(delay)
            delay = min(delay * 2, MAX_POLL)


def run_gate(instance: str | None, url: str, timeout: float, token: str | None,
             directory: Path | None = None) -> int:
    if instance is not None:
        check_instance(instance)
    if instance in ORCHESTRATOR_NAMES:
        print(f"gate: {instance} is the orchestrator itself; nothing to wait for")
        write_summary(cache_path(instance, directory), {"instance": instance, "result": "skipped", "exit_code": 0})
        return 0
    started = time.monotonic()
    gate = Gate(url, instance, timeout, token)
    try:
        result, failures, message = gate.run()
    except Unreachable as exc:
        result, failures, message = "unreachable", [], str(exc)
    except BadAnswer as exc:
        result, failures, message = "bad answer", [], f"{exc}; is {url} a gpu-orchestrator?"
    except NoSuchClient as exc:
        result, failures, message = "no such client", [], str(exc)
    code = {"ready": 0, "no such client": NO_SUCH_CLIENT}.get(result, 1)
    summary = (gate.last_status or {}).get("summary")
    for failure in failures:
        print(f"agent={failure['agent']} model={failure['model']} error={failure['error']}", file=sys.stderr)
    line = f"gate: {instance or 'all clients'}: {message}"
    if summary:
        line += f" (total={summary['total']} done={summary['done']} failed={summary['failed']})"
    print(line, file=sys.stderr if code else sys.stdout)
    write_summary(cache_path(instance, directory), {
        "instance": instance or "all", "url": url, "result": result, "exit_code": code, "message": message,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(time.monotonic() - started, 3),
        "all_ready": (gate.last_status or {}).get("all_ready"), "summary": summary, "errors": failures,
    })
    return code
