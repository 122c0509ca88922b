"""The shared-memory channel's slots: how large each is, how many there are, which are free.

Each loader publishes to one slot; a replaced loader gets a fresh one (its predecessor may still
write to the old one until it is reaped), so the segment has spares.
"""

import os

from gpu_orchestrator.loaders.channel import Segment
from gpu_orchestrator.loaders.wire import slot_size_for
from gpu_orchestrator.supervisor.config import Config, ConfigError

SPARE_SLOTS = 16  # room for clients a reload adds, and for changed ones to start beside the old run
# So a reload can grow a client. Every slot costs memory, spare or not: channel.py allocates the
# whole segment at start (posix_fallocate, so that a full /dev/shm fails then, not with SIGBUS
# later), and tmpfs pages are RAM. A slot of up to 32 models is 240 KiB (larger for a client with
# more), and there are max(16, clients) spares: 4 MiB for one client, 47 MiB for 100, 180 MiB for 384.
MIN_MODELS_PER_SLOT = 32


def create_segment(config: Config) -> Segment:
    largest = max([MIN_MODELS_PER_SLOT, *(len(models) for models in config.clients.values())])
    clients = len(config.clients)
    return Segment.create_for(os.getpid(), slots=clients + max(SPARE_SLOTS, clients),
                              slot_size=slot_size_for(largest))


class FreeSlots:
    """The slots no loader owns; taken lowest first (0, 1, ...)."""

    def __init__(self, count: int):
        self.free = list(range(count - 1, -1, -1))  # popped from the end

    def __len__(self) -> int:
        return len(self.free)

    def take(self) -> int:
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        self.free.append(slot)


def check_room(segment: Segment, free: FreeSlots, models_per_client: list[int], where: str,
               changed: list[int] = ()) -> None:
    """ConfigError unless `len(models_per_client)` new loaders with that many models each fit, and
    the loaders restarted in their own slots with `changed` models each fit those slots."""
    largest = max([*models_per_client, *changed], default=0)
    if slot_size_for(largest) > segment.slot_size:
        raise ConfigError(f"{where}: a client now has {largest} models, more than the shared-memory "
                          "channel was sized for at start; restart the service to apply this map")
    if len(models_per_client) > len(free):
        raise ConfigError(f"{where}: {len(models_per_client)} new clients exceed the "
                          f"{len(free)} free channel slots; restart the service to apply this map")
