"""Every state machine refuses a transition it does not list."""

import pytest

from gpu_orchestrator.loaders import states


def test_each_machine_lists_only_its_own_states():
    for name, machine in states.MACHINES.items():
        for current, targets in machine.items():
            assert targets <= set(machine), f"{name}: {current} -> {targets - set(machine)}"


@pytest.mark.parametrize("machine, current, new", [
    ("loader", states.STOPPED, states.RUNNING),
    ("MPS daemon", states.MPS_OFF, states.MPS_UP),
    ("MPS daemon", states.MPS_MISSING, states.MPS_CHECKING),
    ("warm-up", states.WARMUP_FINISHED, states.WARMUP_IDLE),
])
def test_an_unlisted_transition_fails_naming_the_machine(machine, current, new):
    with pytest.raises(AssertionError, match=f"illegal {machine} state transition {current} -> {new}"):
        states.check_transition(current, new, machine)
