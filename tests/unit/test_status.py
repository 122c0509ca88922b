"""How loader records and slots become /models/status (only live loaders' words count), and how the
allocation file becomes /mps/allocation."""

import json
from pathlib import Path

import msgspec
import pytest

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.wire import (
    FAILED,
    IDLE,
    LOADING,
    PENDING,
    READY,
    WARMING_UP,
    LoaderState,
    ModelProgress,
)
from gpu_orchestrator.supervisor.status import ClientView, models_status
from gpu_orchestrator.supervisor.warmup import Warmup


def view(client="a", state=states.RUNNING, published=None, models=("m1", "m2"), fatal=None):
    return ClientView(client=client, models=list(models), state=state, pid=10, restarts=0, last_exit=None,
                      fatal_reason=fatal, memory_limit_bytes=None, published=published)


def published(generation, phase, *statuses):
    models = [ModelProgress(f"m{i + 1}", status=s, error="bad" if s == FAILED else None)
              for i, s in enumerate(statuses)]
    return LoaderState("a", 10, generation, phase, 0.0, models)


def test_nothing_published_means_pending_and_in_progress():
    result = models_status([view()], Warmup(generation=1))
    assert result["in_progress"] and not result["all_ready"]
    assert result["summary"] == {"total": 2, "done": 0, "failed": 0, "loading": 0, "pending": 2}


def test_all_ready_needs_the_current_generation_finished():
    ready = published(1, IDLE, READY, READY)
    assert models_status([view(published=ready)], Warmup(generation=1))["all_ready"]
    # Same models ready from an older generation while a refresh is pending: not settled.
    stale = models_status([view(published=ready)], Warmup(generation=2))
    assert stale["in_progress"] and not stale["all_ready"]
    # ...and what the loader said of the older one counts for nothing in this one: a summary of
    # 2/2 done beside all_ready false, or a model "ready" in a client not ready, reads as a lie.
    assert stale["summary"] == {"total": 2, "done": 0, "failed": 0, "loading": 0, "pending": 2}
    assert [m["status"] for m in stale["clients"]["a"]["models"]] == [PENDING, PENDING]
    working = models_status([view(published=published(1, WARMING_UP, READY, "loading"))], Warmup(generation=1))
    assert working["in_progress"] and working["summary"]["loading"] == 1


def test_failures_are_listed_with_agent_model_and_error():
    result = models_status([view(published=published(1, IDLE, READY, FAILED))], Warmup(generation=1))
    assert not result["in_progress"] and not result["all_ready"]
    assert result["errors"] == [{"agent": "a", "model": "m2", "error": "bad"}]
    assert result["summary"]["failed"] == 1


def test_fatal_loader_fails_all_its_models_with_the_reason():
    result = models_status([view(state=states.FATAL, fatal="cannot boot: no store")], Warmup(generation=1))
    assert not result["in_progress"]
    assert [e["model"] for e in result["errors"]] == ["m1", "m2"]
    assert "cannot boot: no store" in result["errors"][0]["error"]


def test_no_warmup_requested_is_never_all_ready():
    result = models_status([view(published=published(0, IDLE, "pending", "pending"))], Warmup())
    assert not result["in_progress"] and not result["all_ready"]


def test_empty_model_map_is_ready_after_a_warmup():
    assert models_status([], Warmup(generation=1))["all_ready"]


def test_booting_loaders_are_not_a_warmup_in_progress():
    # Before any warm-up was asked for, a loader that has not published yet must not
    # make a preload request look like "already under way" (it would start nothing).
    result = models_status([view(published=None)], Warmup())
    assert not result["in_progress"] and not result["clients"]["a"]["ready"]


def test_mps_off_has_the_same_keys_as_a_running_daemon_report(tmp_path):
    from gpu_orchestrator.supervisor.config import Config
    from gpu_orchestrator.supervisor.mps import MpsDaemon
    from gpu_orchestrator.supervisor.mps_control import MpsSettings
    from gpu_orchestrator.supervisor.status import mps_disabled
    config = Config(model_store_root=str(tmp_path), model_map_path="m", allocation_path="", clients={})
    daemon = MpsDaemon(MpsSettings(str(tmp_path / "pipe"), str(tmp_path / "log")))
    assert set(mps_disabled(config)) == set(daemon.report())


def allocation_config(**allocations):
    from gpu_orchestrator.supervisor.config import AgentAllocation, Config
    return Config(model_store_root="/s", model_map_path="m", allocation_path="a",
                  clients={name: [] for name in allocations}, allocations={
                      name: AgentAllocation(mps_memory_limit_gb=gb, devices=devices)
                      for name, (gb, devices) in allocations.items()})


