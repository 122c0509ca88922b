"""Whatever a client sends, the API answers 2xx/4xx in JSON and only a valid preload changes state;
slow and abandoned connections do not starve anyone."""

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SOAK, Orchestrator, wait_for, write_config, write_figures

from gpu_orchestrator.http.resources import MAX_BODY
from gpu_orchestrator.http.server import MAX_HEADER_BYTES, REQUEST_DEADLINE

ROUTES = ["/health", "/ready", "/models/status", "/models/preload", "/gpu/info", "/mps/allocation", "/metrics"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                       max_leaves=10)
BODIES = st.one_of(st.binary(max_size=300), JSONISH.map(lambda v: json.dumps(v).encode()),
                   st.builds(lambda r, extra: json.dumps({"refresh": r, **extra}).encode(),
                             JSONISH, st.dictionaries(st.text(max_size=8), JSONISH, max_size=2)))
PATHS = st.one_of(st.sampled_from(ROUTES),
                  st.lists(st.text(max_size=12), min_size=1, max_size=4).map(
                      lambda parts: "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from support import add_model
    tmp = tmp_path_factory.mktemp("http-input")
    add_model(tmp / "store", "org/a1")
    model_map, _ = write_config(tmp, {"alpha": ["org/a1"]})
    with Orchestrator(tmp, tmp / "store", model_map) as orch:
        orch.wait_settled()
        orch.sent = 0
        yield orch
    if orch.sent:
        write_figures("bad HTTP input (hypothesis)", requests=orch.sent, server_errors=0, non_json_answers=0,
                      state_changed_by_other_than_valid_preload=0)


def send(port: int, method: str, path: str, body: bytes, headers: dict) -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type") or ""
    finally:
        conn.close()


@settings(max_examples=600 if SOAK else 150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(METHODS), path=PATHS, body=BODIES,
       headers=st.dictionaries(st.from_regex(r"X-[A-Za-z0-9-]{1,20}", fullmatch=True), HEADER_TEXT, max_size=4),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]))
def test_any_request_gets_json_and_changes_nothing_it_should_not(server, method, path, body, headers, content_type):
    if content_type:
        headers = {**headers, "Content-Type": content_type}
    before = server.status()["generation"]
    code, payload, kind = send(server.port, method, path, body, headers)
    server.sent += 1
    assert 200 <= code < 500, (code, payload)
    route = "/" + "/".join(part for part in path.split("/") if part)  # Falcon routes '//' as '/'
    if method != "HEAD":
        if route == "/metrics" and method == "GET" and code == 200:
            assert kind.startswith("text/plain")
        elif route == "/" and method == "GET" and code == 200:
            assert kind.startswith("text/html")  # the web page
        else:
            assert kind.startswith("application/json") and isinstance(json.loads(payload), dict)
    after = server.status()["generation"]
    valid_preload = method == "POST" and path == "/models/preload" and code == 202
    assert after == before or valid_preload


