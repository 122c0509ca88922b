"""Warm-up generations, and the loader deaths counted against the models they were loading.

The loop owns one `Warmups`; its state is a checked machine (loaders/states.py's WARMUP):
idle until the first preload, then in progress until every client has finished the current
generation, then finished until the next preload, a reload or a replaced loader reopens it.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass

from gpu_orchestrator.loaders import states
from gpu_orchestrator.loaders.logs import kv
from gpu_orchestrator.loaders.wire import IDLE, LoadCommand, LoaderState, encode_command

log = logging.getLogger("supervisor")
KILLS_TO_FAIL_A_MODEL = 3  # loader deaths while one model was loading before that model is failed, not retried


@dataclass(frozen=True)
class Warmup:
    generation: int = 0
    refresh: bool = False
    started_at: float | None = None  # wall clock
    finished_at: float | None = None


def finished(published: LoaderState | None, generation: int) -> bool:
    """The loader says it is idle after this generation's warm-up."""
    return published is not None and published.generation == generation and published.phase == IDLE


def preload_answer(current: dict, generation: int, refresh: bool) -> tuple[int, dict] | None:
    """POST /models/preload's answer when no new warm-up should start, from the composed status:
    202 while one runs, 200 when all are ready, 503 when the last one failed; else None."""
    if current["in_progress"]:
        return 202, {"started": False, **current}
    if not refresh and generation > 0:
        if current["all_ready"]:
            return 200, {"started": False, **current}
        if current["summary"]["failed"]:
            return 503, {"started": False, **current}
    return None


class Warmups:
    """The current generation, and per client and model the loader deaths while it loaded
    (`kills_while_loading`) and the models failed for them (`failed_by_supervisor`): both
    forgotten on a refresh or when a reload changes the client."""

    def __init__(self):
        self.current = Warmup()
        self.state = states.WARMUP_IDLE
        self.kills_while_loading: dict[str, dict[str, int]] = {}
        self.failed_by_supervisor: dict[str, dict[str, str]] = {}

    def to(self, new: str) -> None:
        self.state = states.check_transition(self.state, new, "warm-up")

    @property
    def generation(self) -> int:
        return self.current.generation

    @property
    def settled(self) -> bool:
        """No warm-up runs: none was asked for, or the current one has been seen finished."""
        return self.state != states.WARMUP_IN_PROGRESS

    def start(self, refresh: bool, clients) -> Warmup:
        """Begin a new generation; the loop sends it to every loader. A refresh forgets `clients`'
        deaths and failed models: an operator asked for another try."""
        self.current = Warmup(self.current.generation + 1, refresh, time.time(), None)
        self.to(states.WARMUP_IN_PROGRESS)
        if refresh:
            self.forget_kills(clients)
        log.info(kv("warm-up started", generation=self.current.generation, refresh=refresh))
        return self.current

    def reopen(self) -> None:
        """A loader was added or replaced: the current generation is not finished for it yet."""
        if self.state == states.WARMUP_FINISHED:
            self.to(states.WARMUP_IN_PROGRESS)

    def note_progress(self, current: dict) -> None:
        """From the composed status: reopen a generation some client works on again, or note
        (once) that every client has finished it."""
        if self.state == states.WARMUP_IDLE:
            return
        if current["in_progress"]:
            self.reopen()
            return
        if self.state == states.WARMUP_FINISHED:
            return
        self.current = dataclasses.replace(self.current, finished_at=time.time())
        self.to(states.WARMUP_FINISHED)
        summary = current["summary"]
        log.info(kv("warm-up finished", generation=self.current.generation, all_ready=current["all_ready"],
                    done=summary["done"], failed=summary["failed"], total=summary["total"],
                    seconds=round(self.current.finished_at - self.current.started_at, 3)))

    def count_kills(self, client: str, models: list[str], last_exit: str | None, last_exit_at: str | None) -> None:
        """A model whose load keeps killing its loader (a check past the heartbeat, the OOM killer,
        a crash in a framework) is failed with the reason, instead of killing it forever."""
        for model in models:
            counts = self.kills_while_loading.setdefault(client, {})
            counts[model] = counts.get(model, 0) + 1
            if counts[model] < KILLS_TO_FAIL_A_MODEL:
                continue
            reason = (f"its loader died {counts[model]} times while loading it; the last run {last_exit} "
                      f"at {last_exit_at}. Not tried again until POST /models/preload "
                      '{"refresh": true} or a reload that changes this client')
            self.failed_by_supervisor.setdefault(client, {})[model] = reason
            log.error(kv("model failed: it keeps killing its loader", client=client, model=model,
                         deaths=counts[model]))

    def loader_finished(self, client: str) -> None:
        """A whole warm-up went through: earlier deaths say nothing about its models any more
        (models already failed for them stay failed until a refresh)."""
        self.kills_while_loading.pop(client, None)

    def forget_kills(self, clients) -> None:
        for client in clients:
            self.kills_while_loading.pop(client, None)
            self.failed_by_supervisor.pop(client, None)

    def command_for(self, client: str) -> bytes:
        """The current generation's command line for a client's loader."""
        return encode_command(LoadCommand(self.current.generation, self.current.refresh,
                                          failed=self.failed_for(client)))

    def failed_for(self, client: str) -> dict[str, str]:
        """The models the loader must report failed instead of loading."""
        return self.failed_by_supervisor.get(client, {})
