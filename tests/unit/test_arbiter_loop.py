"""The supervision loop driven in-process: a fake spawner (no subprocess) and a fake clock.

Each test steps the loop with `tick(0)` and moves the clock itself, so restarts, backoff and
heartbeat deadlines happen exactly when the test says, without waiting for them."""

import logging
import signal
import threading
import time

import pytest
from fakes.loop import FakeClock, FakeSpawner, publish

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.wire import EXIT_CANNOT_BOOT, FAILED, LOADING, READY
from gpu_orchestrator.supervisor.arbiter import Arbiter
from gpu_orchestrator.supervisor.clients import Policy
from gpu_orchestrator.supervisor.config import Config
from gpu_orchestrator.supervisor.slots import create_segment
from gpu_orchestrator.supervisor.warmup import KILLS_TO_FAIL_A_MODEL

POLICY = Policy(startsecs=1.0, heartbeat_timeout=30.0)


def make_config(tmp_path, clients: dict, preload: bool = True) -> Config:
    return Config(model_store_root=str(tmp_path), model_map_path=str(tmp_path / "map.json"), allocation_path="",
                  clients=clients, preload=preload)


@pytest.fixture
def loop(tmp_path):
    """Make an Arbiter over a real shared-memory segment with fakes for processes and time."""
    made = []

    def make(clients: dict, preload: bool = True):
        config = make_config(tmp_path, clients, preload)
        segment = create_segment(config)
        clock, spawner = FakeClock(), FakeSpawner()
        arbiter = Arbiter(config, segment, POLICY, spawner=spawner, clock=clock)
        made.append((arbiter, segment, spawner))
        return arbiter, segment, clock, spawner

    yield make
    for arbiter, segment, spawner in made:
        spawner.close()
        segment.close()


def running(arbiter, clock):
    """Past startsecs: every started loader is RUNNING."""
    arbiter.tick(0)
    clock.advance(POLICY.startsecs + 0.1)
    arbiter.tick(0)


def test_every_client_gets_a_loader_at_start_and_the_first_warm_up(loop):
    arbiter, _, _, spawner = loop({"alpha": ["org/a1"], "beta": ["org/b1", "org/b2"]})
    arbiter.tick(0)
    assert sorted(p.client for p in spawner.procs) == ["alpha", "beta"]
    assert {c: l.state for c, l in arbiter.loaders.items()} == {"alpha": states.STARTING, "beta": states.STARTING}
    assert [c["generation"] for c in spawner.latest("alpha").commands()] == [1]
    assert arbiter.answers.health()["loaders"] == {states.STARTING: 2}


def test_a_missed_heartbeat_kills_the_loader_and_it_restarts_after_its_backoff(loop):
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    first = spawner.latest("alpha")
    publish(segment, arbiter.loaders["alpha"].slot, first, 1, clock.now, **{"org/a1": READY})
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.RUNNING
    clock.advance(POLICY.heartbeat_timeout + 1)
    arbiter.tick(0)
    assert first.signals == [signal.SIGKILL]
    arbiter.tick(0)  # reaped
    loader = arbiter.loaders["alpha"]
    assert loader.state == states.BACKOFF and "heartbeat lost" in loader.last_exit
    assert len(spawner.runs("alpha")) == 1  # not before the backoff delay
    clock.advance(POLICY.restart_delay(1))
    arbiter.tick(0)
    assert len(spawner.runs("alpha")) == 2 and loader.state == states.STARTING and loader.restarts == 1


def test_a_restart_due_in_the_step_that_handles_sigterm_is_not_made(loop):
    """The step that queued SIGTERM went on to restart what was due: a loader spawned only for
    shutdown() to stop it at once."""
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    spawner.latest("alpha").die(signal.SIGKILL)
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.BACKOFF
    clock.advance(POLICY.restart_delay(1))
    arbiter.signals.append(signal.SIGTERM)
    arbiter.tick(0)
    assert arbiter.stopping and len(spawner.runs("alpha")) == 1


def die_while_loading(arbiter, segment, clock, spawner, generation: int = 1) -> None:
    """The current alpha loader says it is loading org/a1, then is killed; the loop restarts it."""
    proc = spawner.latest("alpha")
    publish(segment, arbiter.loaders["alpha"].slot, proc, generation, clock.now, **{"org/a1": LOADING})
    arbiter.tick(0)
    proc.die(signal.SIGKILL)
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.BACKOFF
    clock.advance(POLICY.backoff_max)
    running(arbiter, clock)


