"""Every state machine of the orchestrator, each with its legal transitions, after supervisord's
states.py. No project imports. A move goes through `check_transition(current, new, machine)`, so an
illegal one fails loudly where it happens instead of leaving a record no code expects.

Loader process (TRANSITIONS):
STOPPED  not running and not wanted (before the first start, after a stop)
STARTING spawned, not yet up for `startsecs`
RUNNING  up for at least `startsecs`
BACKOFF  died; waiting out its restart delay
STOPPING asked to stop (TERM sent), not yet reaped
FATAL    will not be restarted until an operator asks (a refresh preload moves it
         to BACKOFF with no delay): it cannot boot, or it failed to start too often

MPS control daemon (MPS):
MPS_OFF       not started yet, or stopped for good at shutdown
MPS_CHECKING  asking whether a daemon already answers (adopt it) before spawning ours
MPS_SPAWNED   ours is spawned; waiting for its first answer, at most the start timeout
MPS_UP        a daemon answers: loaders started now run under it
MPS_BACKOFF   the daemon (or its start) failed; a restart waits out its delay
MPS_MISSING   the binary is not on PATH: loaders run without MPS, nothing is retried

Warm-up (WARMUP):
WARMUP_IDLE         no warm-up asked for yet (generation 0)
WARMUP_IN_PROGRESS  some client has not finished the current generation
WARMUP_FINISHED     every client finished it, one way or the other; a reload or a restarted
                    loader may reopen it, a preload starts the next generation
"""

STOPPED = "STOPPED"
STARTING = "STARTING"
RUNNING = "RUNNING"
BACKOFF = "BACKOFF"
STOPPING = "STOPPING"
FATAL = "FATAL"

TRANSITIONS = {
    STOPPED: {STARTING},
    STARTING: {RUNNING, BACKOFF, FATAL, STOPPING},
    RUNNING: {BACKOFF, FATAL, STOPPING},
    BACKOFF: {STARTING, STOPPED},
    STOPPING: {STOPPED},
    FATAL: {BACKOFF, STOPPED},
}

ALIVE = {STARTING, RUNNING, STOPPING}

MPS_OFF = "OFF"
MPS_CHECKING = "CHECKING"
MPS_SPAWNED = "SPAWNED"
MPS_UP = "UP"
MPS_BACKOFF = "BACKOFF"
MPS_MISSING = "MISSING"

MPS = {
    MPS_OFF: {MPS_CHECKING, MPS_BACKOFF, MPS_MISSING},
    MPS_CHECKING: {MPS_UP, MPS_SPAWNED, MPS_BACKOFF, MPS_OFF},
    MPS_SPAWNED: {MPS_UP, MPS_BACKOFF, MPS_OFF},
    MPS_UP: {MPS_BACKOFF, MPS_OFF},
    MPS_BACKOFF: {MPS_CHECKING, MPS_BACKOFF, MPS_OFF},
    MPS_MISSING: {MPS_OFF},
}
MPS_STARTING = {MPS_CHECKING, MPS_SPAWNED}  # loaders wait while the first start is in one of these

WARMUP_IDLE = "idle"
WARMUP_IN_PROGRESS = "in progress"
WARMUP_FINISHED = "finished"

WARMUP = {
    WARMUP_IDLE: {WARMUP_IN_PROGRESS},
    # A new generation may replace one whose end the loop has not noted yet.
    WARMUP_IN_PROGRESS: {WARMUP_IN_PROGRESS, WARMUP_FINISHED},
    WARMUP_FINISHED: {WARMUP_IN_PROGRESS},
}

MACHINES = {"loader": TRANSITIONS, "MPS daemon": MPS, "warm-up": WARMUP}


def check_transition(current: str, new: str, machine: str = "loader") -> str:
    """`new` when `machine` may move there from `current`; AssertionError naming both otherwise."""
    if new not in MACHINES[machine][current]:
        raise AssertionError(f"illegal {machine} state transition {current} -> {new}")
    return new
