"""`gpu-orchestrator gate` against a live orchestrator, and its cached summaries."""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from support import Orchestrator, free_port, wait_for, write_config, write_figures

REPO = Path(__file__).resolve().parents[2]


def command(tmp_path, name, *args, env=None, prefix=()):
    full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})}
    for variable in ("GPU_ORCHESTRATOR_HOST", "GPU_ORCHESTRATOR_PORT", "GATE_TIMEOUT"):
        if variable not in (env or {}):
            full_env.pop(variable, None)
    return subprocess.run([*prefix, sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", name, *args],
                          capture_output=True, text=True, env=full_env, timeout=120)


def gate(tmp_path, *args, env=None, prefix=()):
    return command(tmp_path, "gate", *args, env=env, prefix=prefix)


def one_line_error(result, code: int) -> str:
    """The command ended with `code` and a single line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr


def summary_file(tmp_path, instance):
    return json.loads((tmp_path / "cache" / "gpu-orchestrator" / "preflight" / f"summary_{instance}.json").read_text())


def test_failures_are_listed_per_model_and_instances_filter(tmp_path, orchestrator):
    result = gate(tmp_path, "--url", orchestrator.url, "--timeout", "60")
    assert result.returncode == 1
    assert "agent=beta model=org/missing error=model org/missing not found" in result.stderr
    assert "total=5 done=4 failed=1" in result.stderr
    cached = summary_file(tmp_path, "all")
    assert cached["result"] == "failed" and cached["exit_code"] == 1
    assert cached["errors"][0]["model"] == "org/missing" and cached["summary"]["failed"] == 1

    alpha = gate(tmp_path, "alpha", "--url", orchestrator.url, "--timeout", "60")
    assert alpha.returncode == 0, alpha.stderr
    assert summary_file(tmp_path, "alpha")["result"] == "ready"
    beta = gate(tmp_path, "beta", "--url", orchestrator.url, "--timeout", "60")
    assert beta.returncode == 1 and "agent=beta model=org/missing" in beta.stderr
    assert "agent=alpha" not in beta.stderr


def test_ready_host_passes_and_the_wrapper_script_works(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"], "gamma": ["org/g1"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",)) as orch:
        # Nothing warmed yet: the gate itself asks for the warm-up and waits for it.
        result = gate(tmp_path, "gamma", "--url", orch.url)
        assert result.returncode == 0, result.stderr
        assert orch.status()["generation"] == 1
        cached = summary_file(tmp_path, "gamma")
        assert cached["result"] == "ready" and cached["instance"] == "gamma" and cached["elapsed_s"] >= 0
        port = orch.url.rsplit(":", 1)[1]
        bin_dir = str(Path(sys.executable).parent)
        wrapped = subprocess.run([str(REPO / "scripts" / "preflight.sh"), "--gate-only", "alpha"],
                                 capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "GPU_ORCHESTRATOR_PORT": port, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                      "XDG_CACHE_HOME": str(tmp_path / "cache")})
        assert wrapped.returncode == 0, wrapped.stderr
        # Where the operations doc says the wrapper's summaries are.
        doc = tmp_path / "cache" / "justnews" / "preflight" / "summary_alpha.json"
        assert json.loads(doc.read_text())["result"] == "ready"
        assert not (tmp_path / "cache" / "gpu-orchestrator" / "preflight" / "summary_alpha.json").exists()


def test_timeout_when_a_warmup_never_finishes(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",)) as orch:
        wait_for(lambda: orch.status()["clients"]["alpha"]["pid"], what="loader up")
        frozen = orch.loader_pid("alpha")
        os.kill(frozen, signal.SIGSTOP)
        try:
            result = gate(tmp_path, "alpha", "--url", orch.url, env={"GATE_TIMEOUT": "2"})
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert result.returncode == 1
        assert "models not ready after 2 s" in result.stderr
        assert summary_file(tmp_path, "alpha")["result"] == "timeout"


def requests_counted(orch, method: str, route: str) -> float:
    """Requests of `method` to `route` the orchestrator has counted, whatever their answer."""
    metrics = urllib.request.urlopen(orch.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("gpu_orchestrator_http_requests_total{")
               and f'route="{route}"' in line and f'method="{method}"' in line)


def test_a_warmup_under_way_is_waited_for_not_asked_for_again(tmp_path, store):
    """The boot's warm-up (here a refresh) is under way: the gate waits for it. Asking for
    another would be refused where POST needs a token the GPU service's unit does not hold."""
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    with Orchestrator(tmp_path, store, model_map, env={"GPU_ORCHESTRATOR_TOKEN": "s3cret"}) as orch:
        orch.wait_settled()
        frozen = orch.loader_pid("alpha")
        os.kill(frozen, signal.SIGSTOP)  # the refresh below stays under way until SIGCONT
        try:
            assert orch.post("/models/preload", {"refresh": True}, {"Authorization": "Bearer s3cret"})[0] == 202
            asked, looked = requests_counted(orch, "POST", "/models/preload"), requests_counted(orch, "GET", "/models/status")
            waiting = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "gate",
                                        "alpha", "--url", orch.url, "--timeout", "120"],
                                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # After its first look it used to ask, be refused (401) and give up; a second look means it waits.
            wait_for(lambda: waiting.poll() is not None or requests_counted(orch, "GET", "/models/status") >= looked + 2,
                     timeout=60, what="the gate's second look at the status")
        finally:
            os.kill(frozen, signal.SIGCONT)
        _, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        assert requests_counted(orch, "POST", "/models/preload") == asked, "asked for a warm-up while one was under way"
        assert summary_file(tmp_path, "alpha")["result"] == "ready"


