"""The supervisor's main loop, after gunicorn's arbiter.

Signal handlers and HTTP threads only queue and wake the loop through one pipe; the loop alone
spawns, reaps, restarts, kills and sends commands, and after each step publishes the snapshot
HTTP answers read (answers.py). Warm-ups live in warmup.py, the channel's slots in slots.py,
reload reading and diffing in reload.py, the MPS daemon in mps.py.
"""

import logging
import signal
import threading
import time

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.channel import Segment, SlotReader
from gpu_orchestrator.loaders.logs import kv
from gpu_orchestrator.loaders.wire import LoaderState
from gpu_orchestrator.supervisor import status
from gpu_orchestrator.supervisor.answers import Answers
from gpu_orchestrator.supervisor.clients import LoaderProcess, Policy
from gpu_orchestrator.supervisor.config import Config
from gpu_orchestrator.supervisor.launch import count_gpus, loader_argv, loader_env
from gpu_orchestrator.supervisor.mps import MpsDaemon
from gpu_orchestrator.supervisor.mps_control import MpsSettings
from gpu_orchestrator.supervisor.processes import PROCESSES, Spawner, Streams
from gpu_orchestrator.supervisor.reload import Reloads, plan
from gpu_orchestrator.supervisor.slots import FreeSlots
from gpu_orchestrator.supervisor.systemd import Notifier
from gpu_orchestrator.supervisor.telemetry import Sampler
from gpu_orchestrator.supervisor.warmup import Warmups, finished, preload_answer

log = logging.getLogger("supervisor")
loader_log = logging.getLogger("loader")
TICK = 1.0  # the longest the loop sleeps; what is due sooner (promotion, backoff, MPS) sets its own deadline
# Per loader at a cadence, not every tick, so that an idle tick costs by what changed, not by the clients:
RSS_REFRESH_S = 10.0  # rss_bytes in /models/status is at most this old (also taken as a loader turns RUNNING)
HEARTBEAT_CHECKS = 6  # per heartbeat_timeout: a silent loader is killed within 7/6 of the timeout
REAP_SWEEP_S = 5.0  # waitpid for every loader; SIGCHLD or a loader's stderr closing reaps at once
KILL_WAIT_S = 5.0  # at shutdown, past stop_grace: how long KILLed loaders may take to be reaped
QUEUED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # held from start-up until the loop queues them


