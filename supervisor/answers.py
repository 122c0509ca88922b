"""What the HTTP threads are answered from: the `source` handed to create_app.

The loop alone changes state. After each tick it publishes a `Snapshot` (one reference swap) of
what the answers need; GET answers read that snapshot, the shared-memory slots (read-only) and
the sampler's and MPS probe's own lock-guarded records, and never touch the loop's objects. A
request that must change something (POST /models/preload) becomes a `Command` on a queue the loop
serves; the HTTP thread waits for the loop's answer, at most LOOP_ANSWER_S.
"""

import functools
import operator
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.channel import Segment, SlotReader
from gpu_orchestrator.loaders.wire import LoaderState
from gpu_orchestrator.supervisor import status
from gpu_orchestrator.supervisor.config import Config
from gpu_orchestrator.supervisor.launch import client_env
from gpu_orchestrator.supervisor.telemetry import Owners
from gpu_orchestrator.supervisor.warmup import Warmup, preload_answer

STATUS_REUSE_S = 0.1
# Up to this many loaders a request checks every slot's sequence number (cheap) and shows progress
# at once; past it, an answer is reused within its window. A new heartbeat age waits for the next.
SCAN_UP_TO = 64
LOOP_ANSWER_S = 10.0  # a loop that does not serve a command within this is stuck: 503, not a hung request


@dataclass(frozen=True)
class LoaderRecord:
    """One loader as the loop last saw it."""

    client: str
    slot: int
    state: str
    pid: int | None
    restarts: int = 0
    last_exit: str | None = None
    fatal_reason: str | None = None
    rss_bytes: int | None = None


@dataclass(frozen=True)
class Snapshot:
    config: Config
    loaders: tuple[LoaderRecord, ...] = ()
    warmup: Warmup = Warmup()
    stopping: bool = False

    @functools.cached_property
    def loader_counts(self) -> dict[str, int]:
        """Loaders by state, for /health: counted once per snapshot, not on every probe's request."""
        counts: dict[str, int] = {}
        for loader in self.loaders:
            counts[loader.state] = counts.get(loader.state, 0) + 1
        return counts


@dataclass
class Command:
    """A request for the loop: `name` is an Arbiter method `command_<name>`, called with `args`."""

    name: str
    args: tuple = ()
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    cancelled: bool = False  # its asker stopped waiting: the loop must not act on it

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class UnknownClient(KeyError):
    """A client name the running configuration does not have; the HTTP layer answers 404."""

    def __init__(self, client: str, known: list[str]):
        super().__init__(client)
        self.client, self.known = client, known

    def __str__(self) -> str:
        return f"no client {self.client!r} in the model map; clients: {', '.join(self.known) or 'none'}"


class ShuttingDown(Exception):
    """The supervisor has released its state; the HTTP layer answers 503."""


class LoopDidNotAnswer(TimeoutError):
    """The loop did not serve a command in time; the HTTP layer answers 503 with this message."""


