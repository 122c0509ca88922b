"""HTTP answers read what the loop published and the slots; they never change loop state."""

import pytest
from fakes.loop import FakeSpawner, publish

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.wire import READY
from gpu_orchestrator.supervisor.answers import Answers, LoaderRecord, ShuttingDown, Snapshot, UnknownClient
from gpu_orchestrator.supervisor.config import Config
from gpu_orchestrator.supervisor.slots import create_segment
from gpu_orchestrator.supervisor.warmup import Warmup


@pytest.fixture
def setup(tmp_path):
    config = Config(model_store_root=str(tmp_path), model_map_path="m", allocation_path="",
                    clients={"a": ["org/a1"], "b": ["org/b1"]})
    segment = create_segment(config)
    spawner = FakeSpawner()
    yield config, segment, spawner
    spawner.close()
    segment.close()


def test_clients_without_a_loader_yet_are_listed_and_not_ready(setup):
    config, segment, _ = setup
    answers = Answers(config, segment, wake=lambda: None)
    current = answers.models_status()
    assert sorted(current["clients"]) == ["a", "b"] and not current["all_ready"]
    assert answers.health()["clients"] == 0 and answers.health()["status"] == "ok"


def test_a_published_snapshot_and_the_live_loader_slot_make_the_status(setup):
    config, segment, spawner = setup
    answers = Answers(config, segment, wake=lambda: None)
    proc = spawner.popen([], {"GPU_ORCHESTRATOR_CLIENT": "a"})
    publish(segment, 0, proc, 1, 0.0, **{"org/a1": READY})
    answers.publish(Snapshot(config, (LoaderRecord("a", 0, states.RUNNING, proc.pid),), Warmup(1)))
    assert answers.models_status()["clients"]["a"]["ready"]
    # A slot written by another pid (a dead run) does not count.
    answers.publish(Snapshot(config, (LoaderRecord("a", 0, states.RUNNING, proc.pid + 1),), Warmup(1)))
    assert not answers.models_status()["clients"]["a"]["ready"]
    assert answers.health()["loaders"] == {states.RUNNING: 1}
    assert b'"generation":1' in answers.models_status_json()


def test_unknown_clients_and_a_closed_source_are_refused(setup):
    config, segment, _ = setup
    answers = Answers(config, segment, wake=lambda: None)
    assert answers.client_environment("a")["environment"]["GPU_ORCHESTRATOR_CLIENT"] == "a"
    with pytest.raises(UnknownClient, match="no client 'zz' in the model map; clients: a, b"):
        answers.client_environment("zz")
    answers.close()
    for ask in (answers.models_status, answers.gpu_info, lambda: answers.request_preload(False)):
        with pytest.raises(ShuttingDown):
            ask()


def test_a_loop_that_does_not_answer_a_preload_is_a_503_that_says_so(setup):
    import falcon.testing

    from gpu_orchestrator.http.app import create_app
    from gpu_orchestrator.supervisor.answers import LoopDidNotAnswer
    config, segment, _ = setup
    answers = Answers(config, segment, wake=lambda: None)
    answers.ask = lambda name, *args: (_ for _ in ()).throw(LoopDidNotAnswer("the supervision loop did not answer"))
    result = falcon.testing.TestClient(create_app(answers)).simulate_post("/models/preload")
    assert result.status_code == 503 and "did not answer" in result.json["description"]
