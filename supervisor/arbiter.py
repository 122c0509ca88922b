"""The supervisor's main loop, after gunicorn's arbiter.

Signal handlers and HTTP threads only queue and wake the loop through one pipe;
the loop alone spawns, reaps, restarts, kills and sends commands. HTTP threads
read state under `lock` and never start a process.
"""

import dataclasses
import logging
import os
import select
import signal
import threading
import time

import msgspec

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.channel import Segment, SlotReader
from gpu_orchestrator.loaders.logs import kv, relay_line
from gpu_orchestrator.loaders.wire import LOADING, WORKING, LoadCommand, LoaderState, slot_size_for
from gpu_orchestrator.supervisor import status
from gpu_orchestrator.supervisor.clients import LoaderProcess, Policy
from gpu_orchestrator.supervisor.config import Config, ConfigError, reload_config
from gpu_orchestrator.supervisor.launch import client_env, count_gpus, loader_argv, loader_env
from gpu_orchestrator.supervisor.mps import MpsDaemon, MpsSettings
from gpu_orchestrator.supervisor.systemd import Notifier
from gpu_orchestrator.supervisor.telemetry import Owners, Sampler, Telemetry

log = logging.getLogger("supervisor")
loader_log = logging.getLogger("loader")
TICK = 1.0  # heartbeat checks and state promotion need no finer grain
STATUS_REUSE_S = 0.1
SPARE_SLOTS = 16  # room for clients a reload adds, and for replacements of changed ones
MIN_MODELS_PER_SLOT = 32  # so a reload can grow a client; untouched slot pages cost no memory
RELOAD_TIMEOUT = 10.0  # reading the configuration files on SIGHUP; a hung filesystem must not hang reloads
KILLS_TO_FAIL_A_MODEL = 3  # loader deaths while one model was loading before that model is failed, not retried


def create_segment(config: Config) -> Segment:
    largest = max([MIN_MODELS_PER_SLOT, *(len(models) for models in config.clients.values())])
    clients = len(config.clients)
    return Segment.create_for(os.getpid(), slots=clients + max(SPARE_SLOTS, clients),
                              slot_size=slot_size_for(largest))


class PendingReload:
    """A SIGHUP's configuration read, on its own thread: the loop keeps reaping, restarting and
    answering while files are read (a FIFO, a hung network filesystem), and gives up after `timeout`."""

    def __init__(self, read, wake, timeout: float = RELOAD_TIMEOUT):
        self.result: Config | ConfigError | None = None
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self._wake = wake
        threading.Thread(target=self._run, args=(read,), name="reload", daemon=True).start()

    def _run(self, read) -> None:
        try:
            result = read()
        except ConfigError as exc:
            result = exc
        except Exception as exc:  # a reload must never take the running supervisor down
            result = ConfigError(f"reading the configuration failed: {type(exc).__name__}: {exc}")
        self.result = result
        self._wake()

    def outcome(self, now: float) -> Config | ConfigError | None:
        """The new configuration or why not; None while the read may still finish."""
        if self.result is None and now >= self.deadline:
            return ConfigError(f"reading the configuration files took longer than {self.timeout:g} s; "
                               "is one of them on a hung filesystem?")
        return self.result


