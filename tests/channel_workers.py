"""Processes for the channel tests: `python channel_workers.py MODE SEGMENT SLOT SECONDS`.

Every message the writer publishes is self-consistent (each field derives from
one counter), so a reader can tell a torn read from a good one.
"""

import json
import os
import signal
import sys
import time

from gpu_orchestrator.loaders.channel import Segment, SlotReader, SlotWriter
from gpu_orchestrator.loaders.wire import LoaderState, ModelProgress


def message(counter: int) -> LoaderState:
    models = [ModelProgress(f"org/model-{counter}-{i}", bytes_done=counter * 10 + i, error="e" * (counter % 97))
              for i in range(10)]
    return LoaderState(client=f"c{counter}", pid=counter, generation=counter, phase="idle",
                       heartbeat=float(counter), models=models)


def consistent(state: LoaderState) -> bool:
    n = state.pid
    return (state.client == f"c{n}" and state.generation == n and state.heartbeat == float(n)
            and len(state.models) == 10
            and all(m.model == f"org/model-{n}-{i}" and m.bytes_done == n * 10 + i and m.error == "e" * (n % 97)
                    for i, m in enumerate(state.models)))


def write(segment: Segment, slot: int, seconds: float) -> dict:
    writer = SlotWriter(segment, slot)
    counter, deadline = 0, time.monotonic() + seconds
    print("started", flush=True)
    while time.monotonic() < deadline:
        counter += 1
        writer.publish(message(counter))
    return {"published": counter}


def read(segment: Segment, slot: int, seconds: float) -> dict:
    """Count every anomaly a reader can see: a torn message, a message older than one already
    returned, a sequence number that went back, and None once a good copy was seen."""
    reader = SlotReader(segment, LoaderState)
    reads = torn = backwards = seq_backwards = none_after_good = 0
    last = last_seq = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seq = reader.peek(slot)
        seq_backwards += seq < last_seq
        last_seq = seq
        state = reader.read(slot)
        if state is None:
            none_after_good += last > 0
            continue
        reads += 1
        torn += not consistent(state)
        backwards += state.pid < last
        last = state.pid
    return {"reads": reads, "torn": torn, "backwards": backwards, "seq_backwards": seq_backwards,
            "none_after_good": none_after_good, "last": last}


def anomalies(result: dict) -> int:
    return result["torn"] + result["backwards"] + result["seq_backwards"] + result["none_after_good"]


def die_mid_write(segment: Segment, slot: int, seconds: float) -> None:
    """Publish message(1), then begin message(2) and SIGKILL ourselves half-way through."""
    writer = SlotWriter(segment, slot)
    writer.publish(message(1))
    print("published", flush=True)
    sys.stdin.readline()
    writer._seq += 1  # what publish() does first: odd means "being written"
    offset = writer._offset
    segment.view[offset:offset + 8] = writer._seq.to_bytes(8, "little")
    segment.view[offset + 16:offset + 64] = b"\xff" * 48
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    mode, name, slot, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    result = {"write": write, "read": read, "die": die_mid_write}[mode](Segment.attach(name), slot, seconds)
    print(json.dumps(result), flush=True)
