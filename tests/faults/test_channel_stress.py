"""A writer at full speed against readers in other processes: every anomaly a reader can see is counted.

Torn messages, messages older than one already returned, sequence numbers that
went back, and None after a good copy (what a torn sequence number used to give:
a ready client shown pending, a live loader's heartbeat unreadable) must all be 0."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

from channel_workers import anomalies
from support import SOAK

from gpu_orchestrator.loaders.channel import Segment

WORKERS = Path(__file__).resolve().parents[1] / "channel_workers.py"


def test_full_speed_writer_and_readers_for_ten_seconds(record):
    seconds = 60 if SOAK else 10
    segment = Segment.create(f"gpu-orchestrator-test-{uuid.uuid4().hex[:8]}", slots=2, slot_size=16384)
    try:
        def worker(mode, duration):
            return subprocess.Popen([sys.executable, str(WORKERS), mode, segment.name, "1", str(duration)],
                                    stdout=subprocess.PIPE, text=True)

        writer = worker("write", seconds + 1)
        assert writer.stdout.readline().strip() == "started"
        readers = [worker("read", seconds) for _ in range(2)]
        results = [json.loads(r.communicate(timeout=seconds + 60)[0].splitlines()[-1]) for r in readers]
        published = json.loads(writer.communicate(timeout=seconds + 60)[0].splitlines()[-1])["published"]
    finally:
        segment.close()
    assert all(r["reads"] > 0 for r in results)
    assert [anomalies(r) for r in results] == [0, 0], results
    record("shared memory under stress", seconds=seconds, published=published,
           reads=sum(r["reads"] for r in results),
           torn=0, older_than_returned=0, seq_backwards=0, none_after_good=0, reader_processes=2)
