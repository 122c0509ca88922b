"""The order in which a loader's warm-up changes its published state: another thread (the heartbeat)
may publish between any two of its lines, so no moment may say "this generation, idle" before the
warm-up has run (the supervisor takes that pair for the generation finished: warmup.finished)."""

import sys

from gpu_orchestrator.loaders.__main__ import Loader
from gpu_orchestrator.loaders.wire import IDLE, READY, WARMING_UP, LoadCommand, LoaderState, ModelProgress


def test_a_warm_up_never_pairs_its_generation_with_the_idle_phase_before_it_has_run():
    loader = Loader.__new__(Loader)  # what warm_up uses, without a slot, signal handlers or a store
    loader.client, loader.command = "a", None
    loader.state = LoaderState("a", 1, 0, IDLE, 0.0, [ModelProgress("org/x", status=READY)])
    loader.publish = lambda: None
    seen = []

    def trace(frame, event, arg):  # the state as any other thread could publish it, line by line
        if frame.f_code is Loader.warm_up.__code__:
            pair = (loader.state.generation, loader.state.phase)
            if not seen or seen[-1] != pair:
                seen.append(pair)
        return trace

    sys.settrace(trace)
    try:
        loader.warm_up(LoadCommand(generation=1))
    finally:
        sys.settrace(None)
    assert seen.index((1, WARMING_UP)) < seen.index((1, IDLE)), seen