def test_a_model_that_kills_its_loader_three_times_is_failed_not_retried(loop):
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    for _ in range(KILLS_TO_FAIL_A_MODEL):
        die_while_loading(arbiter, segment, clock, spawner)
    reason = arbiter.warmups.failed_for("alpha")["org/a1"]
    assert f"died {KILLS_TO_FAIL_A_MODEL} times while loading it" in reason
    assert spawner.latest("alpha").commands() == [{"type": "load", "generation": 1, "refresh": False,
                                                   "failed": {"org/a1": reason}}]


def test_a_finished_warm_up_forgets_earlier_deaths_while_loading(loop):
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    for _ in range(KILLS_TO_FAIL_A_MODEL - 1):
        die_while_loading(arbiter, segment, clock, spawner)
    assert arbiter.warmups.kills_while_loading["alpha"] == {"org/a1": KILLS_TO_FAIL_A_MODEL - 1}
    proc = spawner.latest("alpha")
    publish(segment, arbiter.loaders["alpha"].slot, proc, 1, clock.now, **{"org/a1": READY})
    arbiter.tick(0)
    assert "alpha" not in arbiter.warmups.kills_while_loading
    assert arbiter.warmups.state == states.WARMUP_FINISHED
    die_while_loading(arbiter, segment, clock, spawner)  # one more death is the first again
    assert arbiter.warmups.kills_while_loading["alpha"] == {"org/a1": 1}
    assert arbiter.warmups.failed_for("alpha") == {}


