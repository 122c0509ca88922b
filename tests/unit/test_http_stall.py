"""Clients that pipeline requests and never read the answers do not hold the worker threads.

waitress answers a connection's pipelined requests in turn on one thread, which waits with no
timeout while more than outbuf_high_watermark (16 MiB, waitress's default, which we keep) of them
sits unsent: GuardedServer.free_stalled closes such a connection once its client has taken nothing
for STALL_S. These tests run waitress as the daemon configures it and cover what free_stalled
relies on: the wait's condition (the hostile clients would keep the threads), handle_close waking
the thread (likewise), and last_activity moving with each byte sent (the reading client would be cut).
"""

import socket
import threading
import time
import types
import urllib.request

import pytest
from support import wait_for
from waitress import wasyncore

from gpu_orchestrator.http import server

STALL_S = 1.0  # lowered from server.STALL_S to keep the tests short
MIB = 1024 * 1024
ANSWER = b"x" * MIB
PIPELINED = 32  # 32 MiB of answers per connection: past the watermark plus what the kernel buffers
THREADS = 2
HOSTILE = THREADS + 1


def app(environ, start_response):
    body = ANSWER if environ["PATH_INFO"] == "/big" else b'{"status": "ok"}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture
def http(monkeypatch):
    monkeypatch.setattr(server, "STALL_S", STALL_S)
    stop = threading.Event()

    def stoppable(wait):
        def wrapper(*args):
            if stop.is_set():
                raise SystemExit  # run() ends as waitress's does on SystemExit
            return wait(*args)
        return wrapper

    http = server.create_server(app, server.listen("127.0.0.1", 0), THREADS)
    http.asyncore = types.SimpleNamespace(poll=stoppable(wasyncore.poll), poll2=stoppable(wasyncore.poll2))
    http.port = http.socket.getsockname()[1]
    loop = threading.Thread(target=http.run, daemon=True)
    loop.start()
    try:
        yield http
    finally:
        stop.set()
        http.pull_trigger()
        loop.join(timeout=30)
        for channel in list(http.active_channels.values()):
            channel.handle_close()  # wakes a thread still waiting on one (the tests failing)
        wasyncore.close_all(http._map)


def non_reading(port: int, requests: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
    return sock


def health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def threads_waiting(http) -> int:
    """Connections a worker thread waits on (waitress's own condition for that wait)."""
    return sum(1 for c in list(http.active_channels.values())
               if c.requests and c.total_outbufs_len > c.adj.outbuf_high_watermark)


def closed_by_server(sock: socket.socket) -> bool:
    """Read what the kernel still holds for it; True once the server's end is closed."""
    sock.settimeout(0.2)
    try:
        while sock.recv(MIB):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_clients_that_pipeline_and_never_read_do_not_hold_the_threads(http):
    hostile = [non_reading(http.port, PIPELINED) for _ in range(HOSTILE)]
    try:
        # Every thread waits on a hostile connection (as long as STALL_S at least), one more is queued.
        wait_for(lambda: threads_waiting(http) == THREADS, timeout=30, interval=0.02,
                 what="every worker thread to wait on a client that reads nothing")
        wait_for(lambda: health(http.port), timeout=30, what="/health to answer on a fresh connection")
        # Reading would let the answers out, so first from the server's side: none of them is left.
        wait_for(lambda: not http.active_channels, timeout=30,
                 what="the server to close the connections that never read their answers")
        for sock in hostile:  # what the kernel still held for each, then the end
            wait_for(lambda: closed_by_server(sock), timeout=30, interval=0, what="the connection's end")
    finally:
        for sock in hostile:
            sock.close()


def read_answer(reader) -> bytes:
    """One HTTP answer's body from a socket's makefile("rb"); b"" if the server closed first."""
    length = None
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return reader.read(length) if line and length is not None else b""


def test_a_slow_reader_of_one_large_answer_is_not_cut(http):
    """No thread waits for one answer under the watermark, so a reader may pause past STALL_S."""
    sock = non_reading(http.port, 1)
    try:
        time.sleep(3 * STALL_S)
        sock.settimeout(10)
        reader = sock.makefile("rb")
        assert read_answer(reader) == ANSWER
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is still open
        assert b"ok" in read_answer(reader)
    finally:
        sock.close()


def test_a_pipelining_client_that_keeps_reading_is_not_cut(http):
    """A thread waits on it for several STALL_S, but each answer read lets bytes out: no stall."""
    sock = non_reading(http.port, PIPELINED)
    try:
        wait_for(lambda: threads_waiting(http) == 1, timeout=30, interval=0.02,
                 what="a worker thread to wait on the client")
        sock.settimeout(10)
        reader = sock.makefile("rb")
        started, answers = time.monotonic(), 0
        while threads_waiting(http):
            assert read_answer(reader) == ANSWER
            answers += 1
            time.sleep(STALL_S / 4)
        assert time.monotonic() - started > STALL_S  # the rule was in play while it read
        for _ in range(answers, PIPELINED):
            assert read_answer(reader) == ANSWER
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is still open
        assert b"ok" in read_answer(reader)
    finally:
        sock.close()
