"""The command line's own checks: where it warns, what URLs and durations it accepts."""

import pytest

from gpu_orchestrator.http.app import base_url, url_host
from gpu_orchestrator.supervisor.commands.api import UsageError, check_url, seconds
from gpu_orchestrator.supervisor.daemon import exposure_warnings


def test_a_network_bind_without_a_token_is_warned_about():
    assert exposure_warnings("127.0.0.1", None) == () and exposure_warnings("::1", None) == ()
    assert exposure_warnings("0.0.0.0", "s3cret") == ()
    [warning] = exposure_warnings("0.0.0.0", None)
    assert "LISTENING ON 0.0.0.0, NOT LOOPBACK, WITHOUT GPU_ORCHESTRATOR_TOKEN" in warning
    assert exposure_warnings("10.1.2.3", None)


def test_ipv6_addresses_get_their_brackets():
    assert base_url("::1", 8014) == "http://[::1]:8014"
    assert base_url("[::1]", "8014") == "http://[::1]:8014"
    assert base_url("127.0.0.1", 8014) == "http://127.0.0.1:8014"
    assert url_host("::1") == "[::1]" and url_host("localhost") == "localhost"  # demo's curl lines use it


@pytest.mark.parametrize("url", ["127.0.0.1:8014", "http://127.0.0.1:99999", "http://[::1:8014", "https://x:1",
                                 "http://:8014", "http://127.0.0.1:0", "http://h:1/?q", "http://a..b:8014",
                                 "http://" + "a" * 70 + ":8014"])
def test_unusable_urls_are_named(url):
    with pytest.raises(UsageError, match="--url"):
        check_url(url)


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "0", "abc", "", "1e12"])
def test_durations_must_be_positive_and_finite(text):
    expected = f"--timeout: expected a positive number of seconds up to 604800, got {text!r}$"
    with pytest.raises(UsageError, match=expected):
        seconds(text, "--timeout")
    assert seconds("2.5", "--timeout") == 2.5


BLOCKED_AFTER_IMPORT = """
import signal, sys
sys.argv = ["gpu-orchestrator", sys.argv[1]]
import gpu_orchestrator.supervisor.commands.cli
print(sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
"""


@pytest.mark.parametrize("command, held", [("serve", ["SIGHUP", "SIGINT", "SIGTERM"]), ("demo", ["SIGHUP", "SIGINT", "SIGTERM"]),
                                           ("status", [])])
def test_serve_holds_its_signals_from_its_first_imports(command, held):
    """A SIGHUP while falcon and the rest import (half a second) ended the service silently: for
    serve and demo they wait blocked from the command line's first lines until the loop queues them."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", BLOCKED_AFTER_IMPORT, command], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == repr(held)


def test_a_failed_bind_says_what_to_do_about_its_own_cause():
    """--host nonexistent.invalid was told another orchestrator may be running."""
    import errno
    import socket

    from gpu_orchestrator.supervisor.daemon import listen_hint
    assert "does not resolve here" in listen_hint(socket.gaierror(-2, "Name or service not known"), "--host", "--port")
    try:  # as the supervisor meets it: create_server re-raises the gaierror as a plain OSError
        socket.create_server(("nonexistent.invalid", 0)).close()
    except OSError as exc:
        assert "does not resolve here" in listen_hint(exc, "--host", "--port")
    assert "no such address" in listen_hint(OSError(errno.EADDRNOTAVAIL, "x"), "--host", "--port")
    assert "CAP_NET_BIND_SERVICE" in listen_hint(OSError(errno.EACCES, "x"), "--host", "--port")
    assert "another orchestrator" in listen_hint(OSError(errno.EADDRINUSE, "x"), "--host", "--port")
