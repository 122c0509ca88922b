"""Shared-memory state channel: one segment per supervisor run, one seqlock slot per writer.

Layout: a 32-byte header (magic, version, slot count, slot size), then fixed-size
slots. A slot is `seq:u64 length:u32 crc32:u32` followed by a msgpack payload.
The writer makes `seq` odd, writes the payload, then makes it even again; a
reader copies the payload between two reads of `seq` and accepts it only when
both are equal and even and the CRC matches. A writer killed mid-write leaves
`seq` odd forever: readers then keep returning the last good copy they saw.

`seq` is only ever loaded and stored as one aligned 8-byte word, through a
memoryview cast to 'Q' (its item access is a single native load or store).
`struct.pack_into`/`unpack_from` copy byte by byte, so a reader could see half
of an increment: a seq of 0 ("never written") or an old even value, and hand
out nothing or a stale copy. Slots are 8-byte aligned (the header and every
slot size are multiples of 8, the mapping is page-aligned). On x86-64 (TSO)
stores are seen in program order, which is all a seqlock needs.

A loader imports this module: whatever only the supervisor needs (psutil, secrets, logging) is
imported inside the functions that need it.

The segment is opened with os.open + mmap rather than
multiprocessing.shared_memory, whose resource tracker on Python 3.11 unlinks a
segment when any attaching child exits (cpython gh-82300).
"""

import mmap
import os
import re
import stat
import struct
import zlib

import msgspec

SHM_DIR = "/dev/shm"
NAME_PREFIX = "gpu-orchestrator-"
_MAGIC = b"GPUORCH1"
_VERSION = 1
_HEADER = struct.Struct("<8sIII12x")  # magic, version, slots, slot_size
_SLOT_HEADER = struct.Struct("<QII")  # seq, length, crc32
_LENGTH_CRC = struct.Struct("<II")  # the slot header after seq, written while seq is odd
_READ_ATTEMPTS = 64
_NAME_ATTEMPTS = 8


class ChannelError(Exception):
    """The segment is missing, foreign or too small for what is written to it."""


def segment_name(pid: int) -> str:
    """A fresh name for a run of `pid`: the pid lets a later start find a dead run's segment,
    the random part keeps anyone from planting a file (or a symlink) at the next run's name."""
    import secrets  # the supervisor's: it loads OpenSSL, which a loader must not pay for

    return f"{NAME_PREFIX}{pid}-{secrets.token_hex(8)}"


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


# A pid as Linux makes them (pid_max is at most 2**22): ASCII digits, at most 7. Anyone can make a
# file in /dev/shm: a name of 2147483648 or of Unicode digits must not reach psutil as a pid
# (OverflowError stopped the start), and is not ours.
_NAME = re.compile(re.escape(NAME_PREFIX) + r"([0-9]{1,7})(?:-[0-9a-f]{16})?$", re.ASCII)


def segments_of(pid: int) -> list[str]:
    """Names under /dev/shm that a run of `pid` would have made."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(e for e in entries if (m := _NAME.match(e)) and int(m.group(1)) == pid)


def is_our_segment(path: str) -> str | None:
    """None when `path` is a channel segment this user made; else why it is not (never follows a link)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "gone"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not us ({os.geteuid()})"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return f"cannot be opened: {exc.strerror}"
    try:
        magic = os.pread(fd, len(_MAGIC), 0)
    finally:
        os.close(fd)
    return None if magic == _MAGIC else "not a gpu-orchestrator channel"


def remove_stale_segments() -> list[str]:
    """Unlink our segments left by runs whose process is gone; return their names.

    Anything else with our prefix (another user's, a symlink, a file without our magic)
    is left alone with one warning: any local user can create files in /dev/shm, and
    none of them may stop the service from starting. The supervisor's alone: psutil and logging
    are imported here, so that a loader, which imports this module too, never pays for them."""
    import logging

    import psutil

    log = logging.getLogger("supervisor")
    removed = []
    try:
        entries = os.listdir(SHM_DIR)
    except OSError as exc:
        log.warning(f"cannot list {SHM_DIR} for stale segments: {exc.strerror}")
        return removed
    for entry in entries:
        match = _NAME.match(entry)
        if not match or psutil.pid_exists(int(match.group(1))):
            continue
        why_not = is_our_segment(segment_path(entry))
        if why_not == "gone":
            continue
        if why_not is not None:
            log.warning(f"left {segment_path(entry)} alone: its name looks like a stale gpu-orchestrator "
                        f"segment but it is {why_not}; remove it by hand if it is litter")
            continue
        try:
            os.unlink(segment_path(entry))
            removed.append(entry)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning(f"cannot remove the stale segment {segment_path(entry)}: {exc.strerror}")
    return removed


