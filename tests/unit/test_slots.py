"""Channel slots: lowest first, given back, and a reload refused when they cannot hold it."""

import pytest

from gpu_orchestrator.loaders.wire import slot_size_for
from gpu_orchestrator.supervisor.config import Config, ConfigError
from gpu_orchestrator.supervisor.slots import MIN_MODELS_PER_SLOT, SPARE_SLOTS, FreeSlots, check_room, create_segment


def test_slots_are_taken_lowest_first_and_given_back():
    free = FreeSlots(3)
    assert [free.take(), free.take()] == [0, 1] and len(free) == 1
    free.give_back(0)
    assert free.take() == 0


def test_the_segment_has_spares_and_room_for_a_grown_client(tmp_path):
    config = Config(model_store_root=str(tmp_path), model_map_path="m", allocation_path="", clients={"a": ["x"]})
    segment = create_segment(config)
    try:
        assert segment.slots == 1 + SPARE_SLOTS and segment.slot_size == slot_size_for(MIN_MODELS_PER_SLOT)
        check_room(segment, FreeSlots(2), [MIN_MODELS_PER_SLOT, 1], "m")
        with pytest.raises(ConfigError, match="more than the shared-memory channel was sized for"):
            check_room(segment, FreeSlots(2), [MIN_MODELS_PER_SLOT * 4], "m")
        with pytest.raises(ConfigError, match="3 new clients exceed the 2 free channel slots"):
            check_room(segment, FreeSlots(2), [1, 1, 1], "m")
        # A changed client restarts in its own slot: no free one needed, but its models must fit it.
        check_room(segment, FreeSlots(0), [], "m", changed=[1, 1, 1])
        with pytest.raises(ConfigError, match="more than the shared-memory channel was sized for"):
            check_room(segment, FreeSlots(0), [], "m", changed=[MIN_MODELS_PER_SLOT * 4])
    finally:
        segment.close()
