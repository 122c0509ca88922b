"""Whatever a client sends, the API answers 2xx/4xx in JSON and only a valid preload changes state;
slow and abandoned connections do not starve anyone."""

import http.client
import json
import socket
import time
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import SOAK, Orchestrator, write_config, write_figures

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
    if method != "HEAD":
        if path == "/metrics" and method == "GET" and code == 200:
            assert kind.startswith("text/plain")
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
