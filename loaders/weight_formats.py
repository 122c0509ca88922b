"""The weight formats other than safetensors, checked from their directories and headers alone, never
from their weights: PyTorch zip checkpoints (each central directory entry against its local header),
GGUF (header, metadata and tensor infos, each tensor's bytes against the data section) and ONNX (the
ModelProto's top-level fields). Every read is bounded by the file's size; the weights are read later,
by the warm-up."""

import math
import os
import struct
from typing import BinaryIO


class ModelError(Exception):
    """This model cannot be used; the message says why and, where it can, what to do."""


CHUNK = 1 << 20  # how much of a header region one read brings in
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")


class Cursor:
    """Reads a file forward from `pos`, through a buffer, refusing to pass the file's end."""

    def __init__(self, handle: BinaryIO, name: str, what: str, pos: int = 0):
        self.fd, self.name, self.what = handle.fileno(), name, what
        self.size = os.fstat(self.fd).st_size
        self.pos, self.start, self.buf = pos, pos, b""

    def truncated(self, needed: int) -> ModelError:
        return ModelError(f"{self.name}: {self.what} ends at byte {self.size}, but needs {needed} more bytes "
                          f"at offset {self.pos}; the file is truncated or corrupt")

    def need(self, n: int) -> int:
        """The offset in `buf` of the next `n` bytes, read in when they are not there yet."""
        if n > self.size - self.pos:
            raise self.truncated(n)
        offset = self.pos - self.start
        if offset + n > len(self.buf):
            self.buf, self.start, offset = os.pread(self.fd, max(n, CHUNK), self.pos), self.pos, 0
            if len(self.buf) < n:
                raise self.truncated(n)
        return offset

    def unpack(self, fmt: struct.Struct) -> tuple:
        offset = self.need(fmt.size)
        self.pos += fmt.size
        return fmt.unpack_from(self.buf, offset)

    def take(self, n: int) -> bytes:
        offset = self.need(n)
        self.pos += n
        return self.buf[offset:offset + n]

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self.truncated(n)
        self.pos += n

    def skip_strings(self, count: int) -> None:
        """Skip `count` GGUF strings (a uint64 length, then the bytes): a vocabulary's hundreds of
        thousands of them, so the loop does the least it can (a length read, one comparison) while
        the strings lie in the buffer, whose bytes are the file's."""
        buf, offset, unpack = self.buf, self.pos - self.start, U64.unpack_from
        limit = len(buf) - 8
        for _ in range(count):
            if offset > limit:  # the next length is past the buffer: read on from it, if the file goes on
                self.pos = self.start + offset
                offset = self.need(8)
                buf, limit = self.buf, len(self.buf) - 8
            offset += 8 + unpack(buf, offset)[0]
        self.pos = self.start + offset
        if self.pos > self.size:
            raise ModelError(f"{self.name}: {self.what} ends at byte {self.size}, inside a string that runs to "
                             f"byte {self.pos}; the file is truncated or corrupt")

    def varint(self) -> int:
        offset = self.need(min(10, self.size - self.pos))
        result = 0
        for index in range(min(10, self.size - self.pos)):
            byte = self.buf[offset + index]
            result |= (byte & 0x7F) << (7 * index)
            if byte < 0x80:
                self.pos += index + 1
                return result
        if self.size - self.pos < 10:
            raise ModelError(f"{self.name}: {self.what} ends inside a number at offset {self.pos}; the file is truncated")
        raise ModelError(f"{self.name}: {self.what} has a number over 10 bytes long at offset {self.pos}; it is corrupt")


# ---- PyTorch zip checkpoints ---------------------------------------------------------------------

LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
LOCAL_SIGNATURE = b"PK\x03\x04"
PICKLE_PROTOCOLS = range(2, 6)  # torch.save writes protocol 2 unless told otherwise


def check_zip_checkpoint(handle: BinaryIO, name: str) -> None:
    """PyTorch's zip checkpoints as torch.save writes them: every entry's local header and data where
    the central directory says, inside the file and before the directory, no two overlapping; the
    entries in a top folder holding data.pkl, which starts as a pickle does. Never unpickled."""
    import zipfile  # only here: most stores hold safetensors, and a loader keeps what it imports

    handle.seek(0)
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise ModelError(f"{name}: not a valid PyTorch zip checkpoint: {exc}") from None
    with archive:
        infos = archive.infolist()
        check_zip_entries(handle.fileno(), name, infos, archive.start_dir)
        top, slash, _ = infos[0].filename.partition("/") if infos else ("", "", "")
        if not slash:  # torch.load takes its folder from the first entry, and refuses one outside any
            raise ModelError(f"{name}: PyTorch checkpoint's entries are not in a top folder, as torch.save "
                             f"writes them (first entry {infos[0].filename if infos else None!r})")
        try:
            with archive.open(f"{top}/data.pkl") as pickled:
                start = pickled.read(2)
        except KeyError:
            raise ModelError(f"{name}: PyTorch checkpoint has no data.pkl in its top folder {top!r}") from None
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
            raise ModelError(f"{name}: PyTorch checkpoint's {top}/data.pkl cannot be read: {exc}") from None
    if len(start) < 2 or start[0] != 0x80 or start[1] not in PICKLE_PROTOCOLS:
        raise ModelError(f"{name}: PyTorch checkpoint's {top}/data.pkl starts with {start!r}, not with a pickle "
                         "protocol 2-5 opcode as torch.save writes it; the file is corrupt or not a checkpoint")


