"""How loader records and slots become /models/status: only live loaders' words count."""

from gpu_orchestrator.supervisor import states
from gpu_orchestrator.supervisor.schema import FAILED, IDLE, READY, WORKING, LoaderState, ModelProgress
from gpu_orchestrator.supervisor.status import ClientView, Warmup, models_status


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
    working = models_status([view(published=published(1, WORKING, READY, "loading"))], Warmup(generation=1))
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
    from gpu_orchestrator.supervisor.mps import MpsDaemon, MpsSettings
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
    assert gpu0 == {"index": 0, "memory_gb": 80.0, "mps_memory_limit_gb": 120.0, "clients": ["a", "b", "c"],
                    "overcommitted": True, "overcommit_gb": 40.0}
    assert gpu1["clients"] == ["c"] and gpu1["overcommitted"] is False
    assert summary["devices_not_present"] == {}
    assert [w["gpu"] for w in overcommit_warnings(summary)] == [0]


def test_pinning_spreads_limits_and_missing_devices_are_named():
    from gpu_orchestrator.supervisor.status import GiB, allocation_summary, overcommit_warnings
    config = allocation_config(a=(60.0, [0]), b=(60.0, [1]), c=(10.0, [1, 3]))
    summary = allocation_summary(config, {0: 80 * GiB, 1: 80 * GiB})
    assert summary["overcommitted"] is False and overcommit_warnings(summary) == []
    assert [g["mps_memory_limit_gb"] for g in summary["per_gpu"]] == [60.0, 70.0]
    assert summary["devices_not_present"] == {"c": [3]}


def test_without_nvml_the_configured_total_is_the_measure():
    from gpu_orchestrator.supervisor.status import allocation_summary, overcommit_warnings
    config = allocation_config(a=(1.0, None), b=(0.75, [0]))
    assert "overcommitted" not in allocation_summary(config)  # nothing to judge against
    config.allocation_document = {"mps_configuration": {"total_gpu_memory_gb": 1.5}}
    summary = allocation_summary(config)
    assert summary["overcommitted"] is True and summary["overcommit_gb"] == 0.25 and "per_gpu" not in summary
    assert overcommit_warnings(summary) == [{"gpu": "all", "limits_gb": 1.75, "gpu_gb": 1.5, "over_gb": 0.25,
                                             "source": "mps_configuration.total_gpu_memory_gb"}]
