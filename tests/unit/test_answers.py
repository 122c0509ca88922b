"""HTTP answers read what the loop published and the slots; they never change loop state."""

import msgspec
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


def running_a_and_b(setup, a: str | None, b: str | None):
    """Answers over RUNNING loaders of clients a and b, whose slots say their model is `a` and `b`
    (None: nothing published), heartbeat 1.0: (answers, their procs, their records)."""
    config, segment, spawner = setup
    answers = Answers(config, segment, wake=lambda: None)
    procs = [spawner.popen([], {"GPU_ORCHESTRATOR_CLIENT": c}) for c in ("a", "b")]
    records = tuple(LoaderRecord(c, slot, states.RUNNING, p.pid) for slot, (c, p) in enumerate(zip("ab", procs)))
    for slot, (client, said) in enumerate(zip("ab", (a, b))):
        if said is not None:
            publish(segment, slot, procs[slot], 1, 1.0, **{f"org/{client}1": said})
    answers.publish(Snapshot(config, records, Warmup(1)))
    return answers, procs, records


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
    assert answers.health()["loaders"] is answers.snapshot.loader_counts  # counted once per snapshot
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
    import msgspec
    config, segment, _ = setup
    # Started --no-preload: with the boot's warm-up due, a preload is answered 202 without the loop.
    answers = Answers(msgspec.structs.replace(config, preload=False), segment, wake=lambda: None)
    answers.ask = lambda name, *args: (_ for _ in ()).throw(LoopDidNotAnswer("the supervision loop did not answer"))
    result = falcon.testing.TestClient(create_app(answers)).simulate_post("/models/preload")
    assert result.status_code == 503 and "did not answer" in result.json["description"]


def test_a_client_part_is_composed_again_only_when_its_inputs_change(setup, monkeypatch):
    """A heartbeat moves the age alone; new words in the slot, or a new record, compose the part anew."""
    import msgspec

    from gpu_orchestrator.supervisor import answers as answers_module
    from gpu_orchestrator.supervisor import status

    config, segment, _ = setup
    answers, procs, records = running_a_and_b(setup, "loading", "loading")
    composed, client_part = [], status.client_part
    monkeypatch.setattr(answers_module, "STATUS_REUSE_S", 1e-9)  # every call its own window: the parts' logic
    monkeypatch.setattr(answers_module.status, "client_part",
                        lambda view, generation: composed.append(view.client) or client_part(view, generation))
    answers.models_status()
    assert sorted(composed) == ["a", "b"]
    publish(segment, 0, procs[0], 1, 2.0, **{"org/a1": "loading"})  # a heartbeat only
    composed_now = answers.compose()
    assert sorted(composed) == ["a", "b"] and composed_now.encoded == msgspec.json.encode(composed_now.current)
    publish(segment, 1, procs[1], 1, 3.0, **{"org/b1": READY})
    assert answers.models_status()["clients"]["b"]["ready"] and composed[2:] == ["b"]
    answers.publish(Snapshot(config, (records[0], LoaderRecord("b", 1, states.RUNNING, procs[1].pid, restarts=1)),
                             Warmup(1)))
    assert answers.models_status()["clients"]["b"]["restarts"] == 1 and composed[3:] == ["b"]


@pytest.mark.parametrize("many", [False, True], ids=["few loaders", "past SCAN_UP_TO"])
def test_progress_shows_at_once_with_few_loaders_and_within_a_window_past_that(setup, monkeypatch, many):
    """Up to SCAN_UP_TO loaders every request checks each slot: progress shows at once. Past it no
    slot is looked at within STATUS_REUSE_S (a request costs the same for 384 clients as for 100)
    until the loop publishes a new snapshot. Either way a heartbeat's age waits for the next window."""
    from gpu_orchestrator.supervisor import answers as answers_module

    config, segment, _ = setup
    answers, procs, records = running_a_and_b(setup, "loading", None)
    monkeypatch.setattr(answers_module, "STATUS_REUSE_S", 3600.0)  # one window for the whole test
    monkeypatch.setattr(answers_module, "SCAN_UP_TO", 1 if many else 64)
    before = answers.models_status()["clients"]["a"]
    publish(segment, 0, procs[0], 1, 2.0, **{"org/a1": "loading"})  # a heartbeat only
    assert answers.models_status()["clients"]["a"]["heartbeat_age_s"] == before["heartbeat_age_s"]
    publish(segment, 0, procs[0], 1, 3.0, **{"org/a1": READY})
    assert answers.models_status()["clients"]["a"]["ready"] is not many
    answers.publish(Snapshot(config, records, Warmup(1)))
    assert answers.models_status()["clients"]["a"]["ready"]