def check_zip_entries(fd: int, name: str, infos: list, directory: int) -> None:
    """Each entry of the central directory (which starts at `directory`) against its local header:
    one read of the header and name each, its data ending before the directory; no overlap."""
    spans = []
    for info in infos:
        raw = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        offset, length = info.header_offset, LOCAL_HEADER.size + len(raw)
        what = f"{name}: zip entry {info.filename!r}"
        if not 0 <= offset <= directory - length:
            raise ModelError(f"{what} has its local header at offset {offset}, outside the {directory} bytes "
                             "before the central directory; the file is truncated or corrupt")
        head = os.pread(fd, length, offset)
        if len(head) < length or head[:4] != LOCAL_SIGNATURE:
            raise ModelError(f"{what}: no local file header at offset {offset}; the file is corrupt")
        _, name_length, extra_length = LOCAL_HEADER.unpack_from(head)
        if name_length != len(raw) or head[LOCAL_HEADER.size:] != raw:
            raise ModelError(f"{what}: the local header at offset {offset} names another file; the file is corrupt")
        end = offset + length + extra_length + info.compress_size
        if end > directory:
            raise ModelError(f"{what} claims {info.compress_size} bytes at offset {offset}, which run past the "
                             f"central directory at offset {directory}; the file is truncated or corrupt")
        spans.append((offset, end, info.filename))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise ModelError(f"{name}: zip entries {first!r} and {second!r} overlap; the file is corrupt")


# ---- GGUF ------------------------------------------------------------------------------------------

