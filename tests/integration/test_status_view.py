"""`gpu-orchestrator status` against a host mid-warm-up: width, progress, colour, the client view."""

import json
import os
import pty
import subprocess
import sys

import pytest
from warming_host import LONG_CLIENT, MISSING, WarmingHost, serving


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with serving(WarmingHost(tmp_path_factory.mktemp("warming"))) as served:
        yield served


def status(url, *args, columns="80", **env):
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"COLUMNS": columns, **env}
    return subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "status", "--url", url, *args],
                          capture_output=True, text=True, timeout=60, env=environment)


def test_fits_80_columns_with_progress_per_client_and_per_model(url):
    shown = status(url, "-v")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(map(len, lines)) == 80 and "\033[" not in shown.stdout  # cut, not wrapped; no colour in a pipe
    assert any(line.startswith("fact-checker-with…  RUNNING") for line in lines)
    assert "  warm-up: 41% 5.32 GB of 12.9 GB, 366 MB/s, ETA 21 s" in lines
    (model,) = [line for line in lines if "mistralai/Mistral-7B-Instruct-v0.3" in line]
    assert "loading  41% 5.30 GB of 12.9 GB, 366 MB" in model
    assert "6963 MiB!" in shown.stdout and "OVER LIMIT (GPU MEM marked !)" in shown.stdout
    wide = status(url, columns="300").stdout
    assert LONG_CLIENT in wide and MISSING in wide and "mistralai" not in wide  # per model only with -v


def test_a_terminal_gets_coloured_states_unless_no_color(url):
    def on_a_terminal(**env):
        leader, follower = pty.openpty()
        with subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "status", "--url", url],
                              stdout=follower, stderr=subprocess.PIPE,
                              env={k: v for k, v in os.environ.items() if k != "NO_COLOR"} | env) as proc:
            os.close(follower)
            output = b""
            while chunk := read_or_eof(leader):
                output += chunk
            assert proc.wait(60) == 0, proc.stderr.read()
        os.close(leader)
        return output.decode()

    assert "\033[32mRUNNING" in on_a_terminal() and "\033[33mWARMING UP\033[0m" in on_a_terminal()
    assert "\033[" not in on_a_terminal(NO_COLOR="1")


def read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the terminal's other side closed
        return b""


def test_client_view_shows_errors_in_full_and_refuses_an_unknown_client(url):
    shown = status(url, "synthesizer")
    assert shown.returncode == 0, shown.stderr
    assert max(map(len, shown.stdout.splitlines())) <= 80
    assert "OVER LIMIT on GPU 0" in shown.stdout and "Client synthesizer: loader RUNNING, pid 4102" in shown.stdout
    errors = shown.stdout.split("Errors:\n")[1]
    assert " ".join(errors.split()) == "org/reranker-large: " + MISSING
    as_json = json.loads(status(url, "analyst", "--json").stdout)
    assert as_json["models_status"]["progress"]["eta_s"] == 20.8 and as_json["gpu_info"]["gpus"] == {"0": 9 * 1024**3}
    unknown = status(url, "nobody")
    assert unknown.returncode == 67 and "no client 'nobody'" in unknown.stderr and unknown.stdout == ""


def test_the_warming_host_answers_ready_as_a_source_must(url):
    """The host stands in for the orchestrator's Answers: /ready (from models_summary) says not
    yet, mid-warm-up, rather than failing on a method the host lacks."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(url + "/ready", timeout=10)
    assert answer.value.code == 503 and json.loads(answer.value.read())["ready"] is False
