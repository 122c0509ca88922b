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