def test_overcommit_is_judged_per_gpu_not_on_the_total():
    from gpu_orchestrator.supervisor.status import GiB, allocation_summary, overcommit_warnings
    # 120 GB of limits on 160 GB of GPUs looks fine in total, but a, b and c all land on GPU 0.
    config = allocation_config(a=(50.0, [0]), b=(50.0, [0]), c=(20.0, None))
    summary = allocation_summary(config, {0: 80 * GiB, 1: 80 * GiB})
    assert summary["overcommitted"] is True and summary["overcommit_gb"] == 40.0
    assert summary["gpu_memory_total_gb"] == 160.0 and summary["gpu_memory_total_source"] == "nvml"
    gpu0, gpu1 = summary["per_gpu"]
    assert gpu0 == {"index": 0, "memory_gb": 80.0, "available_gb": 80.0, "mps_memory_limit_gb": 120.0,
                    "clients": ["a", "b", "c"], "overcommitted": True, "overcommit_gb": 40.0}
    assert gpu1["clients"] == ["c"] and gpu1["overcommitted"] is False
    assert summary["devices_not_present"] == {}
    assert [w["gpu"] for w in overcommit_warnings(summary)] == [0]


def test_with_nvml_the_mps_overhead_is_taken_off_each_gpu():
    from gpu_orchestrator.supervisor.config import GpuMemory
    from gpu_orchestrator.supervisor.status import GiB, allocation_summary, overcommit_warnings
    config = allocation_config(a=(23.8, None))
    assert allocation_summary(config, {0: 24 * GiB})["overcommitted"] is False
    config.gpu_memory = GpuMemory(23.5, "available_memory_gb", overhead_gb=0.5)
    summary = allocation_summary(config, {0: 24 * GiB})
    assert summary["per_gpu"][0]["available_gb"] == summary["gpu_memory_total_gb"] == 23.5
    assert summary["overcommit_gb"] == 0.3
    assert overcommit_warnings(summary)[0]["gpu_gb"] == 23.5


def test_pinning_spreads_limits_and_missing_devices_are_named():
    from gpu_orchestrator.supervisor.status import GiB, allocation_summary, overcommit_warnings
    config = allocation_config(a=(60.0, [0]), b=(60.0, [1]), c=(10.0, [1, 3]))
    summary = allocation_summary(config, {0: 80 * GiB, 1: 80 * GiB})
    assert summary["overcommitted"] is False and overcommit_warnings(summary) == []
    assert [g["mps_memory_limit_gb"] for g in summary["per_gpu"]] == [60.0, 70.0]
    assert summary["devices_not_present"] == {"c": [3]}


def test_without_nvml_nor_a_declared_memory_nothing_is_judged():
    from gpu_orchestrator.supervisor.status import allocation_summary, overcommit_warnings
    summary = allocation_summary(allocation_config(a=(1.0, None), b=(0.75, [0])))
    assert summary["overcommitted"] is None and summary["gpu_memory_total_source"] is None
    assert "per_gpu" not in summary and overcommit_warnings(summary) == []


FIELD_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "mps_allocation_config.field.json"
FIELD_KEYS = ["total_agents", "total_allocated_memory_gb", "total_calculated_memory_gb", "total_safety_margin_gb",
              "average_allocation_gb", "max_allocation_gb", "min_allocation_gb", "memory_efficiency_percent"]
OUR_KEYS = ["agents_without_allocation", "overcommitted", "overcommit_gb", "gpu_memory_total_gb",
            "gpu_memory_total_source"]


def field_config(tmp_path, document=None):
    from gpu_orchestrator.supervisor.config import load_config
    document = document or json.loads(FIELD_FILE.read_text())
    clients = {name: [] for name in document["mps_resource_allocation"]["agent_allocations"]}
    (tmp_path / "map.json").write_text(json.dumps({**clients, "extra": []}))
    (tmp_path / "alloc.json").write_text(json.dumps(document))
    return load_config({"MODEL_STORE_ROOT": str(tmp_path), "AGENT_MODEL_MAP": str(tmp_path / "map.json"),
                        "MPS_ALLOCATION_CONFIG": str(tmp_path / "alloc.json")})


def test_the_fields_file_comes_back_key_for_key_with_the_summary_recomputed(tmp_path):
    from gpu_orchestrator.supervisor.status import mps_allocation
    given = json.loads(FIELD_FILE.read_text())
    given["an_unknown_top_key"] = {"kept": True}
    given["mps_resource_allocation"]["agent_allocations"]["scout"]["gpu_device"] = "cuda:0"
    answer = mps_allocation(field_config(tmp_path, given))
    section, stored = answer["mps_resource_allocation"], given["mps_resource_allocation"]
    assert list(section) == list(stored) and answer["an_unknown_top_key"] == {"kept": True}
    assert {k: v for k, v in section.items() if k != "system_summary"} == \
        {k: v for k, v in stored.items() if k != "system_summary"}
    summary = section["system_summary"]
    assert list(summary) == FIELD_KEYS + OUR_KEYS
    # The stored summary says 17.3 GB calculated; the agents sum to 18.0: recomputed, never copied.
    assert {k: summary[k] for k in FIELD_KEYS} == {
        "total_agents": 9, "total_allocated_memory_gb": 24.3, "total_calculated_memory_gb": 18.0,
        "total_safety_margin_gb": 6.3, "average_allocation_gb": 2.7, "max_allocation_gb": 3.5,
        "min_allocation_gb": 2.3, "memory_efficiency_percent": 74.1}
    assert summary["agents_without_allocation"] == ["extra"]


