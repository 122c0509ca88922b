"""Warm-up generations and the deaths counted against a loading model, without a loop."""

import pytest

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.wire import IDLE, WARMING_UP, LoaderState
from gpu_orchestrator.supervisor.warmup import KILLS_TO_FAIL_A_MODEL, Warmups, finished, preload_answer


def status(in_progress=False, all_ready=False, failed=0):
    return {"in_progress": in_progress, "all_ready": all_ready,
            "summary": {"done": 0, "failed": failed, "total": 1, "loading": 0, "pending": 0}}


def test_idle_until_started_then_finished_once_and_reopened_by_a_replaced_loader():
    warmups = Warmups()
    warmups.note_progress(status(in_progress=True))
    assert warmups.state == states.WARMUP_IDLE and warmups.settled
    warmups.start(refresh=False, clients=["a"])
    assert warmups.state == states.WARMUP_IN_PROGRESS and warmups.generation == 1 and not warmups.settled
    warmups.note_progress(status(all_ready=True))
    finished_at = warmups.current.finished_at
    assert warmups.state == states.WARMUP_FINISHED and finished_at is not None
    warmups.note_progress(status(all_ready=True))
    assert warmups.current.finished_at == finished_at  # noted once
    warmups.reopen()
    assert warmups.state == states.WARMUP_IN_PROGRESS and warmups.generation == 1


def test_a_model_is_failed_after_the_kills_limit_and_a_refresh_forgets_it():
    warmups = Warmups()
    warmups.start(False, ["a"])
    for _ in range(KILLS_TO_FAIL_A_MODEL - 1):
        warmups.count_kills("a", ["m"], "killed by SIGKILL", "t")
    assert warmups.failed_for("a") == {}
    warmups.count_kills("a", ["m"], "killed by SIGKILL", "t")
    assert "died 3 times while loading it; the last run killed by SIGKILL" in warmups.failed_for("a")["m"]
    warmups.start(refresh=True, clients=["a"])
    assert warmups.failed_for("a") == {} and "a" not in warmups.kills_while_loading


def test_a_finished_loader_forgets_its_deaths_but_not_its_failed_models():
    warmups = Warmups()
    for _ in range(KILLS_TO_FAIL_A_MODEL):
        warmups.count_kills("a", ["m"], "x", "t")
    warmups.count_kills("a", ["n"], "x", "t")
    warmups.loader_finished("a")
    assert "a" not in warmups.kills_while_loading and "m" in warmups.failed_for("a")


def test_finished_needs_this_generation_and_idle():
    assert finished(LoaderState("a", 1, 2, IDLE, 0.0, []), 2)
    assert not finished(LoaderState("a", 1, 1, IDLE, 0.0, []), 2)
    assert not finished(LoaderState("a", 1, 2, WARMING_UP, 0.0, []), 2)
    assert not finished(None, 1)


@pytest.mark.parametrize("current, generation, refresh, code", [
    (status(in_progress=True), 1, False, 202),
    (status(all_ready=True), 1, False, 200),
    (status(failed=1), 1, False, 503),
    (status(all_ready=True), 1, True, None),
    (status(), 0, False, None),
])
def test_preload_answers_without_starting(current, generation, refresh, code):
    answer = preload_answer(current, generation, refresh)
    assert (answer[0] if answer else None) == code
