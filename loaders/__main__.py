"""The loader process: one per client, started by the supervisor with exec, its whole start in
one LoaderArgs on its command line (`--client NAME --args JSON`, see wire.encode_args).

It warms its client's models one after another when told to (a LoadCommand
line on stdin) and publishes every step to its shared-memory slot, with a
heartbeat. It exits 0 on SIGTERM and when stdin reaches EOF (the supervisor is
gone), checking both between every chunk it reads, and exits 78 when it cannot
boot at all, so the supervisor does not retry what cannot work.

A heartbeat thread republishes the state whenever the main thread has not for a
heartbeat interval: a long header check or a slow read must not look like a
hung loader to the supervisor, which kills loaders that fall silent.
"""

import _thread  # threading's own base: the heartbeat needs one thread and one lock, not threading's 0.25 MiB
import os
import select
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a loader (not imported), before the slower imports below
    # `pkill -HUP -f gpu-orchestrator`, the usual way to ask the supervisor to reload, matches every
    # loader too (their command lines name the segment), and SIGHUP's default is to exit. A loader
    # has nothing to reload; ignored, not handled, so it holds through exec'd helpers too.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def import_msgspec_without_typing_extensions():
    """msgspec takes typing_extensions when it is installed, for get_type_hints features that
    Python 3.11's own typing has, and typing_extensions imports inspect (with ast, dis and
    tokenize): 1.3 MiB in every loader, kept for its whole life. A None in sys.modules is
    Python's "not installed": msgspec then uses typing's (it never requires typing_extensions).
    Shown again at once, for what a model may need later (torch imports it)."""
    hide = "typing_extensions" not in sys.modules
    if hide:
        sys.modules["typing_extensions"] = None
    try:
        import msgspec
    finally:
        if hide:
            del sys.modules["typing_extensions"]
    return msgspec


msgspec = import_msgspec_without_typing_extensions()

from gpu_orchestrator.loaders.backends import ModelError, check_fits, plan, warm
from gpu_orchestrator.loaders.channel import ChannelError, Segment, SlotWriter
from gpu_orchestrator.loaders.lines import LEVELS, LineLog, kv
from gpu_orchestrator.loaders.store import ModelStore, StoreError
from gpu_orchestrator.loaders.wire import (
    EXIT_CANNOT_BOOT,
    FAILED,
    IDLE,
    LOADING,
    MAX_ERROR,
    MAX_NOTE,
    MAX_PATH,
    PENDING,
    READY,
    WARMING_UP,
    ArgsError,
    LoadCommand,
    LoaderArgs,
    LoaderState,
    ModelProgress,
    cap_text,
    decode_args,
    decode_command,
)

log = LineLog("loader")  # not the logging package: a loader imports only what it needs
PROGRESS_INTERVAL = 0.2


class Stop(BaseException):
    """Told to stop (SIGTERM) or orphaned (stdin EOF). Not an Exception, so that the
    last-resort handler around one model's load can never swallow it."""