class Arbiter:
    def __init__(self, config: Config, segment: Segment, policy: Policy = Policy(), server=None,
                 notifier: Notifier | None = None, mps: MpsSettings | None = None, telemetry_interval: float = 2.0,
                 spawner: Spawner = PROCESSES, clock=time.monotonic):
        self.config, self.segment, self.policy, self.server = config, segment, policy, server
        self.notifier = notifier or Notifier()
        self.spawner, self.clock = spawner, clock
        self.streams = Streams()  # what the loop waits on, its wake pipe included
        self.wake = self.streams.wake
        self.readable: list[LoaderProcess] = []  # loaders whose stderr has something, from the last wait
        self.mps = MpsDaemon(mps, self.wake) if mps is not None else None
        self.overcommit_checked = False  # per configuration, once the GPU memory is known
        self.gpu_count = count_gpus()
        self.reader = SlotReader(segment, LoaderState)
        self.sampler = Sampler(telemetry_interval, lambda: self.answers.sampler_owners()) if config.enable_nvml else None
        self.free_slots = FreeSlots(segment.slots)
        self.loaders: dict[str, LoaderProcess] = {}  # made once MPS is up or known down
        self.retiring: list[LoaderProcess] = []  # removed or replaced by a reload, being stopped
        self.warmups = Warmups()
        self.reloads = Reloads(self.wake, clock)
        self.answers = Answers(config, segment, self.wake, self.mps, self.sampler, self.gpu_count)
        self.booted = False  # the configured loaders were started
        self.signals: list[int] = []
        self.stopping = False
        self.reap_due = True  # a child exited (SIGCHLD) or a loader's stderr closed
        self.next_due: dict[str, float] = {}  # what runs at a cadence -> when it is due next
        self.changed, self.last_mps_down = True, False  # since the warm-up and STATUS= were last judged

    # ---- the loop ----------------------------------------------------------

    def run(self) -> None:
        for signum in (*QUEUED_SIGNALS, signal.SIGCHLD):
            signal.signal(signum, self.queue_signal)
        signal.set_wakeup_fd(self.streams.wake_w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, QUEUED_SIGNALS)  # what came while starting (daemon.serve)
        if self.server is not None:
            threading.Thread(target=self.server.run, name="http", daemon=True).start()
        if self.mps is not None:
            self.mps.begin_start(self.clock())  # loaders start once it answers or is known down
        try:
            self.step()
            while not self.stopping:
                self.tick(self.next_timeout())
        finally:
            self.shutdown()

    def queue_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def next_timeout(self) -> float:
        now = self.clock()
        deadlines = [now + TICK, self.mps and self.mps.next_deadline(), self.reloads.deadline(),
                     *self.next_due.values(), *(loader.deadline() for loader in self.loaders.values())]
        if self.notifier.watchdog_interval is not None:
            deadlines.append(self.notifier.next_watchdog)
        return max(0.0, min(d for d in deadlines if d is not None) - now)

    def all_loaders(self) -> list[LoaderProcess]:
        return [*self.loaders.values(), *self.retiring]

    def tick(self, timeout: float) -> None:
        """Wait for a signal, a wake-up, a loader's output or `timeout`; then do one step."""
        self.readable = self.streams.wait(timeout)
        self.step()

    def due(self, name: str, now: float, every: float) -> bool:
        """Whether `name`, done every `every` s, is due now (then again `every` s on); see next_timeout."""
        if now < self.next_due.get(name, now):
            return False
        self.next_due[name] = now + every
        return True

    def step(self) -> None:
        self.streams.drain()
        self.relay_stderr()
        self.handle_signals()
        now = self.clock()
        self.finish_reload(now)
        if self.reap_due or self.due("reap", now, REAP_SWEEP_S):
            self.reap_due = False
            self.reap_loaders(now)
        self.supervise_mps(now)
        self.start_loaders(now)
        for loader in self.loaders.values():
            self.observe(loader, now)
        for loader in self.loaders.values() if self.due("rss", now, RSS_REFRESH_S) else ():
            loader.measure_rss()
        if self.due("heartbeats", now, self.policy.heartbeat_timeout / HEARTBEAT_CHECKS):
            self.check_heartbeats(now)
        self.warn_overcommit()
        self.kill_overdue(now)
        self.restart_loaders(now)
        self.publish()
        self.send_commands()
        self.serve_commands()  # a warm-up started here goes out next step: the asker wakes us with its answer
        self.publish()
        mps_down = self.mps is not None and not self.mps.healthy
        if self.changed or mps_down != self.last_mps_down:  # composing costs by the clients: only then
            self.warmups.note_progress(self.answers.compose(fresh=True).top)
            self.notifier.status(self.status_line())  # publishes what note_progress changed first
            self.changed, self.last_mps_down = False, mps_down
        if self.notifier.watchdog_due(now):
            self.notifier.ping_watchdog(now)

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                self.reap_due = True
            elif signum in (signal.SIGTERM, signal.SIGINT):
                log.info(kv("stopping", signal=signal.Signals(signum).name))
                self.stopping = True
            elif signum == signal.SIGHUP and self.reloads.begin(self.config):
                self.notifier.reloading()

    def relay_stderr(self) -> None:
        """Only the loaders the last wait found something from; a closed stderr means an exit to reap."""
        readable, self.readable = self.readable, []
        for loader in readable:
            if loader.state in states.ALIVE and loader.relay_stderr(loader_log):  # at its end
                self.streams.unwatch(loader)  # else the loop would wake for it until it is reaped
                self.reap_due = True

    def publish(self) -> None:
        """Hand HTTP threads what they may read, as one reference swap (only when it changed)."""
        if self.answers.publish_loop(self.config, self.loaders.values(), self.warmups.current, self.stopping):
            self.changed = True

    def serve_commands(self) -> None:
        """Answer what HTTP threads queued (see answers.Answers.ask)."""
        while not self.answers.commands.empty():
            command = self.answers.commands.get_nowait()
            if command.cancelled:  # its asker was told the loop did not answer: do not act on it now
                continue
            try:
                command.finish(getattr(self, f"command_{command.name}")(*command.args))
            except Exception as exc:  # the asking thread re-raises it; the loop goes on
                command.finish(error=exc)

    def command_preload(self, refresh: bool) -> tuple[int, dict]:
        """202 when a warm-up starts or runs; 200 if all ready; 503 if the last one failed."""
        answer = preload_answer(self.answers.compose(fresh=True).current, self.warmups.generation, refresh)
        if answer is not None:
            return answer
        self.start_warmup(refresh)
        self.publish()
        return 202, {"started": True, **self.answers.compose(fresh=True).current}

    # ---- loaders -------------------------------------------------------------

    def start_loaders(self, now: float) -> None:
        """Once, when MPS is up or known down: each loader starts under the daemon, or known without it."""
        if self.booted or self.stopping or (self.mps is not None and not self.mps.settled):
            return
        self.booted = True
        self.spawn_loaders([(self.new_loader(client), None) for client in self.config.clients])
        if self.config.preload and self.warmups.generation == 0:
            self.start_warmup(refresh=False)
        self.publish()
        if self.sampler is not None:
            self.sampler.start()  # after the loaders are published, so the first sample can attribute them
        self.notifier.ready(self.status_line())  # the socket listens since create_server

    def new_loader(self, client: str) -> LoaderProcess:
        slot = self.free_slots.take()
        return LoaderProcess(client, slot, *self.launch(client, slot), self.policy, spawner=self.spawner)

    def launch(self, client: str, slot: int) -> tuple[list[str], dict[str, str]]:
        """A loader's arguments and environment, under the configuration and MPS daemon in force now."""
        return (loader_argv(self.config, client, self.segment.name, slot, self.policy),
                loader_env(self.config, client, self.mps and self.mps.settings_in_force(), self.gpu_count))

    def spawn_loaders(self, starts: list[tuple[LoaderProcess, str | None]]) -> None:
        """Start these loaders (each with why, if not the boot), none waiting on another's start
        (Spawner.popen_all); each run is dated from when its own popen returned, not from the step."""
        requests = [(loader.command(), loader.env) for loader, _ in starts]
        for (loader, reason), (proc, born) in zip(starts, self.spawner.popen_all(requests, self.clock)):
            self.loaders[loader.client] = loader
            loader.begin(proc, born)
            self.began(loader, born, "loader started", **({"reason": reason} if reason else {}))

    def began(self, loader: LoaderProcess, now: float, message: str, **fields) -> None:
        """Watch a run that started; one that could not start is a failed start (LoaderProcess.begin)."""
        if loader.state != states.STARTING:
            return loader.log_end("loader could not be started", None, now)
        self.streams.watch(loader)
        log.info(kv(message, client=loader.client, pid=loader.pid, **fields))

    def reap_loaders(self, now: float) -> None:
        for loader in self.all_loaders():
            if loader.state in states.ALIVE and (wait_status := loader.reap()) is not None:
                self.judge_exit(loader, wait_status, now)
        for loader in [l for l in self.retiring if l.state == states.STOPPED]:
            self.retiring.remove(loader)
            self.free_slots.give_back(loader.slot)

    def judge_exit(self, loader: LoaderProcess, wait_status: int, now: float) -> None:
        self.streams.unwatch(loader)
        loader.relay_stderr(loader_log)
        pid, loading = loader.pid, []
        if loader.state != states.STOPPING:
            self.observe(loader, now)  # what it achieved before dying decides how it is judged
            loading = loader.models_loading(self.reader)
        loader.exited(wait_status, now)
        self.warmups.count_kills(loader.client, loading, loader.last_exit, loader.last_exit_at)
        loader.log_end("loader exited", pid, now)

    def supervise_mps(self, now: float) -> None:
        """Restart a dead or hung daemon with backoff; loaders follow it (their MPS clients die with it)."""
        if self.mps is not None and self.mps.supervise(now) and self.booted:
            log.warning(kv("replacing every loader under the new MPS control daemon", loaders=len(self.loaders)))
            self.replace_loaders(list(self.loaders), now, "the MPS control daemon restarted")

    def replace_loaders(self, clients: list[str], now: float, reason: str, added: list[str] = ()) -> None:
        """Stop these clients' loaders and start fresh ones (new arguments and environment): beside the
        old run in a free slot, so neither waits on the other; in its own slot once it exits when none is.
        `added` clients start too, taking their free slots first (only they need one). What HTTP serves
        is published before the spawns, which take seconds for many: never the stopped runs as ready."""
        starts = [(self.new_loader(client), "added") for client in added]
        for client in clients:
            loader = self.loaders[client]
            if loader.state in states.ALIVE and not self.free_slots:
                loader.restart_in_place(*self.launch(client, loader.slot), now, reason)
            else:
                self.retire(self.loaders.pop(client), now)  # a dead one gives its slot back at once
                starts.append((self.new_loader(client), reason))
        if clients or added:
            self.warmups.reopen()
        self.publish()
        self.spawn_loaders(starts)

    def check_heartbeats(self, now: float) -> None:
        for loader in self.loaders.values():
            loader.kill_if_silent(self.reader, now)

    def restart_loaders(self, now: float) -> None:
        if self.stopping:  # a SIGTERM handled this very step: shutdown() would only stop it again
            return
        for loader in self.loaders.values():
            if (born := loader.restart_if_due(now, self.clock)) is not None:
                self.began(loader, born, "loader restarted", restarts=loader.restarts)
            elif (again := loader.start_again_if_stopped(self.clock)) is not None:
                self.began(loader, again[1], "loader started in its own slot", reason=again[0])

    def send_commands(self) -> None:
        generation = self.warmups.generation
        if generation == 0:
            return
        for loader in self.loaders.values():
            if loader.state in (states.STARTING, states.RUNNING) and loader.sent_generation < generation:
                if loader.send(self.warmups.command_for(loader.client)):
                    loader.sent_generation = generation

    def start_warmup(self, refresh: bool) -> None:
        """Begin a new generation; send_commands hands it to every loader. A refresh also gives
        FATAL loaders another try, at once."""
        self.warmups.start(refresh, list(self.config.clients))
        for loader in self.loaders.values() if refresh else ():
            loader.retry_if_fatal(self.clock())

    def observe(self, loader: LoaderProcess, now: float) -> None:
        """Promote a loader that has been up `startsecs` or finished a warm-up; a finished
        warm-up also proves it healthy, so its next death restarts at the shortest delay. Only
        a loader with news is looked at (see LoaderProcess.has_news): an idle tick costs little;
        never one being stopped to start again (restart_in_place): its successor has the warm-up to do."""
        generation = self.warmups.generation
        if loader.state == states.STOPPING or (news := loader.has_news(self.reader, generation)) is None:
            return
        self.changed |= news
        done = finished(loader.published(self.reader), generation)
        if loader.promote_if_started(now, done):
            log.info(kv("loader running", client=loader.client, pid=loader.pid))
            loader.measure_rss()
        if done:
            if loader.finished_generation != generation:
                loader.measure_rss()  # what it holds with its models loaded
            loader.finished_generation = generation
            loader.deaths.clear()
            self.warmups.loader_finished(loader.client)

    # ---- stopping loaders: one way, for reloads and for shutdown ---------------

    def retire(self, loader: LoaderProcess, now: float) -> None:
        """Stop a loader the configuration no longer wants; the loop reaps it and frees its slot."""
        loader.stop_or_end(now)
        if loader.state == states.STOPPING:
            self.retiring.append(loader)
        else:
            self.free_slots.give_back(loader.slot)

    def kill_overdue(self, now: float) -> None:
        for loader in self.all_loaders():
            if loader.kill_if_overdue(now):
                log.warning(kv("loader did not stop in time; killed it", client=loader.client, pid=loader.pid))

    def shutdown(self) -> None:
        """Stop every loader as a reload would, wait for them, free the segment, quit MPS."""
        self.notifier.stopping()
        self.stopping = True
        self.answers.stop_taking_commands()  # a preload now is answered 503 at once, not after the grace
        for loader in self.loaders.values():
            loader.stop_or_end(self.clock())
        self.publish()
        give_up = time.monotonic() + self.policy.stop_grace + KILL_WAIT_S
        while any(l.state == states.STOPPING for l in self.all_loaders()):
            if time.monotonic() >= give_up:
                log.error(kv("loaders survived SIGKILL; leaving them",
                             pids=[l.pid for l in self.all_loaders() if l.state == states.STOPPING]))
                break
            time.sleep(0.05)
            self.reap_loaders(self.clock())
            self.kill_overdue(self.clock())
        self.answers.close()
        self.streams.close()
        if self.sampler is not None:
            self.sampler.stop()
        self.segment.close()
        if self.mps is not None:
            self.mps.stop(self.policy.stop_grace)
        log.info(kv("stopped"))

    # ---- reloads -------------------------------------------------------------

    def finish_reload(self, now: float) -> None:
        """Start new clients, stop removed ones, restart changed ones, keep the rest."""
        if not self.reloads.finish(now, lambda new: self.apply_config(new, now)):
            return
        # Before boot the loaders are not started: READY=1 comes once they are (start_loaders).
        (self.notifier.ready if self.booted else self.notifier.status)(self.status_line())
        if self.reloads.take_again() and self.reloads.begin(self.config):
            self.notifier.reloading()

    def apply_config(self, new: Config, now: float):
        changes = plan(self.config, new, self.segment, self.free_slots, self.loaders.keys(),
                       self.mps and self.mps.settings, self.gpu_count)
        for client in changes.removed if self.booted else ():
            self.retire(self.loaders.pop(client), now)
        self.warmups.forget_kills(changes.removed + changes.changed)
        self.config = new
        self.overcommit_checked = False
        if self.booted:  # else start_loaders starts the new configuration's clients
            self.replace_loaders(changes.changed, now, "its configuration changed", added=changes.added)
        self.wake()
        return changes

    def warn_overcommit(self) -> None:
        """Once per configuration, as soon as the first NVML sample is in (when NVML is on)."""
        telemetry = self.answers.telemetry()
        if self.overcommit_checked or (self.sampler is not None and telemetry is None):
            return
        self.overcommit_checked = True
        for message, fields in status.overcommit_findings(self.config, telemetry):
            log.warning(kv(message, **fields))

    def status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status` shows an operator at a glance."""
        self.publish()
        return self.answers.status_line(self.warmups.generation, self.mps is not None and not self.mps.healthy)
