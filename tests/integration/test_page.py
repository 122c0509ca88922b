"""The web page at `/` in a real headless Chromium: what it shows, its button, and an outage."""

import dataclasses
import os
import shutil
from pathlib import Path

import msgspec
from browser import Browser
from nvml_hosts import env as nvml_env
from support import Orchestrator, add_model, wait_for, write_config
from warming_host import LONG_CLIENT, MISSING, PIDS, WarmingHost, serving

from gpu_orchestrator.supervisor.nvml import GpuProcess, GpuSample

TEXT = "document.body ? document.body.innerText : ''"  # empty while the page is still loading


def wait_for_text(browser: Browser, *words: str, what: str) -> str:
    """The page's text once it holds every word; on timeout the failure shows what it held."""
    try:
        wait_for(lambda: all(word in browser.evaluate(TEXT) for word in words), what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe page said:\n{browser.evaluate(TEXT)}") from None
    return browser.evaluate(TEXT)


def test_page_shows_every_client_and_a_failed_models_error_and_refreshes(tmp_path):
    store = tmp_path / "store"
    for model in ("org/a1", "org/b1"):
        add_model(store, model)
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1", "org/missing"],
                                                    "gamma": ["org/a1"]}, {"alpha": {"mps_memory_limit_gb": 1.0}})
    orch = Orchestrator(tmp_path, store, model_map, allocation, env=nvml_env(tmp_path))
    with orch, Browser(tmp_path) as browser:
        settled = orch.wait_settled()
        (failure,) = settled["errors"]
        browser.open(orch.url + "/")
        text = wait_for_text(browser, "NOT READY", "alpha", "beta", "gamma", failure["error"],
                             what="the page to show every client and the failed model's error in full")
        rows = browser.evaluate("[...document.querySelectorAll('#clients tr')].map(r => r.dataset.client)")
        assert rows == ["alpha", "beta", "gamma"]
        assert "NVIDIA H100 80GB HBM3" in text  # the fake NVML's GPU

        # The button's POST passes the API's own guards (JSON content type, same origin).
        browser.evaluate("document.getElementById('refresh').click()")
        wait_for_text(browser, "Warm-up started", what="the refresh to be accepted")
        assert orch.status()["generation"] == settled["generation"] + 1

        orch.stop()
        wait_for_text(browser, "NOT ANSWERING", "The orchestrator is not answering",
                      what="the page to say the orchestrator stopped answering")


def test_page_shows_warm_up_progress_gpu_shares_and_overcommit(tmp_path):
    """Also writes the README's screenshot (PAGE_SCREENSHOT=docs/page.png to replace it)."""
    host = WarmingHost(tmp_path)
    with serving(host) as url, Browser(tmp_path) as browser:
        browser.open(url + "/")
        text = wait_for_text(browser, "WARMING UP", LONG_CLIENT, MISSING, what="the page to render")
        assert "5.30 GB / 12.9 GB · 366 MB/s · ETA 21 s" in text  # the model being read
        assert "OVER LIMIT on GPU 0" in text and "OVER-COMMITTED by 2.5 GB" in text
        assert "utilisation 71 %" in text and "temperature 63 °C" in text and "power 58 / 72 W" in text
        limits = browser.evaluate("document.querySelectorAll('.gpu .limit').length")
        assert limits == 3  # each client's MPS limit marked on its share of the GPU
        assert browser.evaluate("document.getElementById('token').hidden") is True  # no token configured
        screenshot = tmp_path / "page.png"
        browser.screenshot(screenshot)
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if os.environ.get("PAGE_SCREENSHOT"):
        shutil.copyfile(screenshot, Path(os.environ["PAGE_SCREENSHOT"]))


def test_page_shows_memory_nvml_cannot_report_as_unknown_never_zero(tmp_path):
    """A GPU whose memory NVML does not report showed "0.0 / 0.0 GiB"; a client whose process has no
    memory figure (as under MPS) showed 0. Both are unknown: "-", and the client's over-limit state too."""
    host = WarmingHost(tmp_path)
    loader = GpuProcess(PIDS["analyst"], None, "analyst", "loader")
    host.telemetry = msgspec.structs.replace(
        host.telemetry, gpus=[GpuSample(0, name="NVIDIA L4", unsupported=["memory: Not Supported"], processes=[loader])],
        clients={"analyst": None}, client_gpus={"analyst": {0: None}}, over_limit={}, over_limit_unknown={"analyst": [0]})
    host.views = [dataclasses.replace(v, gpu_memory_bytes=host.telemetry.clients.get(v.client, 0)) for v in host.views]
    with serving(host) as url, Browser(tmp_path) as browser:
        browser.open(url + "/")
        text = wait_for_text(browser, "WARMING UP", "NVIDIA L4", what="the page to render")
        assert "memory - / - GiB" in text and "0.0 / 0.0 GiB" not in text
        analyst = browser.evaluate("document.querySelector('#clients tr[data-client=\"analyst\"]').innerText")
        assert "- / limit 16384 MiB" in analyst and "over limit: unknown" in analyst and "0 MiB" not in analyst
        assert "unknown of 16384 MiB" in text  # its share of the GPU