class Segment:
    """A mapped segment. `create` makes and owns it; `attach` maps an existing one."""

    def __init__(self, name: str, fd: int, owner: bool):
        self.name = name
        self.owner = owner
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER.size:
                raise ChannelError(f"shared-memory segment {name} is too small ({size} bytes)")
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        magic, version, self.slots, self.slot_size = _HEADER.unpack_from(self._map, 0)
        if magic != _MAGIC or version != _VERSION:
            self._map.close()
            raise ChannelError(f"/dev/shm/{name} is not a gpu-orchestrator channel (version {_VERSION})")
        if size % 8 or self.slot_size % 8 or size < _HEADER.size + self.slots * self.slot_size:
            self._map.close()
            raise ChannelError(f"/dev/shm/{name} is {size} bytes, which does not hold the {self.slots} slots "
                               f"of {self.slot_size} bytes its header declares")
        self.view = memoryview(self._map)
        self.words = self.view.cast("Q")  # the sequence numbers: one native 8-byte access each

    @classmethod
    def create(cls, name: str, slots: int, slot_size: int) -> "Segment":
        """Make segment `name`. O_EXCL: never open what someone else put there."""
        if slot_size <= _SLOT_HEADER.size or slot_size % 8:
            raise ValueError("slot_size must be a multiple of 8 larger than the slot header")
        fd = os.open(segment_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        size = _HEADER.size + slots * slot_size
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            # Allocate every page now: an ftruncate'd segment on a full tmpfs maps fine and
            # then kills the first process that touches an unbacked page with SIGBUS. So every
            # slot, spare ones too, holds RAM from the start (supervisor/slots.py has the figures).
            os.posix_fallocate(fd, 0, size)
            os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, slots, slot_size), 0)
        except OSError as exc:
            os.close(fd)
            os.unlink(segment_path(name))
            raise ChannelError(f"cannot allocate the {size}-byte shared-memory segment in {SHM_DIR}: "
                               f"{exc.strerror}; free space there (df -h {SHM_DIR}) or enlarge it") from None
        except BaseException:
            os.close(fd)
            os.unlink(segment_path(name))
            raise
        return cls(name, fd, owner=True)

    @classmethod
    def create_for(cls, pid: int, slots: int, slot_size: int) -> "Segment":
        """A new segment for run `pid` under a fresh random name, retried if one is taken."""
        for _ in range(_NAME_ATTEMPTS):
            try:
                return cls.create(segment_name(pid), slots, slot_size)
            except FileExistsError:
                continue
        raise ChannelError(f"{_NAME_ATTEMPTS} fresh names under {SHM_DIR} were all taken; something is "
                           f"creating files there: look at ls -l {SHM_DIR}/{NAME_PREFIX}*")

    @classmethod
    def attach(cls, name: str) -> "Segment":
        try:
            fd = os.open(segment_path(name), os.O_RDWR)
        except FileNotFoundError:
            raise ChannelError(f"shared-memory segment /dev/shm/{name} does not exist") from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
            raise ChannelError(f"shared-memory segment /dev/shm/{name!r} cannot be opened: {exc}") from None
        return cls(name, fd, owner=False)

    def slot_offset(self, index: int) -> int:
        if not 0 <= index < self.slots:
            raise ChannelError(f"slot {index} out of range: segment has {self.slots} slots")
        return _HEADER.size + index * self.slot_size

    def seq_index(self, index: int) -> int:
        """Where slot `index`'s sequence number lies in `words`."""
        return self.slot_offset(index) // 8

    def close(self) -> None:
        """Unmap; the owner also unlinks. Safe to call twice."""
        if self._map.closed:
            return
        self.words.release()
        self.view.release()
        self._map.close()
        if self.owner:
            try:
                os.unlink(segment_path(self.name))
            except FileNotFoundError:
                pass


class SlotWriter:
    """Publishes one struct to one slot. Only one writer may own a slot."""

    def __init__(self, segment: Segment, index: int):
        self._view = segment.view
        self._words = segment.words
        self._offset = segment.slot_offset(index)
        self._seq_at = segment.seq_index(index)
        self.capacity = segment.slot_size - _SLOT_HEADER.size
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray(self.capacity)
        self._seq = self._words[self._seq_at]
        self._seq += self._seq & 1  # resume after a writer that died mid-write

    def publish(self, message: msgspec.Struct) -> None:
        self._encoder.encode_into(message, self._buffer)
        length = len(self._buffer)
        if length > self.capacity:
            raise ChannelError(f"message of {length} bytes does not fit a {self.capacity}-byte slot")
        crc = zlib.crc32(self._buffer)
        start = self._offset + _SLOT_HEADER.size
        self._seq += 1
        self._words[self._seq_at] = self._seq
        self._view[start : start + length] = self._buffer
        _LENGTH_CRC.pack_into(self._view, self._offset + 8, length, crc)
        self._seq += 1
        self._words[self._seq_at] = self._seq


class SlotReader:
    """Reads slots; keeps the last good copy of each so a dead writer never poisons a read.

    Not thread-safe: give each thread its own reader or hold a lock around it.
    """

    def __init__(self, segment: Segment, message_type):
        self._segment = segment
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self._last: dict[int, tuple[int, object]] = {}

    def peek(self, index: int) -> int:
        """The slot's sequence number now: a cheap way to tell whether it was written since."""
        return self._segment.words[self._segment.seq_index(index)]

    def read(self, index: int):
        """The newest consistent message in slot `index`; else the last good one; None only
        for a slot never seen written."""
        view, words = self._segment.view, self._segment.words
        offset = self._segment.slot_offset(index)
        seq_at = self._segment.seq_index(index)
        last = self._last.get(index)
        for _ in range(_READ_ATTEMPTS):
            seq = words[seq_at]
            if seq == 0:
                break
            if last is not None and last[0] == seq:
                return last[1]
            length, crc = _LENGTH_CRC.unpack_from(view, offset + 8)
            if seq & 1 or length > self._segment.slot_size - _SLOT_HEADER.size:
                os.sched_yield()
                continue
            start = offset + _SLOT_HEADER.size
            payload = bytes(view[start : start + length])
            if words[seq_at] != seq or zlib.crc32(payload) != crc:
                continue
            try:
                message = self._decoder.decode(payload)
            except msgspec.DecodeError:
                continue
            self._last[index] = (seq, message)
            return message
        return last[1] if last is not None else None

    def read_written_by(self, index: int, pid: int | None):
        """The slot's message only if process `pid` wrote it (its `pid` field says so): a slot
        keeps what an earlier writer left there, which must never speak for the process now."""
        if pid is None:
            return None
        message = self.read(index)
        return message if message is not None and message.pid == pid else None
