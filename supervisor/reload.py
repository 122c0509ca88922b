"""SIGHUP: the configuration read off the loop, and what a new one changes.

The loop calls `Reloads.begin` on SIGHUP, which reads the files on a thread of its own, and each
step `Reloads.finish`, which hands the new configuration, once read, to the loop's `apply`; that
asks `plan` what changes (clients to start, stop or replace) and whether the channel's free slots
can hold the new loaders, and applies it. A refused reload keeps the running configuration.
"""

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from gpu_orchestrator.loaders.channel import Segment
from gpu_orchestrator.loaders.logs import kv
from gpu_orchestrator.supervisor.clients import Policy
from gpu_orchestrator.supervisor.config import Config, ConfigError, reload_config
from gpu_orchestrator.supervisor.launch import client_env, loader_argv
from gpu_orchestrator.supervisor.mps_control import MpsSettings
from gpu_orchestrator.supervisor.slots import FreeSlots, check_room
from gpu_orchestrator.supervisor.telemetry import service_unit

log = logging.getLogger("supervisor")

RELOAD_TIMEOUT = 10.0  # reading the configuration files on SIGHUP; a hung filesystem must not hang reloads


class PendingReload:
    """A SIGHUP's configuration read, on its own thread: the loop keeps reaping, restarting and
    answering while files are read (a FIFO, a hung network filesystem), and gives up after `timeout`."""

    def __init__(self, read, wake, timeout: float = RELOAD_TIMEOUT, clock=time.monotonic):
        self.result: Config | ConfigError | None = None
        self.timeout = timeout
        self.deadline = clock() + timeout
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


class Reloads:
    """At most one read at a time. A SIGHUP during a read is served by one more read once this
    one ends, so the newest files always win."""

    def __init__(self, wake, clock=time.monotonic, read=reload_config):
        self.wake, self.clock, self.read = wake, clock, read
        self.pending: PendingReload | None = None
        self.again = False

    def begin(self, config: Config) -> bool:
        """Start reading the files `config` names; False when a read runs (one more is queued)."""
        if self.pending is not None:
            self.again = True
            return False
        self.pending = PendingReload(lambda: self.read(config), self.wake, clock=self.clock)
        return True

    def outcome(self, now: float) -> Config | ConfigError | None:
        """The finished read's result, once; None while none has finished."""
        outcome = self.pending.outcome(now) if self.pending is not None else None
        if outcome is not None:
            self.pending = None
        return outcome

    def finish(self, now: float, apply) -> bool:
        """Once a read has ended: `apply(config)` its configuration (ConfigError refuses it) and
        log what changed or why not. False while no read has ended."""
        outcome = self.outcome(now)
        if outcome is None:
            return False
        try:
            if isinstance(outcome, ConfigError):
                raise outcome
            changes = apply(outcome)
        except ConfigError as exc:
            log.error(kv("reload refused; the running configuration stays", error=exc))
        else:
            for warning in outcome.warnings:
                log.warning(warning)
            log.info(kv("reloaded", **changes.as_fields()))
            for client, variables in changes.services.items():
                unit = service_unit(outcome.service_pattern, client)
                log.warning(kv(f"client {client}'s limits changed: restart its service for them to apply "
                               f"(systemctl restart '{unit}'); until then it runs under the old ones",
                               client=client, changed=",".join(variables)))
        return True

    def deadline(self) -> float | None:
        return self.pending.deadline if self.pending is not None else None

    def take_again(self) -> bool:
        """Whether a SIGHUP came during the read that just ended (asked once)."""
        again, self.again = self.again, False
        return again


@dataclass(frozen=True)
class Changes:
    added: list[str]
    removed: list[str]
    changed: list[str]  # what reaches its loader differs (see launched): the loader is replaced
    # Changed clients whose service's environment (launch.client_env: GPUs, MPS limits) differs, and
    # the variables that do: the loader is replaced, but a service started with `exec` keeps the old.
    services: dict[str, list[str]] = field(default_factory=dict)

    def as_fields(self) -> dict[str, str]:
        return {"added": ",".join(self.added) or "-", "removed": ",".join(self.removed) or "-",
                "changed": ",".join(self.changed) or "-"}


def diff(old: Config, new: Config, mps: MpsSettings | None = None, gpu_count: int = 1) -> Changes:
    """`mps`: the MPS settings services get their limits under (None: MPS off, they get none)."""
    changed = [c for c in new.clients if c in old.clients and launched(old, c) != launched(new, c)]
    services = {c: variables for c in changed if (variables := env_changes(old, new, c, mps, gpu_count))}
    return Changes(added=[c for c in new.clients if c not in old.clients],
                   removed=[c for c in old.clients if c not in new.clients], changed=changed, services=services)


def env_changes(old: Config, new: Config, client: str, mps: MpsSettings | None, gpu_count: int) -> list[str]:
    """The variables of a client's service environment (what `env` and `exec` hand it) that differ."""
    before, after = client_env(old, client, mps, gpu_count), client_env(new, client, mps, gpu_count)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def launched(config: Config, client: str) -> tuple:
    """What a client's loader gets from `config`: its arguments and its client's environment, as
    launch.py writes them (with MPS on, so that the limits count). Only a change there restarts it:
    an allocation's informational fields (priority, calculated_requirement_gb, safety_margin_gb,
    models, keys we do not know) reach no loader, and a healthy one must not go unready for them."""
    return (loader_argv(config, client, "", 0, Policy()),
            client_env(config, client, MpsSettings(pipe_dir="", log_dir=""), gpu_count=1))


def plan(old: Config, new: Config, segment: Segment, free: FreeSlots, holding: Collection[str],
         mps: MpsSettings | None = None, gpu_count: int = 1) -> Changes:
    """What `new` changes, or ConfigError when the channel cannot hold it: a slot each for the
    clients not `holding` one yet (added ones; before the loaders are first started, or after a
    reload during the MPS daemon's start, all of them), and every new or changed client's models
    within a slot's size. A changed client holding a slot needs no other: without a free one its
    loader starts again in its own (Arbiter.replace_loaders). `mps` and `gpu_count`: see diff."""
    changes = diff(old, new, mps, gpu_count)
    needing = [c for c in new.clients if c not in holding]
    check_room(segment, free, [len(new.clients[c]) for c in needing], new.model_map_path,
               [len(new.clients[c]) for c in changes.changed])
    return changes
