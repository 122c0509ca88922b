"""Loader process states, after supervisord's states.py. No project imports.

STOPPED  not running and not wanted (before the first start, after a stop)
STARTING spawned, not yet up for `startsecs`
RUNNING  up for at least `startsecs`
BACKOFF  died; waiting out its restart delay
STOPPING asked to stop (TERM sent), not yet reaped
FATAL    will not be restarted until an operator asks (a refresh preload moves it
         to BACKOFF with no delay): it cannot boot, or it failed to start too often
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


def check_transition(current: str, new: str) -> str:
    if new not in TRANSITIONS[current]:
        raise AssertionError(f"illegal loader state transition {current} -> {new}")
    return new