def test_an_instance_the_model_map_lacks_is_refused_not_waved_through(tmp_path, orchestrator):
    """A typo in a unit's instance name must not leave the service ungated: 67, as `env` answers."""
    result = gate(tmp_path, "alhpa", "--url", orchestrator.url, "--timeout", "60")
    error = one_line_error(result, 67)
    assert "alhpa is not a client in the orchestrator's model map (its clients: alpha, beta" in error
    assert summary_file(tmp_path, "alhpa")["result"] == "no such client"
    assert summary_file(tmp_path, "alhpa")["exit_code"] == 67


def test_nothing_listening_and_the_orchestrator_itself(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = gate(tmp_path, "alpha", "--url", url, "--timeout", "1")
    assert result.returncode == 1 and f"nothing answers at {url} (connection refused)" in result.stderr
    assert summary_file(tmp_path, "alpha")["result"] == "unreachable"
    itself = gate(tmp_path, "gpu_orchestrator", "--url", url, "--timeout", "1")
    assert itself.returncode == 0 and summary_file(tmp_path, "gpu_orchestrator")["result"] == "skipped"


@pytest.mark.parametrize("instance", ["../../../../escape", "a/b", "..", "bad\nname"])
def test_instance_names_are_client_names_refused_before_touching_the_disk(tmp_path, instance):
    url = f"http://127.0.0.1:{free_port()}"
    error = one_line_error(gate(tmp_path, instance, "--url", url, "--timeout", "1"), 2)
    assert "gpu-orchestrator gate: error: instance: client name" in error and "must be a plain name" in error
    assert list(tmp_path.rglob("*")) == []


def test_a_read_only_cache_costs_a_warning_not_the_verdict(tmp_path, store):
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    cache = tmp_path / "cache" / "gpu-orchestrator" / "preflight"
    cache.mkdir(parents=True)
    cache.chmod(0o555)
    # As root, only without CAP_DAC_OVERRIDE does a 0555 folder refuse writes (ProtectHome=read-only does it for real).
    no_dac = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    with Orchestrator(tmp_path, store, model_map) as orch:
        orch.wait_settled()
        result = gate(tmp_path, "alpha", "--url", orch.url, "--timeout", "60", prefix=no_dac)
    cache.chmod(0o755)
    assert result.returncode == 0 and "gate: alpha: ready" in result.stdout
    warning = one_line_error(result, 0)
    assert f"gate: warning: the summary was not written to {cache}/summary_alpha.json (Permission denied)" in warning
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("args,env,named", [
    (("--timeout", "nan"), {}, "--timeout: expected a positive number of seconds up to 604800, got 'nan'"),
    (("--timeout", "-1"), {}, "--timeout: expected a positive number of seconds up to 604800, got '-1'"),
    (("--timeout", "inf"), {}, "--timeout: expected a positive number of seconds up to 604800, got 'inf'"),
    ((), {"GATE_TIMEOUT": "nan"}, "GATE_TIMEOUT: expected a positive number of seconds up to 604800, got 'nan'"),
    (("--url", "127.0.0.1:8014"), {}, "--url: expected http://HOST:PORT"),
    (("--url", "http://[::1:8014"), {}, "--url: 'http://[::1:8014' is not a usable URL"),
    ((), {"GPU_ORCHESTRATOR_PORT": "eighty"}, "GPU_ORCHESTRATOR_PORT: expected a port number, got 'eighty'"),
    ((), {"GPU_ORCHESTRATOR_PORT": ""}, "GPU_ORCHESTRATOR_PORT: expected a port number, got ''"),  # once port 80
    ((), {"GPU_ORCHESTRATOR_TOKEN": "s3cret\nX-Injected: 1"}, "GPU_ORCHESTRATOR_TOKEN: only visible ASCII"),
    ((), {"GPU_ORCHESTRATOR_TOKEN": "s3cret "}, "this one (7 characters) has others"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, env, named):
    url = () if "--url" in args or "GPU_ORCHESTRATOR_PORT" in env else ("--url", f"http://127.0.0.1:{free_port()}")
    error = one_line_error(gate(tmp_path, "alpha", *url, *args, env=env), 2)
    assert named in error
    assert not (tmp_path / "cache").exists()


class FakeServer:
    """Something listening on a loopback port that is not quite a gpu-orchestrator."""

    def __init__(self, answers: dict):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                answer = answers.get(self.path, (404, "application/json", b"{}"))
                code, kind, body = answer() if callable(answer) else answer
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


HEALTH = (200, "application/json", b'{"status": "ok"}')
CLIENT = {"ready": False, "in_progress": False, "state": "RUNNING", "pid": 1, "restarts": 0, "models": [],
          "gpu_memory_bytes": None, "rss_bytes": None}
STATUS = {"in_progress": False, "all_ready": False, "generation": 1, "summary": {"total": 1, "done": 0, "failed": 1},
          "errors": [{"agent": "alpha", "model": "org/a1", "error": "broken"}], "clients": {"alpha": CLIENT}}


def as_answer(document) -> tuple:
    return 200, "application/json", json.dumps(document).encode()


@pytest.mark.parametrize("answers,named", [
    ({"/health": (200, "text/html", b"<html>nginx</html>")}, "/health answered 200 with text/html, not JSON: '<html>"),
    ({"/health": HEALTH, "/models/status": as_answer({**STATUS, "clients": "alpha"})},
     "/models/status answered with an unexpected document: Expected `object`, got `str` - at `$.clients`"),
    ({"/health": HEALTH, "/models/status": as_answer({**STATUS, "errors": [{"agent": "alpha", "error": "x"}]})},
     "Object missing required field `model` - at `$.errors[0]`"),
    ({"/health": HEALTH, "/models/status": (503, "application/json", b'{"description": "shutting down"}')},
     "/models/status answered 503: shutting down"),
], ids=["html", "clients-a-string", "error-without-model", "503"])
def test_odd_answers_are_named(tmp_path, answers, named):
    fake = FakeServer(answers)
    try:
        result = gate(tmp_path, "alpha", "--url", fake.url, "--timeout", "10")
        status = command(tmp_path, "status", "--url", fake.url)
    finally:
        fake.close()
    assert named in one_line_error(result, 1) and "is " + fake.url + " a gpu-orchestrator?" in result.stderr
    assert summary_file(tmp_path, "alpha")["result"] == "bad answer"
    if "/models/status" in answers:
        assert named in one_line_error(status, 1)


def test_a_stopping_orchestrator_is_waited_out_not_taken_for_up(tmp_path):
    # What a restart under systemd looks like from outside: /health still answers, saying
    # "stopping", and /models/status is 503, until the new process serves.
    asked = []

    def health():
        asked.append("health")
        return HEALTH if len(asked) > 2 else (200, "application/json", b'{"status": "stopping"}')

    def models_status():
        if len(asked) <= 2:
            return 503, "application/json", b'{"description": "shutting down"}'
        return as_answer({**STATUS, "all_ready": True, "summary": {"total": 1, "done": 1, "failed": 0}, "errors": [],
                          "clients": {"alpha": {**CLIENT, "ready": True}}})

    fake = FakeServer({"/health": health, "/models/status": models_status})
    try:
        result = gate(tmp_path, "alpha", "--url", fake.url, "--timeout", "30")
    finally:
        fake.close()
    assert result.returncode == 0, result.stderr
    assert len(asked) == 3 and summary_file(tmp_path, "alpha")["result"] == "ready"


def test_a_server_that_never_answers_is_bounded_by_the_timeout(tmp_path):
    with socket.socket() as silent:  # listens (the kernel accepts connections) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = gate(tmp_path, "alpha", "--url", url, "--timeout", "2")
        took = time.monotonic() - started
    assert f"nothing answers at {url} (it accepted the connection but did not answer in time)" in \
        one_line_error(result, 1)
    write_figures("gate --timeout 2 against a server that never answers", process_s=round(took, 2),
                  summary_elapsed_s=summary_file(tmp_path, "alpha")["elapsed_s"])


def test_status_into_a_closed_pipe_and_ipv6_urls(tmp_path, orchestrator):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -c 10` that has already finished: every write fails with EPIPE
    try:
        closed = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "status", "--json",
                                 "--url", orchestrator.url], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                timeout=60)
    finally:
        os.close(write_end)
    assert closed.returncode == 141 and closed.stderr == ""
    port = str(free_port())
    ipv6 = {"GPU_ORCHESTRATOR_HOST": "::1", "GPU_ORCHESTRATOR_PORT": port}
    status = command(tmp_path, "status", env=ipv6)
    assert f"nothing answers at http://[::1]:{port} (" in one_line_error(status, 1)
    gated = gate(tmp_path, "alpha", "--timeout", "1", env=ipv6)
    assert f"nothing answers at http://[::1]:{port} (" in one_line_error(gated, 1)


def test_the_boot_warm_up_is_waited_for_while_mps_comes_up(tmp_path, store):
    """The loaders (and the boot's warm-up) start once MPS answers. Before, the status said nothing
    under way, so the gate asked for a warm-up, was refused (401: POST needs the token its unit does
    not hold) and failed the service's start while the orchestrator was only slow to come up."""
    fakes = Path(__file__).resolve().parents[1] / "fakes" / "bin"
    hold = tmp_path / "hold"
    hold.touch()  # the fake daemon waits before opening its pipe while this file exists
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"]})
    env = {"GPU_ORCHESTRATOR_TOKEN": "s3cret", "ENABLE_MPS": "true", "FAKE_MPS_HOLD": str(hold),
           "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
           "PATH": f"{fakes}:{os.environ['PATH']}"}
    with Orchestrator(tmp_path, store, model_map, env=env, extra_args=("--mps-start-timeout", "300")) as orch:
        wait_for(lambda: orch.get("/health")[0] == 200, what="the orchestrator serving")
        status = orch.status()
        assert status["in_progress"] and status["generation"] == 0 and not status["all_ready"]
        looked = requests_counted(orch, "GET", "/models/status")
        waiting = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "gate",
                                    "alpha", "--url", orch.url, "--timeout", "120"],
                                   env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: waiting.poll() is not None or requests_counted(orch, "GET", "/models/status") >= looked + 2,
                     timeout=60, what="the gate's second look at the status")
        finally:
            hold.unlink()
        _, err = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, err
        assert requests_counted(orch, "POST", "/models/preload") == 0


def test_a_unit_instance_systemd_escaped_names_its_client(tmp_path, store):
    """`gpu-client@fact\\x20checker.service` passes %i as systemd wrote it: gate, env and exec once
    answered 67 for it, so a client with a space or a non-ASCII letter could never be gated."""
    model_map, _ = write_config(tmp_path, {"fact checker": ["org/a1"], "café": ["org/b1"]})
    with Orchestrator(tmp_path, store, model_map) as orch:
        assert orch.wait_settled()["all_ready"]
        for instance, client in (("fact\\x20checker", "fact checker"), ("caf\\xc3\\xa9", "café")):
            passed = gate(tmp_path, instance, "--url", orch.url, "--timeout", "60")
            assert passed.returncode == 0, passed.stderr
            printed = command(tmp_path, "env", instance, "--url", orch.url)
            assert printed.returncode == 0 and f"GPU_ORCHESTRATOR_CLIENT={client}\n" in printed.stdout
        assert gate(tmp_path, "fact\\x20checkr", "--url", orch.url, "--timeout", "60").returncode == 67