def test_slow_and_abandoned_connections_do_not_starve_clients(server, record):
    held = []
    try:
        for index in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if index % 2:
                sock.sendall(b"GET /models/status HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(sock)
        started = time.monotonic()
        for _ in range(20):
            assert server.get("/health")[0] == 200
            assert server.get("/models/status")[0] == 200
        took = time.monotonic() - started
    finally:
        for sock in held:
            sock.close()
    record("slow and abandoned connections", held_connections=len(held), requests_served_meanwhile=40,
           seconds_for_them=round(took, 2))


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, str, bytes]:
    """Send raw bytes, read until the server closes: (status, Content-Type, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers.get("Content-Type", ""), body


def test_a_declared_oversized_body_is_refused_from_its_headers(server):
    # Nothing of the 50 MB is sent: the answer must come from the headers alone.
    head = (f"POST /models/preload HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * 1024 * 1024}\r\n\r\n").encode()
    code, kind, body = exchange(server.port, head)
    assert code == 413 and kind == "application/json"
    assert json.loads(body)["status"] == 413
    assert json.loads(body)["description"] == f"request body exceeds {MAX_BODY} bytes"  # the route's limit
    # A chunked body declares no length: it is refused as it passes the limit. Exactly that much is
    # sent, so the server closes with nothing unread (which would reset the connection instead).
    size_line = f"{100 * 1024:x}\r\n".encode()
    chunked = (f"POST /models/preload HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode() + size_line + b"x" * (MAX_BODY + 1 - len(size_line))
    code, kind, _ = exchange(server.port, chunked)
    assert code == 413 and kind == "application/json"


HEADER_START = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "


@pytest.mark.parametrize("raw,code", [
    (b"GARBAGE\r\n\r\n", 400),
    (HEADER_START + b"a" * (MAX_HEADER_BYTES - len(HEADER_START)), 431),  # nothing left unread: no reset
    (b"POST /models/preload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /models/preload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 400),
], ids=["bad-request-line", "huge-header", "gzip-transfer-encoding", "bad-content-length"])
def test_errors_the_http_server_writes_itself_are_json(server, raw, code):
    answered, kind, body = exchange(server.port, raw)
    assert answered == code and kind == "application/json"
    document = json.loads(body)
    assert document["status"] == code and document["error"]


def test_cross_site_and_rebound_requests_are_refused(server):
    before = server.status()["generation"]
    csrf = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    assert send(server.port, "POST", "/models/preload", b'{"refresh": true}', csrf)[0] == 403
    assert send(server.port, "POST", "/models/preload", b'{"refresh": true}', {"Content-Type": "text/plain"})[0] == 415
    rebound, payload, _ = send(server.port, "GET", "/models/status", b"", {"Host": f"evil.example:{server.port}"})
    assert rebound == 421 and b"evil.example" in payload
    assert server.status()["generation"] == before


class Trickler:
    """Connections that each send a request one byte at a time and never finish it; one the server
    closes is opened again at once, as a persistent attacker would."""

    def __init__(self, port: int, count: int):
        self.port, self.count = port, count
        self.sockets = [self.open() for _ in range(count)]
        self.reopened = self.passes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.trickle, daemon=True)
        self.thread.start()

    def open(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nX-Slow: ".encode())
        return sock

    def trickle(self):
        while not self.stop.wait(0.5):
            for index, sock in enumerate(self.sockets):
                try:
                    sock.sendall(b"a")
                except OSError:
                    sock.close()
                    try:
                        self.sockets[index] = self.open()
                        self.reopened += 1
                    except OSError:
                        pass
            self.passes += 1

    def close(self):
        self.stop.set()
        self.thread.join(30)
        for sock in self.sockets:
            sock.close()


def test_trickling_connections_do_not_lock_out_health_and_gate(server, tmp_path, record):
    import subprocess
    import sys
    trickler = Trickler(server.port, 600)
    try:
        # Measured under churn: the server has closed some and the attacker has opened them again.
        wait_for(lambda: trickler.passes >= 3 and trickler.reopened, what="the trickler to reopen closed connections")
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)  # the bound
        conn.request("GET", "/health")
        health = conn.getresponse()
        assert health.status == 200 and json.loads(health.read())["status"] == "ok"
        conn.close()
        health_s = time.monotonic() - started
        started = time.monotonic()
        gate = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "gate", "alpha",
                               "--url", server.url, "--timeout", "5"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
        gate_s = time.monotonic() - started
        assert gate.returncode == 0, gate.stderr
    finally:
        trickler.close()
    record("trickling connections (slow loris)", trickling_connections=trickler.count,
           reopened_after_the_server_closed_them=trickler.reopened, health_answered_s=round(health_s, 2),
           gate_process_s=round(gate_s, 2))


def test_a_request_still_trickling_after_the_deadline_is_closed(server, record):
    """waitress's channel_timeout never fires while bytes keep coming; the request deadline does."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Slow: ".encode())
    sock.settimeout(0.5)
    started = time.monotonic()

    def closed_by_server() -> bool:
        try:
            sock.sendall(b"a")
            return sock.recv(1024) == b""
        except socket.timeout:
            return False
        except OSError:
            return True

    try:
        wait_for(closed_by_server, timeout=30, interval=0, what="the server to close a request trickling for ever")
    finally:
        sock.close()
    record("a request trickling past its deadline", deadline_s=REQUEST_DEADLINE,
           closed_after_s=round(time.monotonic() - started, 1))