def test_with_few_loaders_a_heartbeat_waits_for_the_window_and_progress_does_not(setup, monkeypatch):
    """Scanning, a request whose loaders' sequence numbers all stand still answers the bytes it
    answered last without looking at any part. A heartbeat alone is read once and leaves the
    window's answer standing (a new body per heartbeat would cost every request); what a client
    shows changing makes a new answer at once; the next window shows the newer age."""
    from gpu_orchestrator.supervisor import answers as answers_module

    segment = setup[1]
    answers, procs, _ = running_a_and_b(setup, READY, "loading")
    monkeypatch.setattr(answers_module, "STATUS_REUSE_S", 3600.0)  # one window until changed below
    first = answers.models_status_json()
    age = answers.models_status()["clients"]["b"]["heartbeat_age_s"]
    looked = []
    client_parts = answers.client_parts
    monkeypatch.setattr(answers, "client_parts", lambda *args: looked.append(1) or client_parts(*args))
    assert answers.models_status_json() is first and not looked
    publish(segment, 1, procs[1], 1, 2.0, **{"org/b1": "loading"})  # a heartbeat only
    assert answers.models_status_json() is first and looked == [1]
    assert answers.models_status_json() is first and looked == [1]  # its sequence number is known now
    publish(segment, 1, procs[1], 1, 2.0, **{"org/b1": READY})  # progress, in the same window
    assert answers.models_status()["clients"]["b"]["ready"] and looked == [1, 1]
    monkeypatch.setattr(answers_module, "STATUS_REUSE_S", 1e-9)  # every call its own window
    assert answers.models_status()["clients"]["b"]["heartbeat_age_s"] < age


def test_a_new_window_reads_only_the_slots_that_moved_and_makes_the_rest_once(setup, monkeypatch):
    """Past SCAN_UP_TO every window answers anew, since the heartbeat ages move with the clock; but
    only the slots whose sequence number moved are read, and the totals and every client's entry
    are made once per change: /ready's summary stays the very same dict (its bytes are reused)."""
    from gpu_orchestrator.supervisor import answers as answers_module

    segment = setup[1]
    answers, procs, _ = running_a_and_b(setup, READY, READY)
    monkeypatch.setattr(answers_module, "SCAN_UP_TO", 1)
    monkeypatch.setattr(answers_module, "STATUS_REUSE_S", 1e-9)  # every call its own window
    first = answers.compose()
    read = []
    published = answers.published
    monkeypatch.setattr(answers, "published", lambda loader: read.append(loader.client) or published(loader))
    second = answers.compose()
    assert second is not first and not read and second.frame is first.frame and answers.models_summary() is first.top
    publish(segment, 1, procs[1], 1, 5.0, **{"org/b1": READY})  # a heartbeat of b's alone
    third = answers.compose()
    assert read == ["b"] and third.frame is first.frame and third.top["all_ready"]
    assert third.current["clients"]["b"]["heartbeat_age_s"] == round(third.now - 5.0, 3)
    publish(segment, 0, procs[0], 1, 6.0, **{"org/a1": "loading"})  # new words in a's slot
    fourth = answers.compose()
    assert read == ["b", "a"] and fourth.frame is not first.frame and fourth.top["in_progress"]
    assert fourth.current["clients"]["a"]["models"][0]["status"] == "loading"


def test_gpu_info_is_composed_again_only_when_its_inputs_change_and_its_age_always_moves(setup):
    """The same configuration, MPS report and GPU sample: the same dict (sent as the same bytes);
    with a sample, only its age is new on each request; a new sample or configuration composes anew."""
    import time

    import msgspec

    from gpu_orchestrator.supervisor.telemetry import Telemetry

    config, segment, _ = setup
    sample = Telemetry(True, None, time.time(), time.monotonic() - 5.0)

    class Sampler:
        def __init__(self):
            self.latest = None

        def snapshot(self):
            return 1, self.latest

    sampler = Sampler()
    answers = Answers(config, segment, wake=lambda: None, sampler=sampler)
    first = answers.gpu_info()
    assert answers.gpu_info() is first
    answers.publish(Snapshot(msgspec.structs.replace(config, enable_mps=True)))
    assert answers.gpu_info() is not first and answers.gpu_info()["mps_configured"]
    answers.publish(Snapshot(msgspec.structs.replace(config, enable_nvml=True)))
    sampler.latest = sample
    aged = answers.gpu_info()
    assert aged["nvml_supported"] and aged["age_s"] >= 5.0
    assert answers.gpu_info()["age_s"] >= aged["age_s"]
    assert list(aged) == list(first)  # the same keys in the same places, age_s among them
    sampler.latest = Telemetry(True, None, time.time(), time.monotonic())
    assert answers.gpu_info()["age_s"] < 5.0


def test_gpu_memory_nvml_cannot_report_is_null_in_models_status_not_zero(setup):
    """A client whose process has no memory figure (NVML gives none under MPS) read 0: it is null.
    A client with no GPU process on a host whose every process list was read is 0, as before."""
    import time

    from gpu_orchestrator.supervisor.telemetry import Telemetry

    config, segment, spawner = setup
    answers, _, records = running_a_and_b(setup, "ready", "ready")
    sample = Telemetry(True, None, time.time(), time.monotonic(), clients={"a": None}, client_gpus={"a": {0: None}})

    class Sampler:
        def snapshot(self):
            return 1, sample

    answers.sampler = Sampler()
    answers.publish(Snapshot(msgspec.structs.replace(config, enable_nvml=True), records, Warmup(1)))
    clients = answers.models_status()["clients"]
    assert clients["a"]["gpu_memory_bytes"] is None and clients["b"]["gpu_memory_bytes"] == 0
