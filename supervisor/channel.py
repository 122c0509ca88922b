"""Shared-memory state channel: one segment per supervisor run, one seqlock slot per writer.

Layout: a 32-byte header (magic, version, slot count, slot size), then fixed-size
slots. A slot is `seq:u64 length:u32 crc32:u32` followed by a msgpack payload.
The writer makes `seq` odd, writes the payload, then makes it even again; a
reader copies the payload between two reads of `seq` and accepts it only when
both are equal and even and the CRC matches. A writer killed mid-write leaves
`seq` odd forever: readers then keep returning the last good copy they saw.

The segment is opened with os.open + mmap rather than
multiprocessing.shared_memory, whose resource tracker on Python 3.11 unlinks a
segment when any attaching child exits (cpython gh-82300).
"""

import mmap
import os
import re
import struct
import zlib

import msgspec
import psutil

SHM_DIR = "/dev/shm"
NAME_PREFIX = "gpu-orchestrator-"
_MAGIC = b"GPUORCH1"
_VERSION = 1
_HEADER = struct.Struct("<8sIII12x")  # magic, version, slots, slot_size
_SLOT_HEADER = struct.Struct("<QII")  # seq, length, crc32
_SEQ = struct.Struct("<Q")
_READ_ATTEMPTS = 64


class ChannelError(Exception):
    """The segment is missing, foreign or too small for what is written to it."""


def segment_name(pid: int) -> str:
    return f"{NAME_PREFIX}{pid}"


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def remove_stale_segments() -> list[str]:
    """Unlink segments left by supervisor runs whose process is gone; return their names."""
    removed = []
    pattern = re.compile(re.escape(NAME_PREFIX) + r"(\d+)$")
    for entry in os.listdir(SHM_DIR):
        match = pattern.match(entry)
        if not match or psutil.pid_exists(int(match.group(1))):
            continue
        try:
            os.unlink(segment_path(entry))
            removed.append(entry)
        except FileNotFoundError:
            pass
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
        self.view = memoryview(self._map)

    @classmethod
    def create(cls, name: str, slots: int, slot_size: int) -> "Segment":
        if slot_size <= _SLOT_HEADER.size or slot_size % 8:
            raise ValueError("slot_size must be a multiple of 8 larger than the slot header")
        fd = os.open(segment_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            os.ftruncate(fd, _HEADER.size + slots * slot_size)
            header = _HEADER.pack(_MAGIC, _VERSION, slots, slot_size)
            os.pwrite(fd, header, 0)
        except BaseException:
            os.close(fd)
            os.unlink(segment_path(name))
            raise
        return cls(name, fd, owner=True)

    @classmethod
    def attach(cls, name: str) -> "Segment":
        try:
            fd = os.open(segment_path(name), os.O_RDWR)
        except FileNotFoundError:
            raise ChannelError(f"shared-memory segment /dev/shm/{name} does not exist") from None
        return cls(name, fd, owner=False)

    def slot_offset(self, index: int) -> int:
        if not 0 <= index < self.slots:
            raise ChannelError(f"slot {index} out of range: segment has {self.slots} slots")
        return _HEADER.size + index * self.slot_size

    def close(self) -> None:
        """Unmap; the owner also unlinks. Safe to call twice."""
        if self._map.closed:
            return
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
        self._offset = segment.slot_offset(index)
        self.capacity = segment.slot_size - _SLOT_HEADER.size
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray(self.capacity)
        (self._seq,) = _SEQ.unpack_from(self._view, self._offset)
        self._seq += self._seq & 1  # resume after a writer that died mid-write

    def publish(self, message: msgspec.Struct) -> None:
        self._encoder.encode_into(message, self._buffer)
        length = len(self._buffer)
        if length > self.capacity:
            raise ChannelError(f"message of {length} bytes does not fit a {self.capacity}-byte slot")
        crc = zlib.crc32(self._buffer)
        start = self._offset + _SLOT_HEADER.size
        self._seq += 1
        _SEQ.pack_into(self._view, self._offset, self._seq)
        self._view[start : start + length] = self._buffer
        _SLOT_HEADER.pack_into(self._view, self._offset, self._seq, length, crc)
        self._seq += 1
        _SEQ.pack_into(self._view, self._offset, self._seq)


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
        return _SEQ.unpack_from(self._segment.view, self._segment.slot_offset(index))[0]

    def read(self, index: int):
        """The newest consistent message in slot `index`, the last good one, or None."""
        view = self._segment.view
        offset = self._segment.slot_offset(index)
        last = self._last.get(index)
        for _ in range(_READ_ATTEMPTS):
            seq, length, crc = _SLOT_HEADER.unpack_from(view, offset)
            if seq == 0:
                return None
            if last is not None and last[0] == seq:
                return last[1]
            if seq & 1 or length > self._segment.slot_size - _SLOT_HEADER.size:
                os.sched_yield()
                continue
            start = offset + _SLOT_HEADER.size
            payload = bytes(view[start : start + length])
            (seq_after,) = _SEQ.unpack_from(view, offset)
            if seq_after != seq or zlib.crc32(payload) != crc:
                continue
            try:
                message = self._decoder.decode(payload)
            except msgspec.DecodeError:
                continue
            self._last[index] = (seq, message)
            return message
        return last[1] if last is not None else None