def test_the_fields_24_3_gb_on_23_5_available_is_overcommitted_with_a_warning(tmp_path):
    from gpu_orchestrator.supervisor.status import allocation_summary, gpu_info, overcommit_warnings
    config = field_config(tmp_path)
    summary = allocation_summary(config)
    assert summary["overcommitted"] is True and summary["overcommit_gb"] == 0.8
    assert (summary["gpu_memory_total_gb"], summary["gpu_memory_total_source"]) == (23.5, "available_memory_gb")
    assert overcommit_warnings(summary) == [{"gpu": "all", "limits_gb": 24.3, "gpu_gb": 23.5, "over_gb": 0.8,
                                             "source": "available_memory_gb"}]
    assert gpu_info(config, None, None)["mps"]["allocation_overcommitted"] is True


def test_gpu_info_mps_fields_have_the_answers_types_and_null_for_unknown(tmp_path):
    """probed_at an ISO time like sampled_at, the percentage a number, and no allocation file:
    nothing to judge (null, as /mps/allocation says), not 'not over-committed'."""
    from gpu_orchestrator.supervisor.config import Config
    from gpu_orchestrator.supervisor.status import allocation_summary, gpu_info, mps_disabled
    config = Config(model_store_root=str(tmp_path), model_map_path="m", allocation_path="", clients={"a": []})
    report = {**mps_disabled(config), "probed_at": 1795871623.01, "default_active_thread_percentage": "100.0"}
    mps = gpu_info(config, report, None)["mps"]
    assert mps["probed_at"] == "2026-11-28T13:13:43.010+00:00" and mps["default_active_thread_percentage"] == 100.0
    assert mps["allocation_overcommitted"] is None
    assert allocation_summary(config)["total_allocated_memory_gb"] == 0.0
    assert isinstance(allocation_summary(config)["total_allocated_memory_gb"], float)


@pytest.mark.parametrize("given,measure,source", [
    ({"available_memory_gb": 23.5, "total_gpu_memory_gb": 24.0, "mps_overhead_gb": 0.5}, 23.5, "available_memory_gb"),
    ({"total_gpu_memory_gb": 24.0, "mps_overhead_gb": 0.5}, 23.5, "total_gpu_memory_gb - mps_overhead_gb"),
    ({"total_gpu_memory_gb": 24.0}, 24.0, "total_gpu_memory_gb"),
    ({"total_gpu_memory_gb": 24.0, "mps_configuration": {"total_gpu_memory_gb": 80}}, 24.0, "total_gpu_memory_gb"),
    ({"mps_configuration": {"total_gpu_memory_gb": 24}}, 24, "mps_configuration.total_gpu_memory_gb"),
    ({"mps_overhead_gb": 1, "mps_configuration": {"total_gpu_memory_gb": 24}}, 23.0,
     "mps_configuration.total_gpu_memory_gb - mps_overhead_gb"),
])
def test_without_nvml_the_measure_is_available_else_total_less_overhead_else_total(tmp_path, given, measure, source):
    from gpu_orchestrator.supervisor.status import allocation_summary
    document = {"mps_resource_allocation": {"agent_allocations": {"a": {"mps_memory_limit_gb": 23.6}}, **given}}
    summary = allocation_summary(field_config(tmp_path, document))
    assert (summary["gpu_memory_total_gb"], summary["gpu_memory_total_source"]) == (measure, source)
    assert summary["overcommitted"] is (23.6 > measure)


def test_progress_has_the_rate_and_eta_of_the_model_being_read():
    models = [ModelProgress("org/done", READY, bytes_done=100, bytes_total=100, seconds=1.0),
              ModelProgress("org/reading", LOADING, bytes_done=400, bytes_total=1000, seconds=2.0),
              ModelProgress("org/next", PENDING, bytes_total=500)]
    view = ClientView("a", [m.model for m in models], states.RUNNING, 7, 0, None, None, None,
                             LoaderState("a", 7, 1, WARMING_UP, 0.0, models))
    client = models_status([view], Warmup(generation=1), now=1.0)["clients"]["a"]
    reading = client["models"][1]
    assert (reading["rate_bytes_per_s"], reading["eta_s"]) == (200.0, 3.0)
    assert client["models"][0]["eta_s"] is None and client["models"][2]["rate_bytes_per_s"] is None
    assert client["progress"] == {"bytes": 500, "bytes_total": 1600, "rate_bytes_per_s": 200.0, "eta_s": 5.5}


