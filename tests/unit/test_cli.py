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
