"""The waitress event loop: select() while every descriptor fits FD_SETSIZE, poll() past it."""

import fcntl
import resource
import socket
import threading
import types
import urllib.request

import pytest
from waitress import wasyncore

from gpu_orchestrator.http import server
from gpu_orchestrator.http.app import create_app


class Source:
    def health(self):
        return {"status": "ok"}


def serve_once(sock: socket.socket) -> list[str]:
    """Serve GET /health on `sock` from a loop thread, stopped from within the loop; the waits it used."""
    used, stop = [], threading.Event()

    def waited(name, wait):
        def wrapper(*args):
            if stop.is_set():
                raise SystemExit  # run() ends as waitress's does on SystemExit
            used.append(name)
            return wait(*args)
        return wrapper

    http = server.create_server(create_app(Source()), sock, 2)
    http.asyncore = types.SimpleNamespace(poll=waited("select", wasyncore.poll), poll2=waited("poll", wasyncore.poll2))
    loop = threading.Thread(target=http.run, daemon=True)
    loop.start()
    try:
        port = sock.getsockname()[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert answer.status == 200
    finally:
        stop.set()
        http.pull_trigger()
        loop.join(timeout=30)
        wasyncore.close_all(http._map)
    assert not loop.is_alive()
    return used


def test_descriptors_below_fd_setsize_are_waited_on_with_select():
    assert set(serve_once(server.listen("127.0.0.1", 0))) == {"select"}


def test_a_descriptor_past_fd_setsize_is_waited_on_with_poll():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = server.SELECT_FD_LIMIT + 64
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"this process may not open descriptor {wanted} (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        listening = server.listen("127.0.0.1", 0)
        high = fcntl.fcntl(listening.fileno(), fcntl.F_DUPFD, server.SELECT_FD_LIMIT)
        listening.close()
        used = serve_once(socket.socket(fileno=high))
        assert "poll" in used and "select" not in used
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_glibc_takes_the_heap_settings_for_large_answers():
    """mallopt answers 0 to a parameter it does not know: 1 from both means glibc took them
    (the bench shows their effect: page faults a request)."""
    import platform

    took = server.keep_heap_for_answers()
    assert took is (platform.libc_ver()[0] == "glibc")


def test_the_daemon_asks_for_the_heap_settings_before_it_listens(tmp_path, monkeypatch):
    """serve() sets them first, whatever follows: here a taken port stops it before anything runs."""
    from gpu_orchestrator.supervisor import daemon
    from gpu_orchestrator.supervisor.config import Config

    asked = []
    monkeypatch.setattr(server, "keep_heap_for_answers", lambda: asked.append(1) or True)
    with server.listen("127.0.0.1", 0) as taken:
        config = Config(model_store_root=str(tmp_path), model_map_path="m", allocation_path="",
                        clients={"a": ["org/a1"]}, host="127.0.0.1", port=taken.getsockname()[1])
        assert daemon.serve(config) != 0
    assert asked == [1]