class Loader:
    def __init__(self, client: str, models: list[str], store: ModelStore, writer: SlotWriter,
                 limit_bytes: int | None, heartbeat_interval: float, backend: str = "default",
                 warmup_inference: bool = False):
        # Nothing here grows with the models loaded: a model's entry is its few numbers and capped
        # texts; its plan, files and read buffer are gone when its load returns.
        self.client = client
        self.backend = backend
        self.warmup_inference = warmup_inference
        self.store = store
        self.writer = writer
        self.limit_bytes = limit_bytes
        self.heartbeat_interval = heartbeat_interval
        self.state = LoaderState(client=client, pid=os.getpid(), generation=0, phase=IDLE,
                                 heartbeat=time.monotonic(),
                                 models=[ModelProgress(m, backend=backend) for m in models])
        self.command: LoadCommand | None = None
        self.signals: list[int] = []
        self.stdin_buffer = b""
        self.last_publish = 0.0
        self.publish_lock = _thread.allocate_lock()  # the slot has one writer: these two threads take turns
        self.wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.signals.append(signum))

    def publish(self) -> None:
        with self.publish_lock:
            self.state.heartbeat = self.last_publish = time.monotonic()
            self.writer.publish(self.state)

    def beat(self) -> None:
        """The heartbeat thread: publish whenever the main thread has been quiet for an interval."""
        while True:
            time.sleep(self.heartbeat_interval / 2)
            if time.monotonic() - self.last_publish >= self.heartbeat_interval:
                self.publish()

    def run(self) -> None:
        self.publish()
        _thread.start_new_thread(self.beat, ())  # dies with the process, like a daemon thread
        while True:
            self.poll(self.heartbeat_interval)
            if self.command is not None:
                self.warm_up(self.command)
            self.publish()

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` for a command or a signal; raise Stop when it is time to go."""
        readable, _, _ = select.select([0, self.wakeup_r], [], [], timeout)
        if self.wakeup_r in readable:
            while True:
                try:
                    if not os.read(self.wakeup_r, 512):
                        break
                except BlockingIOError:
                    break
        if self.signals:
            raise Stop(f"signal {signal.Signals(self.signals[0]).name}")
        if 0 in readable:
            self.read_commands()

    def read_commands(self) -> None:
        data = os.read(0, 65536)
        if not data:
            raise Stop("stdin closed: the supervisor is gone")
        *lines, self.stdin_buffer = (self.stdin_buffer + data).split(b"\n")
        for line in filter(None, lines):
            try:
                self.command = decode_command(line)
            except msgspec.DecodeError as exc:
                log.error(kv("ignored a malformed command", client=self.client, error=exc))

    def tick(self) -> None:
        """Between chunks: notice commands and signals at once, publish progress now and then."""
        self.poll(0)
        if time.monotonic() - self.last_publish >= PROGRESS_INTERVAL:
            self.publish()

    def warm_up(self, command: LoadCommand) -> None:
        self.command = None
        # Phase first: no publish (the heartbeat thread's) may pair the new generation with the old
        # phase, which a reader would take for this generation finished (warmup.finished).
        self.state.phase = WARMING_UP
        self.state.generation = command.generation
        for i, model in enumerate(self.state.models):
            # A model loaded again starts from a fresh entry: nothing an earlier load found (its path,
            # format, parameters, bytes, verified, device, seconds) may stand beside this load's outcome.
            if model.model in command.failed:  # it kept killing this loader: the supervisor says why
                self.state.models[i] = ModelProgress(model.model, status=FAILED, backend=model.backend,
                                                     error=cap_text(command.failed[model.model], MAX_ERROR))
            elif command.refresh or model.status != READY:
                self.state.models[i] = ModelProgress(model.model, status=PENDING, backend=model.backend)
        self.publish()
        for model in self.state.models:
            if model.status == PENDING:
                used = sum(m.weight_bytes for m in self.state.models if m.status == READY)
                self.load(model, used)
                self.publish()
        self.state.phase = IDLE
        self.publish()  # before the log line: that line is what wakes the supervisor
        done = sum(m.status == READY for m in self.state.models)
        log.info(kv("warm-up finished", client=self.client, generation=command.generation,
                    ready=done, failed=len(self.state.models) - done))
        if log.threshold > LEVELS["INFO"]:
            os.write(2, b"\n")  # the line was held back: an empty one wakes the supervisor, which drops it

    def load(self, model: ModelProgress, used_bytes: int) -> None:
        model.status = LOADING
        self.publish()
        log.info(kv("model loading", client=self.client, model=model.model))
        started = time.monotonic()
        try:
            snapshot = self.store.resolve(self.client, model.model)
            model.path = cap_text(str(snapshot.path), MAX_PATH, keep_end=True)
            model_plan = plan(snapshot)
            model.format, model.parameters = model_plan.format, model_plan.parameters
            model.bytes_total, model.weight_bytes = model_plan.total_bytes, model_plan.weight_bytes
            check_fits(model_plan, used_bytes, self.limit_bytes)
            self.publish()
            if self.backend == "torch":  # the same checks and read, the weights read onto the device
                self.load_on_device(model, snapshot, model_plan, used_bytes, self.progress(model, started))
            else:
                model.verified = warm(snapshot, model_plan, self.progress(model, started))
        except (StoreError, ModelError) as exc:
            self.fail(model, str(exc), started)
        except OSError as exc:
            self.fail(model, f"{exc.filename or model.path}: {exc.strerror}", started)
        except Exception as exc:  # a bug or a framework error must fail this model, not crash-loop the loader
            log.exception(kv("unexpected error loading a model", client=self.client, model=model.model))
            self.fail(model, f"unexpected {type(exc).__name__}: {exc}", started)
        else:
            model.status, model.seconds = READY, round(time.monotonic() - started, 3)
            log.info(kv("model ready", client=self.client, model=model.model, bytes=model.bytes_done,
                        seconds=model.seconds, verified=model.verified))

    def load_on_device(self, model: ModelProgress, snapshot, model_plan, used_bytes: int, progress) -> None:
        from gpu_orchestrator.loaders.logs import setup_logging
        from gpu_orchestrator.loaders.torch_backend import load_torch  # torch is optional and slow to import

        setup_logging()  # torch logs through the logging package (imported with it): the same lines
        result = load_torch(snapshot, model_plan, used_bytes, self.limit_bytes, self.warmup_inference, progress)
        model.verified, model.device, model.device_memory_bytes = result.verified, result.device, result.memory_bytes
        model.embedding_dim = result.embedding_dim
        model.note = None if result.note is None else cap_text(result.note, MAX_NOTE)
        self.tick()

    def progress(self, model: ModelProgress, started: float):
        """Per chunk read: the bytes and this model's own seconds so far (this run's: a restarted
        loader's model is timed from its restart), from which /models/status derives the rate and
        ETA; and one log line as each tenth of the model is passed."""
        logged = 0  # tenths of the model already logged

        def report(done: int) -> None:
            nonlocal logged
            model.bytes_done, model.seconds = done, round(time.monotonic() - started, 3)
            tenth = 10 * done // model.bytes_total if model.bytes_total else 0
            if logged < tenth < 10:
                logged = tenth
                rate, eta = model.rate_and_eta()
                log.info(kv("model progress", client=self.client, model=model.model, percent=10 * tenth,
                            bytes=done, bytes_total=model.bytes_total, seconds=model.seconds,
                            rate_bytes_per_s=None if rate is None else round(rate),
                            eta_s=None if eta is None else round(eta, 1)))
            self.tick()
        return report

    def fail(self, model: ModelProgress, error: str, started: float) -> None:
        model.status, model.error = FAILED, cap_text(error, MAX_ERROR)
        model.seconds = round(time.monotonic() - started, 3)
        log.error(kv("model failed", client=self.client, model=model.model, error=model.error))


def boot(argv: list[str]) -> Loader:
    """Everything that, failing, no restart can fix: exits 78 with one line."""
    def cannot_boot(client: str, reason: str):
        log.error(kv("cannot boot", client=client, reason=reason))
        sys.exit(EXIT_CANNOT_BOOT)

    try:
        args: LoaderArgs = decode_args(argv)
    except ArgsError as exc:
        cannot_boot(argv[1] if len(argv) > 1 else "?", str(exc))
    if not os.path.isdir(args.store_root):
        cannot_boot(args.client, f"model store root {args.store_root} is not a directory")
    try:
        writer = SlotWriter(Segment.attach(args.segment), args.slot)
    except ChannelError as exc:
        cannot_boot(args.client, str(exc))
    store = ModelStore(args.store_root, args.base_model_dir, args.strict, Path(args.hf_hub) if args.hf_hub else None)
    return Loader(args.client, args.models, store, writer, args.memory_limit_bytes, args.heartbeat_interval,
                  args.backend, args.warmup_inference)


def main(argv: list[str] | None = None) -> int:
    log.take_over_uncaught()
    loader = boot(sys.argv[1:] if argv is None else argv)
    try:
        loader.run()
    except Stop as stop:
        log.info(kv("loader stopping", client=loader.client, reason=stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
