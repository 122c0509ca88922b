"""The seqlock channel across real processes: no torn read, no poisoning, no leftovers."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gpu_orchestrator.loaders import channel
from gpu_orchestrator.loaders.channel import ChannelError, Segment, SlotReader, SlotWriter
from gpu_orchestrator.loaders.wire import LoaderState, ModelProgress

WORKERS = Path(__file__).resolve().parents[1] / "channel_workers.py"
sys.path.insert(0, str(WORKERS.parent))
from channel_workers import anomalies, consistent, message  # noqa: E402
from support import wait_for  # noqa: E402


@pytest.fixture
def segment():
    seg = Segment.create(f"gpu-orchestrator-test-{uuid.uuid4().hex[:8]}", slots=3, slot_size=16384)
    yield seg
    seg.close()
    assert not os.path.exists(channel.segment_path(seg.name))


def worker(mode, segment, slot, seconds, **kwargs):
    return subprocess.Popen([sys.executable, str(WORKERS), mode, segment.name, str(slot), str(seconds)],
                            stdout=subprocess.PIPE, text=True, **kwargs)


def test_segment_is_private_to_its_user(segment):
    mode = os.stat(channel.segment_path(segment.name)).st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_round_trip_and_empty_slot(segment):
    writer = SlotWriter(segment, 1)
    reader = SlotReader(segment, LoaderState)
    assert reader.read(1) is None
    writer.publish(message(7))
    assert consistent(reader.read(1))
    writer.publish(message(8))
    assert reader.read(1).pid == 8


def test_oversized_message_is_refused_and_old_state_kept(segment):
    writer = SlotWriter(segment, 1)
    reader = SlotReader(segment, LoaderState)
    writer.publish(message(3))
    huge = LoaderState("c", 1, 1, "idle", 0.0, [ModelProgress("m", error="x" * 20000)])
    with pytest.raises(ChannelError, match="does not fit"):
        writer.publish(huge)
    assert reader.read(1).pid == 3


def test_foreign_or_missing_segment_is_refused(tmp_path):
    with pytest.raises(ChannelError, match="does not exist"):
        Segment.attach("gpu-orchestrator-test-missing")
    name = f"gpu-orchestrator-test-{uuid.uuid4().hex[:8]}"
    Path(channel.segment_path(name)).write_bytes(b"x" * 64)
    try:
        with pytest.raises(ChannelError, match="not a gpu-orchestrator channel"):
            Segment.attach(name)
    finally:
        os.unlink(channel.segment_path(name))


def test_full_speed_writer_and_two_reader_processes_see_no_torn_state(segment):
    writer = worker("write", segment, 1, 4)
    assert writer.stdout.readline().strip() == "started"
    readers = [worker("read", segment, 1, 3) for _ in range(2)]
    results = [json.loads(r.communicate(timeout=60)[0].splitlines()[-1]) for r in readers]
    published = json.loads(writer.communicate(timeout=60)[0].splitlines()[-1])["published"]
    assert published > 1000
    for result in results:
        assert result["reads"] > 100
        assert anomalies(result) == 0, result


def test_writer_killed_mid_write_leaves_readers_on_last_good_state(segment):
    reader = SlotReader(segment, LoaderState)
    dying = worker("die", segment, 1, 0, stdin=subprocess.PIPE)
    assert dying.stdout.readline().strip() == "published"
    assert reader.read(1).pid == 1
    dying.stdin.write("go\n")
    dying.stdin.flush()
    assert dying.wait(30) == -signal.SIGKILL
    state = reader.read(1)
    assert state is not None and consistent(state) and state.pid == 1
    # A restarted writer resumes the sequence and is seen again.
    SlotWriter(segment, 1).publish(message(2))
    assert reader.read(1).pid == 2


def test_writer_killed_at_random_points_never_yields_a_torn_read(segment):
    reader = SlotReader(segment, LoaderState)
    for delay in (0.05, 0.13, 0.31):
        writer = worker("write", segment, 2, 30)
        assert writer.stdout.readline().strip() == "started"
        wait_for(lambda: reader.read(2) is not None, what="a first good copy")
        time.sleep(delay)  # a kill point, not synchronisation
        writer.kill()
        writer.wait(30)
        state = reader.read(2)
        assert state is not None and consistent(state)


def dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def stale_segment(pid: int) -> str:
    """A real segment left behind by a run of `pid` (mapped, then abandoned without unlinking)."""
    seg = Segment.create(channel.segment_name(pid), slots=1, slot_size=64)
    seg.owner = False
    seg.close()
    return seg.name


@pytest.fixture
def shm_litter():
    made = []
    yield made
    for name in made:
        path = channel.segment_path(name)
        if os.path.lexists(path):
            os.unlink(path)


def test_stale_segment_of_a_dead_run_is_removed(shm_litter):
    stale = stale_segment(dead_pid())
    live = stale_segment(os.getpid())
    shm_litter += [stale, live]
    assert stale in channel.remove_stale_segments()
    assert not os.path.exists(channel.segment_path(stale))
    assert os.path.exists(channel.segment_path(live))


def test_foreign_files_with_our_name_are_left_alone_with_a_warning(shm_litter, tmp_path, caplog):
    """Any local user can create files in /dev/shm; none may stop the service starting."""
    pid = dead_pid()
    litter = channel.segment_path(f"{channel.NAME_PREFIX}{pid}")  # no magic: not ours
    Path(litter).write_bytes(b"x" * 64)
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    link = f"{channel.NAME_PREFIX}{pid}-{'0' * 16}"
    os.symlink(target, channel.segment_path(link))
    shm_litter += [os.path.basename(litter), link]
    names = [os.path.basename(litter), link]
    if os.geteuid() == 0:  # a segment that really is one, but another user's
        other = stale_segment(pid)
        os.chown(channel.segment_path(other), 65534, 65534)
        shm_litter.append(other)
        names.append(other)
    with caplog.at_level("WARNING"):
        assert channel.remove_stale_segments() == []
    for name in names:
        assert os.path.lexists(channel.segment_path(name))
    assert target.read_bytes() == b"keep me"
    warned = [r.getMessage() for r in caplog.records]
    for name in names:
        assert sum(f"{channel.segment_path(name)} alone" in m for m in warned) == 1, warned


@pytest.mark.parametrize("number", ["2147483648", "99999999999999999999999", "\u0661\u0662"])
def test_a_name_whose_number_is_no_pid_is_not_ours_and_never_stops_a_start(shm_litter, number):
    """Seen: an empty /dev/shm/gpu-orchestrator-2147483648, made by any local user, crashed the
    start with OverflowError (psutil asked whether that pid exists)."""
    name = f"{channel.NAME_PREFIX}{number}"
    Path(channel.segment_path(name)).write_bytes(b"")
    shm_litter.append(name)
    assert channel.remove_stale_segments() == [] and channel.segments_of(2147483648) == []
    assert os.path.lexists(channel.segment_path(name))


def test_a_taken_name_is_never_opened_and_another_is_tried(monkeypatch, shm_litter):
    taken = f"{channel.NAME_PREFIX}{os.getpid()}-{'a' * 16}"
    Path(channel.segment_path(taken)).write_bytes(b"planted")
    shm_litter.append(taken)
    names = iter([taken, taken, f"{channel.NAME_PREFIX}{os.getpid()}-{'b' * 16}"])
    monkeypatch.setattr(channel, "segment_name", lambda pid: next(names))
    seg = Segment.create_for(os.getpid(), slots=1, slot_size=64)
    try:
        assert seg.name.endswith("b" * 16)
        assert Path(channel.segment_path(taken)).read_bytes() == b"planted"
    finally:
        seg.close()


def test_names_are_not_guessable_and_are_found_by_pid():
    first, second = channel.segment_name(123), channel.segment_name(123)
    assert first != second and first.startswith(f"{channel.NAME_PREFIX}123-")
    seg = Segment.create_for(os.getpid(), slots=1, slot_size=64)
    try:
        assert seg.name in channel.segments_of(os.getpid())
    finally:
        seg.close()