class Answers:
    def __init__(self, config: Config, segment: Segment, wake, mps=None, sampler=None, gpu_count: int = 0):
        self.snapshot = Snapshot(config)
        self.segment = segment
        self.reader = SlotReader(segment, LoaderState)  # this side's own: a reader is not thread-safe
        self.seq_at: tuple = (None, [])  # (the loaders, where each one's sequence number lies)
        self.gpu_cache: tuple = (None, None, None, None)  # (config, MPS report, GPU sample, /gpu/info)
        self.wake, self.mps, self.sampler, self.gpu_count = wake, mps, sampler, gpu_count
        self.commands: queue.Queue[Command] = queue.Queue()
        self.lock = threading.Lock()  # the reader, the cache, and the segment's life (closed)
        self.cache: tuple | None = None  # (its key, its snapshot, the Composed answer)
        self.parts: dict[str, tuple] = {}  # client -> (inputs, slot words, its ClientPart, slot sequence)
        self.last_parts: tuple | None = None  # (snapshot, GPU memory, sequences, parts, heartbeats)
        self.frame: status.Frame | None = None
        self.records: dict[str, tuple] = {}  # the loop's: client -> (its fields, its LoaderRecord)
        self.closed, self.stopping = False, False  # stopping: shutdown began, no command is served any more
        self.started = time.time()

    # ---- the loop's side ---------------------------------------------------

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def publish_loop(self, config: Config, loaders, warmup: Warmup, stopping: bool) -> bool:
        """Publish the loop's state if it changed; whether it did. A loader's record is made anew only
        when one of its fields changed, so that composing tells an unchanged client by identity."""
        records, kept_records = [], {}
        for l in loaders:
            fields = (l.client, l.slot, l.state, l.pid, l.restarts, l.last_exit, l.fatal_reason, l.rss_bytes)
            kept = self.records.get(l.client)
            if kept is None or kept[0] != fields:
                kept = (fields, LoaderRecord(*fields))
            kept_records[l.client] = kept
            records.append(kept[1])
        self.records = kept_records  # a removed client's is forgotten
        snapshot = Snapshot(config, tuple(records), warmup, stopping)
        if snapshot == self.snapshot:
            return False
        self.snapshot = snapshot
        return True

    def close(self) -> None:
        """The segment is about to be freed: answer 503 from now on, and to every queued command."""
        with self.lock:
            self.closed = True
        self.fail_queued()

    def stop_taking_commands(self) -> None:
        """Shutdown began: the loop serves no more commands; refuse new ones and those queued."""
        self.stopping = True
        self.fail_queued()

    def fail_queued(self) -> None:
        while True:
            try:
                self.commands.get_nowait().finish(error=ShuttingDown())
            except queue.Empty:
                return

    # ---- HTTP threads --------------------------------------------------------

    def ask(self, name: str, *args, timeout: float = LOOP_ANSWER_S):
        """Queue a command, wake the loop and wait for its answer."""
        self.check_open()
        if self.stopping:
            raise ShuttingDown()
        command = Command(name, args)
        self.commands.put(command)
        self.wake()
        deadline = time.monotonic() + timeout
        while not command.done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.closed or self.stopping:  # queued as shutdown began: nobody will serve it
                raise ShuttingDown()
            if time.monotonic() >= deadline:
                command.cancelled = True
                raise LoopDidNotAnswer(f"the supervision loop did not answer within {timeout:g} s; "
                                       "it may be stuck: see the service's log, then retry or restart it")
        self.wake()  # the loop acts on what it answered (sends a new warm-up) once the answer is ours
        if command.error is not None:
            raise command.error
        return command.result

    def request_preload(self, refresh: bool) -> tuple[int, dict]:
        """202 when a warm-up starts or runs; 200 if all ready; 503 if the last one failed. Answered
        here, at once, when what the loop published says nothing is to start (a second refresh
        right after one is seen running); the loop decides anew whether to start one."""
        snapshot = self.snapshot
        answer = preload_answer(self.compose(snapshot).current, snapshot.warmup.generation, refresh)
        return answer if answer is not None else self.ask("preload", refresh)

    def models_status(self) -> dict:
        return self.compose().current

    def models_status_json(self) -> bytes:
        return self.compose().encoded

    def models_summary(self) -> dict:
        """/models/status without its clients (what /ready answers): the same dict while it holds."""
        return self.compose().top

    def health(self) -> dict:
        snapshot, telemetry = self.snapshot, self.telemetry()
        # Warned: limits the configuration cannot hold; NVML asked for but not sampling (unwatched).
        lost = snapshot.config.enable_nvml and telemetry is not None and not telemetry.nvml_supported
        return {"status": "stopping" if snapshot.stopping else "ok", "service": "gpu-orchestrator",
                "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 3),
                "clients": len(snapshot.loaders), "loaders": snapshot.loader_counts,
                "warnings": [*snapshot.config.warnings, *([f"GPU telemetry: {telemetry.nvml_init_error}"] if lost else [])]}

    def gpu_info(self) -> dict:
        """Composed again only when the configuration, the MPS report or the GPU sample changed;
        else the composed answer with its sample's age now (a new dict: the age moves)."""
        self.check_open()
        config, report, telemetry = self.snapshot.config, self.mps_report(), self.telemetry()
        cached = self.gpu_cache
        if cached[0] is not config or cached[1] != report or cached[2] is not telemetry:
            cached = self.gpu_cache = (config, report, telemetry, status.gpu_info(config, report, telemetry))
        return status.with_age(cached[3], telemetry, time.monotonic())

    def mps_allocation(self) -> dict:
        self.check_open()
        return status.mps_allocation(self.snapshot.config, self.telemetry())

    def client_environment(self, client: str) -> dict:
        """What `env` and `exec` hand a client's service: its loader's variables now, and its limit."""
        self.check_open()
        config = self.snapshot.config
        if client not in config.clients:
            raise UnknownClient(client, sorted(config.clients))
        mps = self.mps_report() or status.mps_disabled(config)
        settings = self.mps.settings if mps["enabled"] else None  # the same reading as mps_error
        return {"client": client, "mps_configured": config.enable_mps, "mps_in_force": settings is not None,
                "mps_error": mps["error"], "memory_limit_bytes": config.memory_limit_bytes(client),
                "environment": client_env(config, client, settings, self.gpu_count)}

    def sampler_owners(self) -> Owners:
        """For the sampler thread: which pid is whose loader, the MPS servers, the clients and their limits."""
        snapshot = self.snapshot
        config = snapshot.config
        report = self.mps_report()
        return Owners({l.pid: l.client for l in snapshot.loaders if l.pid is not None},
                      report["servers"] if report else [], tuple(config.clients),
                      {c: config.memory_limit_bytes(c) for c in config.clients}, config.service_pattern)

    # ---- composition (any thread, the loop's included) ------------------------

    def check_open(self) -> None:
        if self.closed:
            raise ShuttingDown()

    def mps_report(self) -> dict | None:
        return self.mps.report() if self.mps is not None else None

    def telemetry(self):
        """The sampler's last snapshot (the sampler guards it)."""
        return self.sampler.snapshot()[1] if self.sampler is not None else None

    def compose(self, snapshot: Snapshot | None = None, fresh: bool = False) -> status.Composed:
        """/models/status: the warm-up, each client, MPS.

        With more than SCAN_UP_TO loaders, an answer is reused, without looking at any slot, for the
        rest of its STATUS_REUSE_S window while the loop has published nothing new and the MPS state
        and GPU sample are the same: a loader's progress shows at most that late, and a request
        costs the same with 100 clients or 384 (ages are at most a window old). With fewer, every
        slot's sequence number is checked (it costs little) and progress shows at once; a heartbeat
        alone waits for the next window there too, as a new body per heartbeat (48 a second with 48
        clients) costs every request more than composing it does. Either way only the slots whose
        sequence number moved are read, a client's part is composed again only when what it shows
        changed (client_parts), and the rest of the answer only when a part did (status.Frame): a
        new answer with nothing but newer ages costs one number per client. The loop asks `fresh`:
        it acts on what the slots say now, never on a window's answer.
        """
        snapshot = snapshot or self.snapshot
        report = self.mps_report() or status.mps_disabled(snapshot.config)
        mps = {key: report[key] for key in ("enabled", "managed", "restarts", "error")}
        with self.lock:
            self.check_open()
            now = time.monotonic()
            window = (id(snapshot), tuple(mps.values()), int(now / STATUS_REUSE_S),
                      self.sampler.snapshot()[0] if self.sampler is not None else 0)
            reuse = not fresh and len(snapshot.loaders) > SCAN_UP_TO
            if reuse and self.cache is not None and self.cache[0][:4] == window:
                return self.cache[2]
            key = (*window, self.sequences(snapshot.loaders))
            # Scanning, a heartbeat is news too (its age shows at once), and when no sequence number
            # moved nothing else can have: the answer is the last one, found without a part looked at.
            if not reuse and self.cache is not None and self.cache[0] == key:
                return self.cache[2]
            parts, heartbeats = self.client_parts(snapshot, key[-1])
            last = self.cache
            if not fresh and last is not None and last[0][:4] == window and last[2].frame.parts is parts:
                # Only heartbeats moved: the window's answer stands, and its key now holds these
                # sequence numbers, so the next request finds it without a slot read.
                self.cache = (key, snapshot, last[2])
                return last[2]
            frame, extra = self.frame, {"mps": mps}
            if frame is None or frame.parts is not parts or frame.warmup != snapshot.warmup or frame.extra != extra:
                frame = self.frame = status.Frame(parts, snapshot.warmup, extra, snapshot.config.preload)
            # A new window answers anew even when no part changed: the ages move with the clock.
            composed = status.Composed(frame, heartbeats, now)
            self.cache = (key, snapshot, composed)
            return composed

    def status_line(self, generation: int, mps_down: bool) -> str:
        return status.status_line(self.compose(fresh=True).current, generation, mps_down)

    def sequences(self, loaders: tuple[LoaderRecord, ...]) -> tuple[int, ...]:
        """Each loader's slot sequence number now, in one pass over the mapped words (as
        SlotReader.peek reads them, without a call per slot: a request with 48 loaders reads them
        all). Where they lie is worked out once per set of records. Lock held."""
        if self.seq_at[0] is not loaders:
            self.seq_at = (loaders, [self.segment.seq_index(loader.slot) for loader in loaders])
        return tuple(map(self.segment.words.__getitem__, self.seq_at[1]))

    def published(self, loader: LoaderRecord) -> LoaderState | None:
        """The loader's slot, only if the live process wrote it and is not being stopped: a run
        stopped to start again in its slot (a new MPS daemon) is no longer this warm-up's. Lock held."""
        return None if loader.state == states.STOPPING else self.reader.read_written_by(loader.slot, loader.pid)

    def client_parts(self, snapshot: Snapshot,
                     sequences: tuple[int, ...]) -> tuple[tuple[status.ClientPart, ...], list[float | None]]:
        """Every configured client's part of the status, and its heartbeat: the loaders' in the
        snapshot's order, then those whose loader is not started yet (while start-up waits for the
        MPS daemon there are no loaders, and a status without their clients would read as all
        ready). The parts are the very tuple of the last call when none changed. Lock held.

        Against the snapshot and GPU sample of the last call, only the loaders whose sequence
        number (`sequences`, one per loader) moved are looked at: nothing else can differ."""
        config, generation = snapshot.config, snapshot.warmup.generation
        telemetry = self.telemetry()
        gpu_memory = telemetry.clients if telemetry is not None and telemetry.nvml_supported else None
        last = self.last_parts
        if last is not None and last[0] is snapshot and last[1] is gpu_memory:
            looked = [i for i, (seq, seen) in enumerate(zip(sequences, last[2])) if seq != seen]
            parts, heartbeats = list(last[3]), list(last[4])
        else:
            looked = range(len(snapshot.loaders))
            parts, heartbeats = [None] * len(snapshot.loaders), [None] * len(snapshot.loaders)
            started = {loader.client for loader in snapshot.loaders}
            kept = {}
            for client in config.clients:
                if client in started:
                    continue
                key = (None, config, generation, None)
                cached = self.parts.get(client)
                if cached is None or cached[0] != key:
                    cached = (key, None, self.client_part(None, config, generation, None, None, client), None)
                kept[client] = cached
                parts.append(cached[2])
                heartbeats.append(None)
            self.parts = {loader.client: self.parts[loader.client] for loader in snapshot.loaders
                          if loader.client in self.parts} | kept  # a removed client's is forgotten
        for i in looked:
            loader = snapshot.loaders[i]
            part, heartbeats[i] = self.loader_part(loader, sequences[i], config, generation, gpu_memory)
            parts[i] = part
        if last is not None and len(parts) == len(last[3]) and all(map(operator.is_, parts, last[3])):
            parts = last[3]
        else:
            parts = tuple(parts)
        self.last_parts = (snapshot, gpu_memory, sequences, parts, heartbeats)
        return parts, heartbeats

    def loader_part(self, loader: LoaderRecord, sequence: int, config: Config, generation: int,
                    gpu_memory: dict | None) -> tuple[status.ClientPart, float | None]:
        """A started client's part and heartbeat. The part is kept while its inputs are the same:
        the loader's record, the configuration, the generation, its GPU memory and what its slot
        says beyond the heartbeat; a slot whose sequence number has not moved is not read. Lock held."""
        key = (loader, config, generation, gpu_memory.get(loader.client, 0) if gpu_memory is not None else None)
        cached = self.parts.get(loader.client)
        if cached is None or cached[0] != key or cached[3] != sequence:
            published = self.published(loader)
            if cached is None or cached[0] != key or not same_progress(cached[1], published):
                cached = (key, published, self.client_part(loader, config, generation, key[3], published), sequence)
            else:  # a heartbeat: the same part, its newer heartbeat
                cached = (key, published, cached[2], sequence)
            self.parts[loader.client] = cached
        return cached[2], cached[1].heartbeat if cached[1] is not None else None

    @staticmethod
    def client_part(loader: LoaderRecord | None, config: Config, generation: int, gpu_memory: int | None,
                    published: LoaderState | None, client: str | None = None) -> status.ClientPart:
        """One client's part; `loader` None for a client whose loader is not started yet."""
        client = loader.client if loader is not None else client
        view = status.ClientView(
            client=client, models=config.clients[client], state=loader.state if loader else states.STOPPED,
            pid=loader.pid if loader else None, restarts=loader.restarts if loader else 0,
            last_exit=loader.last_exit if loader else None, fatal_reason=loader.fatal_reason if loader else None,
            memory_limit_bytes=config.memory_limit_bytes(client), published=published, gpu_memory_bytes=gpu_memory,
            rss_bytes=loader.rss_bytes if loader is not None and loader.pid is not None else None)
        return status.client_part(view, generation)


def same_progress(before: LoaderState | None, now: LoaderState | None) -> bool:
    """The same words from the same loader, its heartbeat aside (which moves every interval)."""
    if before is now:
        return True
    if before is None or now is None:
        return False
    return (before.pid == now.pid and before.generation == now.generation and before.phase == now.phase
            and before.models == now.models)