GGUF_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata key-value count
GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type: bytes
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4
ARRAY_HEAD = struct.Struct("<IQ")  # item type, item count
TENSOR_TAIL = struct.Struct("<IQ")  # a tensor info's ggml type and offset, after its dimensions
MIN_KV, MIN_TENSOR_INFO = 8 + 4 + 1, 8 + 4 + 4 + 8  # key length, type, a byte; name length, dims, type, offset
GGML_MAX_DIMS = 4
QK_K = 256
# (elements per block, bytes per block) of each ggml type, as gguf-py 0.19's GGML_QUANT_SIZES gives them;
# a type not here (newer, removed, or Q8_1 (9): 36 bytes in ggml, 40 in gguf-py) has only its offset checked.
GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (QK_K, 84), 11: (QK_K, 110), 12: (QK_K, 144), 13: (QK_K, 176), 14: (QK_K, 210), 15: (QK_K, 292),
    16: (QK_K, 66), 17: (QK_K, 74), 18: (QK_K, 98), 19: (QK_K, 50), 20: (32, 18), 21: (QK_K, 110),
    22: (QK_K, 82), 23: (QK_K, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (QK_K, 56), 30: (1, 2), 34: (QK_K, 54), 35: (QK_K, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}


def check_gguf(handle: BinaryIO, name: str) -> None:
    """A GGUF file's header, metadata and tensor infos, walked to the data section (its padding by
    general.alignment, 32 unless given); each tensor's bytes, from its type and dimensions, inside it."""
    cursor = Cursor(handle, name, "GGUF file")
    head = os.pread(cursor.fd, GGUF_HEADER.size, 0)
    if head[:4] != b"GGUF"[:len(head)] or not head:
        raise ModelError(f"{name}: does not start the way GGUF files do; it is corrupt or not GGUF")
    if len(head) < GGUF_HEADER.size:
        raise ModelError(f"{name}: GGUF header is {len(head)} bytes, not {GGUF_HEADER.size}; the file is truncated")
    _, version, tensors, kvs = GGUF_HEADER.unpack(head)
    if version not in (2, 3):
        endian = " (a big-endian file, which this host cannot read)" if version in (2 << 24, 3 << 24) else ""
        raise ModelError(f"{name}: GGUF version {version}{endian}; only versions 2 and 3 are read")
    if GGUF_HEADER.size + kvs * MIN_KV + tensors * MIN_TENSOR_INFO > cursor.size:
        raise ModelError(f"{name}: GGUF header claims {tensors} tensors and {kvs} metadata key-values, more than "
                         f"its {cursor.size} bytes can hold; the file is truncated or corrupt")
    cursor.pos = cursor.start = GGUF_HEADER.size
    alignment = 32
    for _ in range(kvs):
        (key_length,) = cursor.unpack(U64)
        key = cursor.take(key_length) if key_length == len(b"general.alignment") else None
        if key is None:
            cursor.skip(key_length)
        (value_type,) = cursor.unpack(U32)
        if key == b"general.alignment":
            if value_type != GGUF_UINT32:
                raise ModelError(f"{name}: GGUF general.alignment has value type {value_type}, not uint32")
            (alignment,) = cursor.unpack(U32)
            if alignment == 0 or alignment & (alignment - 1):
                raise ModelError(f"{name}: GGUF general.alignment {alignment} is not a power of two")
        else:
            skip_gguf_value(cursor, value_type)
    infos = [gguf_tensor_info(cursor) for _ in range(tensors)]
    data_start = -(-cursor.pos // alignment) * alignment
    data_size = cursor.size - data_start
    for tensor, dims, ggml_type, offset in infos:
        block, type_size = GGML_TYPE_SIZES.get(ggml_type, (1, 0))
        if dims and dims[0] % block:
            raise ModelError(f"{name}: GGUF tensor {tensor!r} has {dims[0]} elements a row, not a multiple of "
                             f"its type {ggml_type}'s block of {block}")
        needed = math.prod(dims) // block * type_size
        if offset + needed > data_size:
            raise ModelError(f"{name}: GGUF tensor {tensor!r} bytes {offset}-{offset + needed} lie outside the "
                             f"file's {max(data_size, 0)} data bytes; the file is truncated or corrupt")


def skip_gguf_value(cursor: Cursor, value_type: int) -> None:
    """Skip one metadata value; an array's items (arrays of arrays too) from a stack, not by recursion."""
    if value_type in GGUF_SCALARS:
        return cursor.skip(GGUF_SCALARS[value_type])
    if value_type == GGUF_STRING:
        return cursor.skip(cursor.unpack(U64)[0])
    if value_type != GGUF_ARRAY:
        raise ModelError(f"{cursor.name}: GGUF metadata value at offset {cursor.pos - 4} has unknown type {value_type}")
    stack = [cursor.unpack(ARRAY_HEAD)]
    while stack:
        item_type, count = stack.pop()
        if item_type in GGUF_SCALARS:
            cursor.skip(count * GGUF_SCALARS[item_type])
        elif item_type == GGUF_STRING:
            if count * 8 > cursor.size - cursor.pos:
                raise cursor.truncated(count * 8)
            cursor.skip_strings(count)
        elif item_type == GGUF_ARRAY:
            if count * ARRAY_HEAD.size > cursor.size - cursor.pos:
                raise cursor.truncated(count * ARRAY_HEAD.size)
            if count:
                stack.append((GGUF_ARRAY, count - 1))
                stack.append(cursor.unpack(ARRAY_HEAD))
        else:
            raise ModelError(f"{cursor.name}: GGUF metadata array before offset {cursor.pos} has unknown item type {item_type}")


def gguf_tensor_info(cursor: Cursor) -> tuple[str, tuple, int, int]:
    """(name, dimensions, ggml type, offset into the data section) of the tensor info at the cursor."""
    (name_length,) = cursor.unpack(U64)
    shown = min(name_length, 200)
    tensor = cursor.take(shown).decode("utf-8", "replace")
    cursor.skip(name_length - shown)
    (dimensions,) = cursor.unpack(U32)
    if dimensions > GGML_MAX_DIMS:
        raise ModelError(f"{cursor.name}: GGUF tensor {tensor!r} has {dimensions} dimensions, over ggml's {GGML_MAX_DIMS}")
    dims = cursor.unpack(struct.Struct(f"<{dimensions}Q"))
    ggml_type, offset = cursor.unpack(TENSOR_TAIL)
    return tensor, dims, ggml_type, offset


# ---- ONNX ------------------------------------------------------------------------------------------

def check_onnx(handle: BinaryIO, name: str) -> None:
    """An ONNX model is a protobuf ModelProto: its top-level fields walked to the file's end (a graph's
    weights are one length-delimited field, skipped), with ir_version (field 1) first and a graph (7)."""
    cursor = Cursor(handle, name, "ONNX model")
    if os.pread(cursor.fd, 1, 0) != b"\x08":  # the serializer writes ir_version, field 1, first
        raise ModelError(f"{name}: does not start the way ONNX files do; it is corrupt or not ONNX")
    graph = False
    while cursor.pos < cursor.size:
        at = cursor.pos
        tag = cursor.varint()
        field, wire = tag >> 3, tag & 7
        if field == 0 or wire not in (0, 1, 2, 5):
            raise ModelError(f"{name}: ONNX model has a malformed field (tag {tag}) at offset {at}; "
                             "the file is corrupt or not ONNX")
        if wire == 0:
            cursor.varint()
        elif wire == 1:
            cursor.skip(8)
        elif wire == 5:
            cursor.skip(4)
        else:
            cursor.skip(cursor.varint())
            graph = graph or field == 7
    if not graph:
        raise ModelError(f"{name}: ONNX model has no graph (field 7); the file is truncated or not a model")