def serve_until_done(arbiter, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        arbiter.tick(0.05)
    thread.join(1)
    assert not thread.is_alive(), "the loop did not answer the request"


def test_each_run_of_a_long_batch_spawn_is_dated_from_its_own_start(loop):
    """200 execs on 2 cores take seconds. Every run was dated from the step's clock, taken before
    the batch: the spawn counted as silence (healthy loaders killed as heartbeat lost, silent_s
    wrong) and the whole batch was promoted at once (an early crash was no failed start)."""
    clients = {f"c{i}": [f"org/m{i}"] for i in range(3)}
    arbiter, _, clock, spawner = loop(clients)
    spawner.clock, spawner.spawn_seconds = clock, 12.0  # 36 s for the batch: past the 30 s timeout
    arbiter.tick(0)
    assert [arbiter.loaders[c].started_at for c in clients] == [1012.0, 1024.0, 1036.0]
    arbiter.tick(0)  # now 1036: heartbeats are due
    assert [arbiter.loaders[c].state for c in clients] == [states.RUNNING, states.RUNNING, states.STARTING]
    assert all(p.signals == [] for p in spawner.procs)
    spawner.latest("c2").exit(1)
    arbiter.tick(0)
    assert arbiter.loaders["c2"].state == states.BACKOFF and len(arbiter.loaders["c2"].failed_starts) == 1


def test_a_preload_from_another_thread_is_answered_by_the_loop(loop):
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1"]}, preload=False)
    running(arbiter, clock)
    assert arbiter.warmups.state == states.WARMUP_IDLE and spawner.latest("alpha").commands() == []
    answers = []
    asking = threading.Thread(target=lambda: answers.append(arbiter.answers.request_preload(False)))
    asking.start()
    serve_until_done(arbiter, asking)
    code, body = answers[0]
    assert code == 202 and body["started"] and body["generation"] == 1 and body["in_progress"]
    assert arbiter.warmups.state == states.WARMUP_IN_PROGRESS
    assert [c["generation"] for c in spawner.latest("alpha").commands()] == [1]
    # Reads never change anything: they see what the loop published.
    assert arbiter.answers.models_status()["generation"] == 1


def test_a_refresh_preload_gives_a_fatal_loader_another_try(loop):
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"]})
    arbiter.tick(0)
    spawner.latest("alpha").exit(EXIT_CANNOT_BOOT)
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.FATAL
    asking = threading.Thread(target=lambda: arbiter.answers.request_preload(True))
    asking.start()
    serve_until_done(arbiter, asking)
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.STARTING
    assert len(spawner.runs("alpha")) == 2


def test_a_preload_the_loop_does_not_serve_is_refused_with_a_reason(loop):
    from gpu_orchestrator.supervisor.answers import LoopDidNotAnswer
    arbiter, *_ = loop({"alpha": ["org/a1"]})
    with pytest.raises(LoopDidNotAnswer, match="did not answer"):
        arbiter.answers.ask("preload", False, timeout=0.2)


def reload_to(arbiter, new) -> None:
    """SIGHUP with `new` as what the read finds; ticks until the loop has applied it (or 30 s)."""
    arbiter.reloads.read = lambda config: new
    arbiter.signals.append(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while arbiter.config is not new and time.monotonic() < deadline:
        arbiter.tick(0.05)


def test_a_reload_adds_removes_and_changes_clients(loop, tmp_path):
    arbiter, segment, clock, spawner = loop({"keep": ["org/k"], "gone": ["org/g"], "grow": ["org/x"]})
    running(arbiter, clock)
    gone, grow = spawner.latest("gone"), spawner.latest("grow")
    keep_slot, gone_slot = arbiter.loaders["keep"].slot, arbiter.loaders["gone"].slot
    new = make_config(tmp_path, {"keep": ["org/k"], "grow": ["org/x", "org/y"], "new": ["org/n"]})
    reload_to(arbiter, new)
    arbiter.tick(0)  # the TERMed loaders are reaped
    assert arbiter.config is new and sorted(arbiter.loaders) == ["grow", "keep", "new"]
    assert gone.signals == [signal.SIGTERM] and grow.signals == [signal.SIGTERM]
    assert len(spawner.runs("keep")) == 1 and arbiter.loaders["keep"].slot == keep_slot
    assert len(spawner.runs("grow")) == 2 and len(spawner.runs("new")) == 1
    assert arbiter.retiring == [] and gone_slot in arbiter.free_slots.free
    assert sorted(arbiter.answers.models_status()["clients"]) == ["grow", "keep", "new"]


def test_a_reload_that_fails_keeps_the_running_configuration(loop, tmp_path, caplog):
    from gpu_orchestrator.supervisor.config import ConfigError
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    old, read = arbiter.config, threading.Event()

    def refuse(config):
        read.set()
        raise ConfigError("map.json: not JSON")
    arbiter.reloads.read = refuse
    arbiter.signals.append(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not (read.is_set() and arbiter.reloads.pending is None) and time.monotonic() < deadline:
        arbiter.tick(0.05)
    assert arbiter.config is old and len(spawner.procs) == 1
    assert "reload refused; the running configuration stays" in caplog.text


def test_shutdown_stops_every_loader_and_answers_503_afterwards(loop):
    from gpu_orchestrator.supervisor.answers import ShuttingDown
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"], "beta": ["org/b1"]})
    running(arbiter, clock)
    arbiter.shutdown()
    assert all(p.signals == [signal.SIGTERM] for p in spawner.procs)
    assert all(l.state == states.STOPPED for l in arbiter.loaders.values())
    with pytest.raises(ShuttingDown):
        arbiter.answers.models_status()


def test_shutdown_kills_a_loader_that_ignores_sigterm(loop):
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    spawner.ignore_term = True
    real = arbiter.clock
    arbiter.clock = lambda: real() + (POLICY.stop_grace + 1 if spawner.procs[0].signals else 0)
    arbiter.shutdown()
    assert spawner.procs[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert arbiter.loaders["alpha"].state == states.STOPPED


def test_failed_models_say_why_in_the_status(loop):
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1", "org/a2"]})
    running(arbiter, clock)
    publish(segment, arbiter.loaders["alpha"].slot, spawner.latest("alpha"), 1, clock.now,
            **{"org/a1": READY, "org/a2": FAILED})
    arbiter.tick(0)
    current = arbiter.answers.models_status()
    assert not current["in_progress"] and current["summary"]["failed"] == 1
    assert arbiter.warmups.state == states.WARMUP_FINISHED


def test_an_idle_tick_reads_no_slot_and_measures_no_memory_until_their_cadence(loop, monkeypatch):
    """Once every loader was seen finish the warm-up, a tick costs by what changed: heartbeats
    (which write the slots every interval) are read at the heartbeat cadence, RSS at its own."""
    from gpu_orchestrator.supervisor import arbiter as arbiter_module
    from gpu_orchestrator.supervisor.clients import LoaderProcess

    clients = {f"c{i}": [f"org/m{i}"] for i in range(4)}
    arbiter, segment, clock, spawner = loop(clients)
    running(arbiter, clock)
    for client, (model,) in clients.items():
        publish(segment, arbiter.loaders[client].slot, spawner.latest(client), 1, clock.now, **{model: READY})
    arbiter.tick(0)
    assert arbiter.answers.models_status()["all_ready"] and arbiter.warmups.state == states.WARMUP_FINISHED
    reads, measured, composed = [], [], []
    read, measure, compose = arbiter.reader.read, LoaderProcess.measure_rss, arbiter.answers.compose
    monkeypatch.setattr(arbiter.reader, "read", lambda slot: reads.append(slot) or read(slot))
    monkeypatch.setattr(LoaderProcess, "measure_rss", lambda self: measured.append(self.client) or measure(self))
    monkeypatch.setattr(arbiter.answers, "compose", lambda *a, **k: composed.append(1) or compose(*a, **k))
    for _ in range(3):
        clock.advance(0.1)
        for client, (model,) in clients.items():  # heartbeats
            publish(segment, arbiter.loaders[client].slot, spawner.latest(client), 1, clock.now, **{model: READY})
        arbiter.tick(0)
    assert reads == [] and measured == [] and composed == []
    clock.advance(max(arbiter_module.RSS_REFRESH_S, POLICY.heartbeat_timeout / arbiter_module.HEARTBEAT_CHECKS))
    arbiter.tick(0)
    assert sorted(measured) == sorted(clients) and len(reads) == len(clients) and composed == []


def test_a_loader_whose_stderr_closes_is_reaped_at_once(loop):
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    spawner.latest("alpha").exit(1)
    arbiter.tick(1.0)  # woken by the end of its stderr, not by the timeout
    assert arbiter.loaders["alpha"].state == states.BACKOFF


def test_a_loader_that_exits_with_its_stderr_held_open_is_reaped_on_sigchld(loop):
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    spawner.latest("alpha").exit(1, stderr_held=True)
    arbiter.tick(0)  # no sign of the exit yet: no EOF, no SIGCHLD, no sweep due
    assert arbiter.loaders["alpha"].state == states.RUNNING
    arbiter.signals.append(signal.SIGCHLD)  # what the handler queues
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.BACKOFF


def test_without_sigchld_the_periodic_sweep_reaps_it(loop):
    from gpu_orchestrator.supervisor.arbiter import REAP_SWEEP_S
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    spawner.latest("alpha").exit(1, stderr_held=True)
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.RUNNING
    clock.advance(REAP_SWEEP_S)
    arbiter.tick(0)
    assert arbiter.loaders["alpha"].state == states.BACKOFF


class StartingMps:
    """An MPS daemon still starting: loaders must wait for it, so the loop has not booted."""

    healthy = settled = False
    settings = None

    def supervise(self, now):
        return False

    def next_deadline(self):
        return None

    def settings_in_force(self):
        return None

    def report(self):
        return {"enabled": True, "managed": True, "restarts": 0, "error": None, "servers": [], "control_pid": None,
                "pipe_dir": "/tmp/nvidia-mps"}

    def stop(self, grace):
        pass


def test_a_reload_while_mps_starts_is_refused_when_the_channel_cannot_hold_every_client(loop, tmp_path, caplog):
    # Before the loaders first start no client holds a slot: all of the new map's need one. Counting
    # only the added ones once accepted a map the channel could not hold, and start-up then died.
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1"], "beta": ["org/b1"]})
    arbiter.mps = arbiter.answers.mps = StartingMps()
    sent = []
    arbiter.notifier.ready = lambda text: sent.append(("READY", text))
    arbiter.notifier.status = lambda text: sent.append(("STATUS", text))
    arbiter.tick(0)
    assert not arbiter.booted and spawner.procs == []
    for count, accepted in ((segment.slots + 1, False), (segment.slots, True)):
        new, read = make_config(tmp_path, {f"c{i}": [f"org/m{i}"] for i in range(count)}), threading.Event()
        arbiter.reloads.read = lambda config, new=new, read=read: read.set() or new
        arbiter.signals.append(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not (read.is_set() and arbiter.reloads.pending is None) and time.monotonic() < deadline:
            arbiter.tick(0.05)
        assert (arbiter.config is new) is accepted and not arbiter.booted and spawner.procs == []
    assert f"{segment.slots + 1} new clients exceed the {segment.slots} free channel slots" in caplog.text
    # READY=1 only once the loaders run: a reload before that tells systemd its status alone.
    assert sent and all(kind == "STATUS" for kind, _ in sent)
    arbiter.mps.healthy = arbiter.mps.settled = True
    arbiter.tick(0)
    assert arbiter.booted and len(spawner.procs) == segment.slots


def test_a_refresh_while_a_warm_up_runs_starts_nothing_new(loop):
    arbiter, segment, clock, spawner = loop({"alpha": ["org/a1"]})
    running(arbiter, clock)
    assert arbiter.warmups.generation == 1 and arbiter.warmups.state == states.WARMUP_IN_PROGRESS
    answers = []
    asking = threading.Thread(target=lambda: answers.append(arbiter.answers.request_preload(True)))
    asking.start()
    serve_until_done(arbiter, asking)
    code, body = answers[0]
    assert code == 202 and not body["started"] and body["generation"] == 1
    assert [c["generation"] for c in spawner.latest("alpha").commands()] == [1]


def test_a_preload_during_shutdown_is_refused_at_once_and_one_given_up_on_is_not_acted_on(loop):
    from gpu_orchestrator.supervisor.answers import ShuttingDown
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"]}, preload=False)
    running(arbiter, clock)
    with pytest.raises(TimeoutError):  # nobody steps the loop: the asker gives up
        arbiter.answers.ask("preload", False, timeout=0.2)
    arbiter.tick(0)  # the loop finds the abandoned command and leaves it
    assert arbiter.warmups.generation == 0 and spawner.latest("alpha").commands() == []
    arbiter.answers.stop_taking_commands()
    with pytest.raises(ShuttingDown):
        arbiter.answers.request_preload(False)


def gone_interpreter() -> OSError:
    """What subprocess.Popen raises when the interpreter it execs was removed (an upgrade, a venv moved)."""
    return FileNotFoundError(2, "No such file or directory", "/opt/gpu-orchestrator/bin/python")


def test_a_loader_that_cannot_be_spawned_backs_off_then_is_fatal_and_the_others_run_on(loop, caplog):
    # It once raised out of the loop: every healthy loader was stopped and the supervisor exited.
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"], "beta": ["org/b1"]})
    running(arbiter, clock)
    beta = spawner.latest("beta")
    spawner.cannot_start["alpha"] = gone_interpreter()
    spawner.latest("alpha").die(signal.SIGKILL)
    arbiter.tick(0)
    alpha = arbiter.loaders["alpha"]
    for attempt in range(1, POLICY.failed_starts_to_fatal + 1):
        assert alpha.state == states.BACKOFF, attempt
        clock.advance(alpha.restart_at - clock.now)
        arbiter.tick(0)
        assert spawner.refused == ["alpha"] * attempt
    assert alpha.state == states.FATAL and alpha.pid is None
    assert alpha.last_exit == ("could not be started ([Errno 2] No such file or directory: "
                               "'/opt/gpu-orchestrator/bin/python'; reinstall or restart gpu-orchestrator)")
    assert f"failed to start {POLICY.failed_starts_to_fatal} times" in alpha.fatal_reason
    assert "loader could not be started" in caplog.text and "reinstall or restart" in caplog.text
    assert arbiter.loaders["beta"].state == states.RUNNING and beta.alive and beta.signals == []
    client = arbiter.answers.models_status()["clients"]["alpha"]
    assert client["state"] == states.FATAL and "could not be started" in client["last_exit"]
    del spawner.cannot_start["alpha"]  # repaired: a refresh gives it another try
    arbiter.start_warmup(refresh=True)
    arbiter.tick(0)
    assert alpha.state == states.STARTING and spawner.latest("alpha").alive


@pytest.mark.parametrize("when", ["start", "reload"])
def test_a_client_that_cannot_be_spawned_at_start_or_on_reload_fails_alone(loop, tmp_path, when):
    arbiter, _, clock, spawner = loop({"alpha": ["org/a1"], "beta": ["org/b1"]})
    failing = "alpha" if when == "start" else "new"
    spawner.cannot_start[failing] = BlockingIOError(11, "Resource temporarily unavailable")  # a pids limit
    if when == "reload":
        running(arbiter, clock)
        new = make_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"], "new": ["org/n"], "other": ["org/o"]})
        reload_to(arbiter, new)
    running(arbiter, clock)
    assert arbiter.loaders[failing].state == states.BACKOFF and set(spawner.refused) == {failing}
    assert "out of processes" in arbiter.loaders[failing].last_exit
    assert all(l.state == states.RUNNING for c, l in arbiter.loaders.items() if c != failing)
    assert all(p.alive for p in spawner.procs)


def test_a_reload_that_changes_clients_with_no_free_slot_restarts_them_in_their_own(loop, tmp_path):
    """Once refused ('exceed the free channel slots; restart the service'), though a changed client
    can start again in the slot it holds; an added one still takes a free slot, and goes first."""
    arbiter, segment, clock, spawner = loop({"c0": ["org/m0"]})
    running(arbiter, clock)
    full = make_config(tmp_path, {f"c{i}": [f"org/m{i}"] for i in range(segment.slots - 1)})
    reload_to(arbiter, full)
    running(arbiter, clock)
    assert len(arbiter.free_slots) == 1
    changed = make_config(tmp_path, {**{f"c{i}": [f"org/m{i}"] for i in range(segment.slots - 1)},
                                     "c1": ["org/m1", "org/x"], "c2": ["org/m2", "org/y"], "added": ["org/a"]})
    slots = {c: arbiter.loaders[c].slot for c in ("c1", "c2")}
    reload_to(arbiter, changed)
    assert arbiter.config is changed
    for _ in range(3):
        running(arbiter, clock)
    assert all(l.state == states.RUNNING for l in arbiter.loaders.values()) and not arbiter.free_slots
    assert {c: arbiter.loaders[c].slot for c in ("c1", "c2")} == slots
    assert all(len(spawner.runs(c)) == 2 for c in ("c1", "c2")) and len(spawner.runs("c3")) == 1
    assert spawner.latest("c1").command != spawner.runs("c1")[0].command  # started with its new models


def follow_a_new_mps_daemon(loop, tmp_path, clients: int | None, hold_term: bool = False):
    """`clients` loaders (None: as many as the channel has slots) running after a reload grew the
    map from one; then the MPS daemon restarts, and now has settings in force. `hold_term`: the
    loaders outlive SIGTERM until the test lets them go (spawner.ignore_term)."""
    from gpu_orchestrator.supervisor.mps_control import MpsSettings
    arbiter, segment, clock, spawner = loop({"c0": ["org/m0"]})
    arbiter.mps = arbiter.answers.mps = StartingMps()
    arbiter.mps.healthy = arbiter.mps.settled = True
    running(arbiter, clock)
    new = make_config(tmp_path, {f"c{i}": [f"org/m{i}"] for i in range(clients or segment.slots)})
    reload_to(arbiter, new)
    running(arbiter, clock)
    first = {c: spawner.latest(c) for c in arbiter.loaders}
    assert len(first) == len(new.clients) and all(l.state == states.RUNNING for l in arbiter.loaders.values())
    spawner.ignore_term = hold_term
    arbiter.mps.settings_in_force = lambda: MpsSettings("/run/new-mps", "/var/log/new-mps")
    arbiter.mps.supervise = lambda now: True  # the daemon came back, once
    arbiter.tick(0)
    arbiter.mps.supervise = lambda now: False
    return arbiter, segment, clock, spawner, first


@pytest.mark.parametrize("clients", [10, None], ids=["7 free slots for 10", "no free slot"])
def test_every_loader_follows_a_restarted_mps_daemon_even_without_a_spare_slot_each(loop, tmp_path, caplog, clients):
    # With more loaders than free slots the loop once waited for room that never came: no loader
    # was replaced, and they ran on without the new daemon's limits.
    caplog.set_level(logging.INFO)
    arbiter, segment, clock, spawner, first = follow_a_new_mps_daemon(loop, tmp_path, clients)
    assert "replacing every loader under the new MPS control daemon" in caplog.text
    for _ in range(3):
        running(arbiter, clock)
    assert all(proc.signals == [signal.SIGTERM] and not proc.alive for proc in first.values())
    assert all(len(spawner.runs(c)) == 2 and l.state == states.RUNNING for c, l in arbiter.loaders.items())
    assert all(spawner.latest(c).env["CUDA_MPS_PIPE_DIRECTORY"] == "/run/new-mps" for c in first)
    slots = [l.slot for l in arbiter.loaders.values()]
    assert arbiter.retiring == [] and len(set(slots)) == len(first) == segment.slots - len(arbiter.free_slots)
    assert all(c["generation"] == 1 for c in spawner.latest("c1").commands())  # the warm-up goes to each new run
    if clients is None:  # each restarted in its own slot; its line once said only that, not why
        assert caplog.text.count('loader started in its own slot') == segment.slots
        assert caplog.text.count('reason="the MPS control daemon restarted"') == segment.slots


def test_a_run_stopped_to_start_again_in_its_slot_no_longer_counts_as_ready(loop, tmp_path):
    """Seen by a reviewer: while the old runs were stopping (up to stop_grace), their "all ready"
    slots made every client ready and the warm-up finished again, though none had the new limits."""
    arbiter, segment, clock, spawner, first = follow_a_new_mps_daemon(loop, tmp_path, None, hold_term=True)
    for client, loader in arbiter.loaders.items():
        publish(segment, loader.slot, first[client], arbiter.warmups.generation, clock.now,
                **{f"org/m{client[1:]}": READY})
    arbiter.tick(0)
    assert all(l.state == states.STOPPING for l in arbiter.loaders.values())
    status = arbiter.answers.models_status()
    assert not status["all_ready"] and status["in_progress"] and status["summary"]["done"] == 0
    assert arbiter.answers.models_summary()["all_ready"] is False and arbiter.warmups.state == states.WARMUP_IN_PROGRESS


@pytest.mark.parametrize("why", ["reload", "MPS daemon restarted"])
def test_replaced_loaders_are_never_served_ready_while_their_successors_spawn(loop, tmp_path, why):
    """The loop stopped the old runs, then spawned the new ones (seconds for many) before it
    published: HTTP served the stopped runs' pids as ready, all_ready true, all that while."""
    arbiter, segment, clock, spawner = loop({"keep": ["org/k"], "grow": ["org/g"]})
    if why != "reload":
        arbiter.mps = arbiter.answers.mps = StartingMps()
        arbiter.mps.healthy = arbiter.mps.settled = True
    running(arbiter, clock)
    old = {client: spawner.latest(client).pid for client in arbiter.loaders}
    for client, loader in arbiter.loaders.items():
        publish(segment, loader.slot, spawner.latest(client), 1, clock.now, **{f"org/{client[0]}": READY})
    arbiter.tick(0)
    assert arbiter.answers.models_status()["all_ready"]
    seen = []
    spawner.before_spawn = lambda: seen.append(arbiter.answers.models_status())
    if why == "reload":
        reload_to(arbiter, make_config(tmp_path, {"keep": ["org/k"], "grow": ["org/g", "org/h"], "new": ["org/n"]}))
        replaced = ["grow"]
    else:
        arbiter.mps.supervise = lambda now: True
        arbiter.tick(0)
        replaced = ["keep", "grow"]
    status = seen[0]
    assert sorted(status["clients"]) == sorted(arbiter.config.clients)  # the new configuration's
    assert not status["all_ready"] and status["in_progress"]
    for client in replaced:
        assert not status["clients"][client]["ready"] and status["clients"][client]["pid"] != old[client]
        assert status["clients"][client]["state"] in (states.STOPPED, states.STOPPING)


def test_a_reload_that_changes_a_services_limits_says_to_restart_that_service(loop, tmp_path, caplog):
    """Its loader restarts under the new limits; a service started with `exec` keeps the old ones."""
    from gpu_orchestrator.supervisor.allocation import AgentAllocation
    from gpu_orchestrator.supervisor.mps_control import MpsSettings

    def limits(a: float, b_priority: str) -> Config:
        allocations = {"a": AgentAllocation(mps_memory_limit_gb=a), "b": AgentAllocation(1.0, priority=b_priority)}
        return Config(model_store_root=str(tmp_path), model_map_path=str(tmp_path / "map.json"), allocation_path="",
                      clients={"a": ["org/a"], "b": ["org/b"]}, allocations=allocations, enable_mps=True)

    arbiter, segment, clock, spawner = loop({"a": ["org/a"], "b": ["org/b"]})
    arbiter.mps = arbiter.answers.mps = StartingMps()
    arbiter.mps.healthy = arbiter.mps.settled = True
    arbiter.mps.settings = MpsSettings("/tmp/nvidia-mps", "/var/log/nvidia-mps")
    reload_to(arbiter, limits(2.0, "high"))
    running(arbiter, clock)
    caplog.clear()
    reload_to(arbiter, limits(4.0, "low"))  # a's limit, b's priority (which reaches no process)
    warnings = [r.getMessage() for r in caplog.records if "limits changed" in r.getMessage()]
    assert warnings == ["client a's limits changed: restart its service for them to apply "
                        "(systemctl restart '*@a.service'); until then it runs under the old ones "
                        "client=a changed=CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