def test_the_json_is_the_dict_encoded_byte_for_byte():
    """The JSON is spliced from each client's cached part and its heartbeat age: it must be what
    encoding the whole dict would give, for every kind of client."""
    import msgspec

    from gpu_orchestrator.supervisor.status import Frame, client_part

    loading = ModelProgress("m2", status=LOADING, bytes_done=3, bytes_total=10, seconds=0.7)
    views = [view("ready", published=LoaderState("ready", 10, 1, IDLE, 12.25, [ModelProgress("m1", status=READY)]),
                  models=("m1",)),
             view("läuft \"x\"", published=LoaderState("l", 10, 1, WARMING_UP, 99.0001, [ModelProgress("m1"), loading])),
             view("fatal", state=states.FATAL, fatal="cannot boot: no store"),
             view("failed", published=published(1, IDLE, READY, FAILED)),
             view("unstarted", state=states.STOPPED)]
    warmup = Warmup(generation=1, refresh=True, started_at=1.5)
    frame = Frame(tuple(client_part(v, 1) for v in views), warmup, {"mps": {"enabled": False, "error": "off"}})
    heartbeats = [v.published.heartbeat if v.published else None for v in views]
    current, encoded = frame.current(heartbeats, 100.0), frame.json(heartbeats, 100.0)
    assert encoded == msgspec.json.encode(current)
    assert current == {**models_status(views, warmup, now=100.0), "mps": {"enabled": False, "error": "off"}}
    assert current["clients"]["ready"]["heartbeat_age_s"] == 87.75
    assert list(current["clients"]["fatal"]).index("heartbeat_age_s") == 10  # in its place, after rss_bytes
    empty = Frame((), Warmup())
    assert empty.json([], 0.0) == msgspec.json.encode(empty.current([], 0.0)) and empty.current([], 0.0)["clients"] == {}


def test_gpu_memory_that_cannot_be_known_is_null_and_has_no_series(tmp_path):
    """A client's process without a memory figure (as under MPS), or on a lost GPU: its memory and its
    over-limit state are null in /gpu/info, and /metrics has no series for them (absent, never 0)."""
    import time

    from gpu_orchestrator.http.metrics import client_gpu_families
    from gpu_orchestrator.supervisor.config import Config
    from gpu_orchestrator.supervisor.status import gpu_info
    from gpu_orchestrator.supervisor.nvml import GpuProcess, GpuSample
    from gpu_orchestrator.supervisor.telemetry import Telemetry
    config = msgspec.structs.replace(allocation_config(alpha=(1.0, None), beta=(1.0, None), gamma=(1.0, None)),
                                     enable_nvml=True)
    assert isinstance(config, Config)
    sample = Telemetry(True, None, time.time(), time.monotonic(), gpus=[
        GpuSample(0, uuid="GPU-0", processes=[GpuProcess(10, None, "alpha", "loader"), GpuProcess(20, 5, "beta", "loader"),
                                              GpuProcess(30, 2 * 1024**3, "gamma", "loader")]),
        GpuSample(1, uuid="GPU-1", error="GPU is lost")],
        clients={"alpha": None, "beta": None, "gamma": 2 * 1024**3},
        client_gpus={"alpha": {0: None}, "beta": {0: 5, 1: None}, "gamma": {0: 2 * 1024**3}},
        over_limit={"gamma": [0]}, over_limit_unknown={"alpha": [0], "beta": [1]})
    clients = gpu_info(config, None, sample)["clients"]
    assert clients["alpha"]["gpu_memory_bytes"] is None and clients["alpha"]["gpus"] == {"0": None}
    assert clients["alpha"]["over_limit"] is None and clients["alpha"]["over_limit_gpus"] == []
    assert clients["beta"]["gpu_memory_bytes"] is None and clients["beta"]["gpus"] == {"0": 5, "1": None}
    assert clients["beta"]["over_limit"] is None
    assert clients["gamma"]["over_limit"] is True and clients["gamma"]["over_limit_gpus"] == [0]
    info = gpu_info(config, None, sample)
    status = {"clients": {name: {"memory_limit_bytes": 1024**3} for name in ("alpha", "beta", "gamma")}}
    memory, over = client_gpu_families(info, status)
    assert {tuple(s.labels.values()): s.value for s in memory.samples} == {
        ("beta", "0", "GPU-0"): 5, ("gamma", "0", "GPU-0"): 2 * 1024**3}
    assert {s.labels["client"]: s.value for s in over.samples} == {"gamma": 1}