class Arbiter:
    def __init__(self, config: Config, segment: Segment, policy: Policy = Policy(), server=None,
                 notifier: Notifier | None = None, mps: MpsSettings | None = None, telemetry_interval: float = 2.0):
        self.config = config
        self.segment = segment
        self.policy = policy
        self.server = server
        self.notifier = notifier or Notifier()
        self.mps = MpsDaemon(mps, self.wake) if mps is not None else None
        self.loaders_follow_mps = False  # a daemon came back: replace every loader once slots allow
        self.overcommit_checked = False  # per configuration, once the GPU memory is known
        self.gpu_count = count_gpus()
        self.reader = SlotReader(segment, LoaderState)
        self.sampler = Sampler(telemetry_interval, self.sampler_owners) if config.enable_nvml else None
        self.lock = threading.RLock()  # re-entrant: status_line() is used both inside and outside the loop's lock
        self.free_slots = list(range(segment.slots - 1, -1, -1))  # popped from the end: 0, 1, ...
        self.loaders: dict[str, LoaderProcess] = {}  # made in run(), once MPS is up or known down
        self.retiring: list[LoaderProcess] = []  # removed or replaced by a reload, being stopped
        self.warmup = status.Warmup()
        # Loader deaths while a model was loading, per client and model, and the models failed for
        # them; both forgotten on a refresh or when a reload changes the client.
        self.kills_while_loading: dict[str, dict[str, int]] = {}
        self.failed_by_supervisor: dict[str, dict[str, str]] = {}
        self.pending_reload: PendingReload | None = None
        self.reload_again = False
        self.status_cache: tuple | None = None
        self.settled = True
        self.signals: list[int] = []
        self.stopping = False
        self.closed = False
        self.started = time.time()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def new_loader(self, config: Config, client: str) -> LoaderProcess:
        slot = self.free_slots.pop()
        mps = self.mps_in_force()
        return LoaderProcess(client, slot, loader_argv(config, client, self.segment.name, slot, self.policy),
                             loader_env(config, client, mps, self.gpu_count), self.policy)

    # ---- the loop ----------------------------------------------------------

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self.queue_signal)
        signal.set_wakeup_fd(self.wake_w)
        if self.server is not None:
            threading.Thread(target=self.server.run, name="http", daemon=True).start()
        if self.mps is not None:
            # Before any loader: each must start under the daemon, or known without it.
            self.mps.start(give_up=self.stop_requested)
        with self.lock:
            now = time.monotonic()
            for client in self.config.clients if not self.stop_requested() else ():
                loader = self.loaders[client] = self.new_loader(self.config, client)
                loader.spawn(now)
                log.info(kv("loader started", client=loader.client, pid=loader.pid))
            if self.config.preload and not self.stop_requested():
                self.start_warmup(refresh=False)
        if self.sampler is not None:
            self.sampler.start()  # after the loaders exist, so the first sample can attribute them
        # The socket listens since create_server and the HTTP thread now accepts.
        self.notifier.ready(self.status_line())
        try:
            while not self.stopping:
                self.tick(self.next_timeout())
        finally:
            self.shutdown()

    def queue_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def stop_requested(self) -> bool:
        """A SIGTERM or SIGINT is queued: the loop will stop; start-up need not go on."""
        return any(signum in (signal.SIGTERM, signal.SIGINT) for signum in self.signals)

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"w")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + TICK]
        if self.notifier.watchdog_interval is not None:
            deadlines.append(self.notifier.next_watchdog)
        if self.mps is not None:
            deadlines += [t for t in (self.mps.restart_at, self.mps.start_deadline()) if t is not None]
        if self.pending_reload is not None:
            deadlines.append(self.pending_reload.deadline)
        for loader in self.loaders.values():
            if loader.state == states.BACKOFF:
                deadlines.append(loader.restart_at)
            elif loader.state == states.STARTING:
                deadlines.append(loader.started_at + self.policy.startsecs)
        return max(0.0, min(deadlines) - now)

    def all_loaders(self) -> list[LoaderProcess]:
        return [*self.loaders.values(), *self.retiring]

    def tick(self, timeout: float) -> None:
        streams = [l.proc.stderr for l in self.all_loaders() if l.state in states.ALIVE]
        try:
            select.select([self.wake_r, *streams], [], [], timeout)
        except InterruptedError:
            pass
        self.drain_wake_pipe()
        self.relay_stderr()
        self.handle_signals()
        with self.lock:
            now = time.monotonic()
            self.finish_reload(now)
            self.reap_loaders(now)
            self.supervise_mps(now)
            for loader in self.loaders.values():
                self.observe(loader, now)
                loader.measure_rss()
            self.check_heartbeats(now)
            self.warn_overcommit()
            self.stop_retiring(now)
            self.restart_loaders(now)
            self.send_commands()
            self.note_warmup_end()
            self.notifier.status(self.status_line())
        if self.notifier.watchdog_due(now):
            self.notifier.ping_watchdog(now)

    def drain_wake_pipe(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info(kv("stopping", signal=signal.Signals(signum).name))
                self.stopping = True
            elif signum == signal.SIGHUP:
                self.begin_reload()

    def relay_stderr(self) -> None:
        for loader in self.all_loaders():
            if loader.state in states.ALIVE:
                for line in loader.read_stderr():
                    relay_line(loader_log, line)

    # ---- loader lifecycle (called with the lock held) ------------------------

    def reap_loaders(self, now: float) -> None:
        # waitpid per known pid, not waitpid(-1): a -1 would also reap children that
        # other threads started with subprocess and leave them unable to read a status.
        for loader in self.all_loaders():
            if loader.state not in states.ALIVE:
                continue
            pid, wait_status = os.waitpid(loader.proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            for line in loader.read_stderr():
                relay_line(loader_log, line)
            loading = []
            if loader.state != states.STOPPING:
                self.observe(loader, now)  # what it achieved before dying decides how it is judged
                loading = self.models_loading(loader)
            loader.exited(wait_status, now)
            self.count_kills_while_loading(loader, loading)
            level = logging.INFO if loader.state == states.STOPPED else logging.ERROR
            log.log(level, kv("loader exited", client=loader.client, pid=pid, how=loader.last_exit,
                              next=loader.state, restart_in_s=round(max(0.0, loader.restart_at - now), 2)
                              if loader.state == states.BACKOFF else "-", reason=loader.fatal_reason or "-"))
        for loader in [l for l in self.retiring if l.state == states.STOPPED]:
            self.retiring.remove(loader)
            self.free_slots.append(loader.slot)

    def supervise_mps(self, now: float) -> None:
        """Restart a dead or hung daemon with backoff; loaders follow it (their MPS clients die with it)."""
        if self.mps is None:
            return
        self.mps.reap(now)
        self.mps.check_health(now)
        self.mps.restart_if_due(now)
        if self.mps.advance_start(now):
            self.loaders_follow_mps = True
        # Replacing every loader needs a free slot for each; retiring ones free theirs within stop_grace.
        if self.loaders_follow_mps and len(self.free_slots) >= len(self.loaders):
            self.loaders_follow_mps = False
            self.replace_loaders(list(self.loaders), now, "the MPS control daemon restarted")

    def replace_loaders(self, clients: list[str], now: float, reason: str) -> None:
        """Stop these clients' loaders and start fresh ones (new environment, new slot)."""
        for client in clients:
            self.retire(self.loaders.pop(client), now)
            loader = self.loaders[client] = self.new_loader(self.config, client)
            loader.spawn(now)
            log.info(kv("loader started", client=client, pid=loader.pid, reason=reason))
        if clients:
            self.settled = False

    def models_loading(self, loader: LoaderProcess) -> list[str]:
        """The models this live loader says it is loading right now."""
        published = self.published(loader)
        if published is None or published.phase != WORKING:
            return []
        return [m.model for m in published.models if m.status == LOADING]

    def count_kills_while_loading(self, loader: LoaderProcess, models: list[str]) -> None:
        """A model whose load keeps killing its loader (a check past the heartbeat, the OOM killer,
        a crash in a framework) is failed with the reason, instead of killing it forever."""
        for model in models:
            counts = self.kills_while_loading.setdefault(loader.client, {})
            counts[model] = counts.get(model, 0) + 1
            if counts[model] < KILLS_TO_FAIL_A_MODEL:
                continue
            reason = (f"its loader died {counts[model]} times while loading it; the last run {loader.last_exit} "
                      f"at {loader.last_exit_at}. Not tried again until POST /models/preload "
                      '{"refresh": true} or a reload that changes this client')
            self.failed_by_supervisor.setdefault(loader.client, {})[model] = reason
            log.error(kv("model failed: it keeps killing its loader", client=loader.client, model=model,
                         deaths=counts[model]))

    def forget_kills(self, clients) -> None:
        for client in clients:
            self.kills_while_loading.pop(client, None)
            self.failed_by_supervisor.pop(client, None)

    def check_heartbeats(self, now: float) -> None:
        for loader in self.loaders.values():
            if loader.state != states.RUNNING or loader.kill_reason is not None:
                continue  # killed already: a large process can take a few ticks to be reaped
            published = self.published(loader)
            idle = loader.idle_for(published.heartbeat if published is not None else None, now, loader.cpu_seconds)
            if idle > self.policy.heartbeat_timeout:
                log.error(kv("loader heartbeat lost; killing it", client=loader.client, pid=loader.pid,
                             silent_s=round(idle, 1)))
                loader.kill(f"heartbeat lost: silent for {idle:.1f} s")

    def restart_loaders(self, now: float) -> None:
        for loader in self.loaders.values():
            if loader.state == states.BACKOFF and now >= loader.restart_at:
                loader.spawn(now)
                loader.restarts += 1
                log.info(kv("loader restarted", client=loader.client, pid=loader.pid, restarts=loader.restarts))

    def send_commands(self) -> None:
        generation = self.warmup.generation
        if generation == 0:
            return
        for loader in self.loaders.values():
            if loader.state in (states.STARTING, states.RUNNING) and loader.sent_generation < generation:
                command = LoadCommand(generation, self.warmup.refresh,
                                      failed=self.failed_by_supervisor.get(loader.client, {}))
                if loader.send(msgspec.json.encode(command) + b"\n"):
                    loader.sent_generation = generation

    def note_warmup_end(self) -> None:
        if self.warmup.generation == 0:
            return
        current = self.compose_status()[0]
        if current["in_progress"]:
            self.settled = False
            return
        if not self.settled:
            self.settled = True
            self.warmup = dataclasses.replace(self.warmup, finished_at=time.time())
            summary = current["summary"]
            log.info(kv("warm-up finished", generation=self.warmup.generation, all_ready=current["all_ready"],
                        done=summary["done"], failed=summary["failed"], total=summary["total"],
                        seconds=round(self.warmup.finished_at - self.warmup.started_at, 3)))

    def retire(self, loader: LoaderProcess, now: float) -> None:
        """Stop a loader the configuration no longer wants; the loop reaps it and frees its slot."""
        if loader.state in (states.STARTING, states.RUNNING):
            loader.to(states.STOPPING)
            loader.signal(signal.SIGTERM)
            loader.stop_deadline = now + self.policy.stop_grace
            self.retiring.append(loader)
            return
        if loader.state in (states.BACKOFF, states.FATAL):
            loader.to(states.STOPPED)
        self.free_slots.append(loader.slot)

    def stop_retiring(self, now: float) -> None:
        for loader in self.retiring:
            if loader.state == states.STOPPING and now >= loader.stop_deadline:
                log.warning(kv("loader did not stop in time; killing it", client=loader.client, pid=loader.pid))
                loader.signal(signal.SIGKILL)
                loader.stop_deadline = float("inf")

    def begin_reload(self) -> None:
        """SIGHUP: read the files off the loop; finish_reload applies them. A SIGHUP during a
        read is served by one more read once this one ends, so the newest files always win."""
        if self.pending_reload is not None:
            self.reload_again = True
            return
        self.notifier.reloading()
        config = self.config
        self.pending_reload = PendingReload(lambda: reload_config(config), self.wake)

    def finish_reload(self, now: float) -> None:
        """Start new clients, stop removed ones, restart changed ones, keep the rest. Lock held."""
        outcome = self.pending_reload.outcome(now) if self.pending_reload is not None else None
        if outcome is None:
            return
        self.pending_reload = None
        try:
            if isinstance(outcome, ConfigError):
                raise outcome
            changes = self.apply_config(outcome, now)
        except ConfigError as exc:
            log.error(kv("reload refused; the running configuration stays", error=exc))
        else:
            for warning in outcome.warnings:
                log.warning(warning)
            log.info(kv("reloaded", **{k: ",".join(v) or "-" for k, v in changes.items()}))
        self.notifier.ready(self.status_line())
        if self.reload_again:
            self.reload_again = False
            self.begin_reload()

    def warn_overcommit(self) -> None:
        """Once per configuration, judged as /mps/allocation judges it: per GPU against what the
        first NVML sample found, else against the configured total. Over-commit is flagged, never refused."""
        if self.overcommit_checked:
            return
        telemetry = self.telemetry()
        if self.sampler is not None and telemetry is None:
            return  # the first sample is on its way
        self.overcommit_checked = True
        summary = status.allocation_summary(self.config, status.gpu_memory_present(telemetry))
        for fields in status.overcommit_warnings(summary):
            log.warning(kv("MPS allocations over-commit the GPU memory; clients may run out of memory", **fields))
        for client, devices in summary.get("devices_not_present", {}).items():
            log.warning(kv("client is pinned to GPUs NVML does not see; it will find no such device", client=client,
                           devices=",".join(map(str, devices))))

    def apply_config(self, new: Config, now: float) -> dict[str, list[str]]:
        old = self.config
        added = [c for c in new.clients if c not in old.clients]
        removed = [c for c in old.clients if c not in new.clients]
        changed = [c for c in new.clients if c in old.clients and (
            new.clients[c] != old.clients[c] or new.allocations.get(c) != old.allocations.get(c))]
        largest = max((len(new.clients[c]) for c in added + changed), default=0)
        if slot_size_for(largest) > self.segment.slot_size:
            raise ConfigError(f"{new.model_map_path}: a client now has {largest} models, more than the shared-memory "
                              "channel was sized for at start; restart the service to apply this map")
        if len(added) + len(changed) > len(self.free_slots):
            raise ConfigError(f"{new.model_map_path}: {len(added) + len(changed)} new or changed clients exceed the "
                              f"{len(self.free_slots)} free channel slots; restart the service to apply this map")
        for client in removed:
            self.retire(self.loaders.pop(client), now)
        self.forget_kills(removed + changed)
        self.config = new
        self.overcommit_checked = False
        self.replace_loaders(changed, now, "its configuration changed")
        for client in added:
            loader = self.loaders[client] = self.new_loader(new, client)
            loader.spawn(now)
            log.info(kv("loader started", client=client, pid=loader.pid, reason="added"))
        if added:
            self.settled = False
        self.wake()
        return {"added": added, "removed": removed, "changed": changed}

    def status_line(self) -> str:
        """systemd's STATUS=: what `systemctl status` shows an operator at a glance."""
        with self.lock:
            current = self.compose_status()[0]
        clients = current["clients"]
        ready = sum(c["ready"] for c in clients.values())
        failed = sorted(name for name, c in clients.items() if any(m["status"] == "failed" for m in c["models"]))
        line = f"{ready}/{len(clients)} clients ready"
        if self.warmup.generation == 0:
            return f"{line}; no warm-up requested yet"
        if current["in_progress"]:
            summary = current["summary"]
            line = f"warming up: {line}, {summary['done']}/{summary['total']} models"
        if failed:
            line += f", {len(failed)} failed: {','.join(failed)}"
        if self.mps is not None and not self.mps.healthy:
            line += "; MPS down"
        return line

    def start_warmup(self, refresh: bool) -> None:
        """Begin a new generation; the loop sends it to every loader. Lock held."""
        self.warmup = status.Warmup(self.warmup.generation + 1, refresh, time.time(), None)
        self.settled = False
        if refresh:
            self.forget_kills(list(self.config.clients))
            for loader in self.loaders.values():
                if loader.state == states.FATAL:
                    loader.reset()
                    loader.to(states.BACKOFF)
                    loader.restart_at = time.monotonic()
        log.info(kv("warm-up started", generation=self.warmup.generation, refresh=refresh))
        self.wake()

    def observe(self, loader: LoaderProcess, now: float) -> None:
        """Promote a loader that has been up `startsecs` or finished a warm-up; a finished
        warm-up also proves it healthy, so its next death restarts at the shortest delay."""
        finished = self.finished_warmup(loader)
        if loader.promote_if_started(now, finished):
            log.info(kv("loader running", client=loader.client, pid=loader.pid))
        if finished:
            loader.deaths.clear()
            # A whole warm-up went through: earlier deaths say nothing about its models any more
            # (models already failed for them stay failed until a refresh).
            self.kills_while_loading.pop(loader.client, None)

    def finished_warmup(self, loader: LoaderProcess) -> bool:
        return status.finished(self.published(loader), self.warmup.generation)

    def published(self, loader: LoaderProcess) -> LoaderState | None:
        """The loader's slot, only if the live process wrote it."""
        if loader.pid is None:
            return None
        message = self.reader.read(loader.slot)
        return message if message is not None and message.pid == loader.pid else None

    def sampler_owners(self) -> Owners:
        """For the sampler thread: which pid is whose loader, the MPS servers, the clients and their limits."""
        with self.lock:
            loaders = {l.pid: l.client for l in self.loaders.values() if l.pid is not None}
            config = self.config
        report = self.mps_report()
        return Owners(loaders, report["servers"] if report else [], tuple(config.clients),
                      {c: config.memory_limit_bytes(c) for c in config.clients}, config.service_pattern)

    def telemetry(self) -> Telemetry | None:
        """The sampler's last snapshot (any thread: the sampler guards it)."""
        return self.sampler.snapshot()[1] if self.sampler is not None else None

    def client_views(self) -> list[status.ClientView]:
        """Every configured client, those whose loader is not started yet included: while start-up
        waits for the MPS daemon there are no loaders, and a status without their clients would
        read as all ready."""
        telemetry = self.telemetry()
        gpu_memory = telemetry.clients if telemetry is not None and telemetry.nvml_supported else None
        views = [
            status.ClientView(
                client=loader.client, models=self.config.clients[loader.client], state=loader.state,
                pid=loader.pid, restarts=loader.restarts, last_exit=loader.last_exit,
                fatal_reason=loader.fatal_reason,
                memory_limit_bytes=self.config.memory_limit_bytes(loader.client),
                published=self.published(loader),
                gpu_memory_bytes=gpu_memory.get(loader.client, 0) if gpu_memory is not None else None,
                rss_bytes=loader.rss_bytes if loader.pid is not None else None)
            for loader in self.loaders.values()
        ]
        return views + [
            status.ClientView(client=client, models=models, state=states.STOPPED, pid=None, restarts=0,
                              last_exit=None, fatal_reason=None, memory_limit_bytes=self.config.memory_limit_bytes(client),
                              published=None)
            for client, models in self.config.clients.items() if client not in self.loaders
        ]

    # ---- shutdown ------------------------------------------------------------

    def shutdown(self) -> None:
        """TERM every loader, wait out the grace period, KILL what lingers, free the segment."""
        self.notifier.stopping()
        with self.lock:
            now = time.monotonic()
            for loader in self.loaders.values():
                if loader.state in (states.STARTING, states.RUNNING):
                    loader.to(states.STOPPING)
                    loader.signal(signal.SIGTERM)
                elif loader.state in (states.BACKOFF, states.FATAL):
                    loader.to(states.STOPPED)
            deadline = now + self.policy.stop_grace
            while any(l.state == states.STOPPING for l in self.all_loaders()):
                self.reap_loaders(time.monotonic())
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            for loader in self.all_loaders():
                if loader.state == states.STOPPING:
                    log.warning(kv("loader did not stop in time; killing it", client=loader.client, pid=loader.pid))
                    loader.signal(signal.SIGKILL)
                    _, wait_status = os.waitpid(loader.proc.pid, 0)
                    loader.exited(wait_status, time.monotonic())
            self.closed = True
            if self.sampler is not None:
                self.sampler.stop()
            self.segment.close()
        if self.mps is not None:
            self.mps.stop(self.policy.stop_grace)
        log.info(kv("stopped"))

    # ---- what the HTTP app asks (any thread) ---------------------------------

    def models_status(self) -> dict:
        with self.lock:
            self.check_open()
            return self.compose_status()[0]

    def models_status_json(self) -> bytes:
        with self.lock:
            self.check_open()
            return self.compose_status()[1]

    def compose_status(self) -> tuple[dict, bytes]:
        """/models/status as a dict and as JSON: the warm-up, each client, MPS. Lock held.

        Composing it is most of a status request's cost, so it is reused while nothing it
        depends on has changed: no slot written, no loader record changed, the same warm-up
        and MPS state, and at most STATUS_REUSE_S old (ages in it are that stale at most).
        """
        report = self.mps_report() or status.mps_disabled(self.config)
        mps = {key: report[key] for key in ("enabled", "managed", "restarts", "error")}
        key = (self.warmup, tuple(mps.values()), int(time.monotonic() / STATUS_REUSE_S),
               self.sampler.snapshot()[0] if self.sampler is not None else 0,
               tuple((l.client, l.state, l.pid, l.restarts, l.last_exit, l.fatal_reason, l.rss_bytes,
                      self.reader.peek(l.slot)) for l in self.loaders.values()))
        if self.status_cache is None or self.status_cache[0] != key:
            current = {**status.models_status(self.client_views(), self.warmup), "mps": mps}
            self.status_cache = (key, current, msgspec.json.encode(current))
        return self.status_cache[1], self.status_cache[2]

    def request_preload(self, refresh: bool) -> tuple[int, dict]:
        """202 when a warm-up starts or runs; 200 if all ready; 503 if the last one failed."""
        with self.lock:
            self.check_open()
            current = self.compose_status()[0]
            if current["in_progress"]:
                return 202, {"started": False, **current}
            if not refresh and self.warmup.generation > 0:
                if current["all_ready"]:
                    return 200, {"started": False, **current}
                if current["summary"]["failed"]:
                    return 503, {"started": False, **current}
            self.start_warmup(refresh)
            return 202, {"started": True, **self.compose_status()[0]}

    def health(self) -> dict:
        with self.lock:
            counts: dict[str, int] = {}
            for loader in self.loaders.values():
                counts[loader.state] = counts.get(loader.state, 0) + 1
            return {"status": "stopping" if self.stopping else "ok", "service": "gpu-orchestrator",
                    "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
                    "clients": len(self.loaders), "loaders": counts}

    def gpu_info(self) -> dict:
        with self.lock:
            self.check_open()
            telemetry = self.telemetry()
        return status.gpu_info(self.config, self.mps_report(), telemetry)

    def mps_in_force(self) -> MpsSettings | None:
        """The daemon's settings when loaders started now get MPS limits, else None."""
        return self.mps.settings if self.mps is not None and self.mps.healthy else None

    def mps_report(self) -> dict | None:
        return self.mps.report() if self.mps is not None else None

    def mps_allocation(self) -> dict:
        with self.lock:
            self.check_open()
            telemetry = self.telemetry()
        return status.mps_allocation(self.config, telemetry)

    def client_environment(self, client: str) -> dict:
        """What `gpu-orchestrator env` and `exec` hand a client's service: the variables its loader
        runs with now (after reloads, with MPS in force or not), and whether MPS is in force."""
        with self.lock:
            self.check_open()
            if client not in self.config.clients:
                raise UnknownClient(client, sorted(self.config.clients))
            config = self.config
        mps = self.mps_report() or status.mps_disabled(config)
        settings = self.mps.settings if mps["enabled"] else None  # the same reading as mps_error
        return {"client": client, "mps_configured": config.enable_mps, "mps_in_force": settings is not None,
                "mps_error": mps["error"], "environment": client_env(config, client, settings, self.gpu_count)}

    def check_open(self) -> None:
        if self.closed:
            raise ShuttingDown()


class UnknownClient(KeyError):
    """A client name the running configuration does not have; the HTTP layer answers 404."""

    def __init__(self, client: str, known: list[str]):
        super().__init__(client)
        self.client, self.known = client, known

    def __str__(self) -> str:
        return f"no client {self.client!r} in the model map; clients: {', '.join(self.known) or 'none'}"


class ShuttingDown(Exception):
    """The supervisor has released its state; the HTTP layer answers 503."""
