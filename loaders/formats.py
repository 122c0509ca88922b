"""How each weight file format is checked, from its header alone: safetensors as the library
itself validates it; PyTorch zip checkpoints, GGUF and ONNX from their directories and headers
(weight_formats.py). No ML framework.
"""

import gc
import json
import math
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import msgspec

from gpu_orchestrator.loaders.weight_formats import ModelError, check_gguf, check_onnx, check_zip_checkpoint

# The safetensors format's own limit (MAX_HEADER_SIZE in the library's src/tensor.rs):
# a larger length is refused before a byte of the header is read.
MAX_SAFETENSORS_HEADER = 100_000_000
USIZE_LIMIT = 2**64  # the library's shapes, offsets and sizes are 64-bit; past that it refuses

# Bits per element of every dtype the safetensors format defines, as Dtype::bitsize() in the
# library's src/tensor.rs (0.8) gives them; sub-byte tensors must end on a byte boundary.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def is_usize(value) -> bool:
    return type(value) is int and 0 <= value < USIZE_LIMIT  # bool is an int to Python, not to JSON


TENSOR_FIELDS = ("dtype", "shape", "data_offsets")
# serde_json refuses JSON nested deeper than this many arrays and objects, even in a field nothing
# reads; a tensor's unknown field lies two levels down (the header's object, the tensor's).
MAX_JSON_NESTING = 127
MAX_EXTRA_NESTING = MAX_JSON_NESTING - 2


class Repeated(dict):
    """A JSON object that gave a key more than once. It reads as the library's maps do (the last
    value wins), and keeps every pair, because the library judges each value given and refuses
    a struct's field (a tensor's dtype, shape or data_offsets, the header's __metadata__) twice."""

    __slots__ = ("pairs",)


def json_object(pairs: list) -> dict:
    found = dict(pairs)
    if len(found) == len(pairs):
        return found
    repeated = Repeated(found)
    repeated.pairs = pairs
    return repeated


def given_twice(found: dict, keys) -> str | None:
    """The first of `keys` that the JSON object `found` gave more than once, if any."""
    if type(found) is Repeated:
        names = [key for key, _ in found.pairs]
        return next((key for key in keys if names.count(key) > 1), None)
    return None


def json_integer(text: str):
    """serde_json reads -0 as a float, which no size, shape or offset may be."""
    return -0.0 if text == "-0" else int(text)


def json_float(text: str) -> float:
    number = float(text)
    if number in (math.inf, -math.inf):
        raise ValueError(f"number {text} out of range")  # serde_json refuses it, wherever it is
    return number


def parse_header(text: bytes):
    """The header's JSON, parsed as strictly as the library's serde_json parses it."""
    if b"\\u" in text:  # an escape: one that names half a UTF-16 pair is refused, as serde_json does
        msgspec.json.decode(text)  # which refuses lone surrogates anywhere; json.loads keeps them
    # parse_float and parse_int cost nothing in a header as the library writes it (no float, no -0).
    return json.loads(text.decode("utf-8"), object_pairs_hook=json_object, parse_constant=_no_constant,
                      parse_float=json_float, parse_int=json_integer if b"-0" in text else None)


@contextmanager
def no_cycle_collection():
    """A header's check makes trees, never a cycle, so the cyclic collector, run again and again as
    a large header's objects appear, would find nothing: a fifth of a 46 MB header's check."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def tensor_fields(name: str, tensor: str, info) -> tuple:
    """(dtype, shape, data_offsets) of one tensor entry, whichever form the library accepts."""
    if type(info) is list and len(info) == 3:
        return tuple(info)  # serde also reads a struct from a JSON array, in field order
    if isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys():
        if field := given_twice(info, TENSOR_FIELDS):
            raise ModelError(f"{name}: tensor {tensor!r} gives {field} twice")
        extra = len(info) > len(TENSOR_FIELDS) or type(info) is Repeated  # rare: the library writes none
        if extra and any(nested_deeper_than(v, MAX_EXTRA_NESTING) for k, v in pairs(info) if k not in TENSOR_FIELDS):
            raise ModelError(f"{name}: tensor {tensor!r} nests arrays or objects deeper than the library's "
                             f"JSON parser allows ({MAX_JSON_NESTING} levels)")
        return info["dtype"], info["shape"], info["data_offsets"]
    raise ModelError(f"{name}: tensor {tensor!r} lacks dtype, shape or data_offsets")


def nested_deeper_than(value, limit: int) -> bool:
    """Whether `value` nests more than `limit` arrays and objects, itself included (level by
    level: Python's own recursion would give out first)."""
    level, depth = [value], 0
    while level := [item for item in level if isinstance(item, (list, dict))]:
        depth += 1
        if depth > limit:
            return True
        level = [child for item in level for child in (item if type(item) is list else [v for _, v in pairs(item)])]
    return False


def check_field_types(name: str, tensor: str, dtype, shape, offsets) -> None:
    """What serde checks as it reads a tensor entry: a known dtype, sizes that are 64-bit unsigned."""
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise ModelError(f"{name}: tensor {tensor!r} has unknown dtype {dtype!r}")
    if not (type(shape) is list and all(map(is_usize, shape))
            and type(offsets) is list and len(offsets) == 2 and all(map(is_usize, offsets))):
        raise ModelError(f"{name}: tensor {tensor!r} has a malformed shape or offsets")


def tensor_bytes(name: str, tensor: str, dtype, shape, offsets) -> tuple[int, int, int, int]:
    """(begin, end, bytes needed, elements) of one tensor entry's fields, checked as the library
    checks them."""
    check_field_types(name, tensor, dtype, shape, offsets)
    count = 1
    for dimension in shape:  # overflowing 64 bits on the way is refused, as the library does
        count *= dimension
        if count >= USIZE_LIMIT:
            raise ModelError(f"{name}: tensor {tensor!r} shape {shape} has more elements than 64 bits count")
    bits = count * SAFETENSORS_DTYPE_BITS[dtype]
    if bits >= USIZE_LIMIT:
        raise ModelError(f"{name}: tensor {tensor!r} {dtype}{shape} has more bits than 64 bits count")
    if bits % 8:
        raise ModelError(f"{name}: tensor {tensor!r} {dtype}{shape} is {bits} bits, which does not end on a byte boundary")
    return offsets[0], offsets[1], bits // 8, count


def pairs(found: dict) -> list:
    """Every (key, value) the JSON object gave, a repeated key's earlier values too."""
    return found.pairs if type(found) is Repeated else list(found.items())


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def check_safetensors(path: Path) -> int:
    """Validate a safetensors file's header against the file; return the parameter count."""
    with open(path, "rb") as handle:
        return safetensors_parameters(handle, path.name)


class SafetensorsHeader(NamedTuple):
    raw: bytes  # the file's first bytes: the 8-byte length and the header
    tensors: list  # (name, dtype, shape, begin, end) of each tensor, offsets into the data; or empty
    parameters: int


def safetensors_parameters(handle: BinaryIO, name: str) -> int:
    """The header of the file open as `handle`, validated; the parameter count."""
    return safetensors_header(handle, name).parameters


def safetensors_header(handle: BinaryIO, name: str, with_tensors: bool = False) -> SafetensorsHeader:
    """The header of the file open as `handle`, validated against the file as the library does;
    each tensor's fields only `with_tensors` (a check alone would keep a list it never reads)."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise ModelError(f"{name}: truncated safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_SAFETENSORS_HEADER:
        raise ModelError(f"{name}: safetensors header length {header_len} is over the format's limit of "
                         f"{MAX_SAFETENSORS_HEADER} bytes; the file is corrupt or not safetensors")
    if 8 + header_len > size:
        raise ModelError(f"{name}: safetensors header length {header_len} does not fit the {size}-byte file")
    text = handle.read(header_len)
    with no_cycle_collection():
        return judge_header(name, prefix, text, size - 8 - header_len, with_tensors)


def judge_header(name: str, prefix: bytes, text: bytes, data_size: int, with_tensors: bool) -> SafetensorsHeader:
    """The header `text`, parsed and checked against the `data_size` bytes that follow it."""
    try:
        header = parse_header(text)
    except (ValueError, RecursionError, msgspec.DecodeError) as exc:  # UnicodeDecodeError is a ValueError
        raise ModelError(f"{name}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{name}: safetensors header is not a JSON object")
    if given_twice(header, ["__metadata__"]):
        raise ModelError(f"{name}: safetensors header gives __metadata__ twice")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for _, v in pairs(metadata))):
        raise ModelError(f"{name}: safetensors __metadata__ must map names to strings")
    for tensor, info in pairs(header) if type(header) is Repeated else ():
        if tensor != "__metadata__" and info is not header[tensor]:  # a tensor given twice: the last one
            check_field_types(name, tensor, *tensor_fields(name, tensor, info))  # counts, but each is read
    ranges, parameters, tensors = [], 0, []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        fields = tensor_fields(name, tensor, info)
        begin, end, needed, count = tensor_bytes(name, tensor, *fields)
        if with_tensors:
            tensors.append((tensor, fields[0], fields[1], begin, end))
        if not begin <= end <= data_size:
            raise ModelError(f"{name}: tensor {tensor!r} bytes {begin}-{end} lie outside the file's {data_size} data bytes; the file is truncated or corrupt")
        if end - begin != needed:
            raise ModelError(f"{name}: tensor {tensor!r} spans {end - begin} bytes but needs {needed}")
        ranges.append((begin, end))
        parameters += count
    # The format indexes the whole data buffer: no overlap, no hole, nothing after the last tensor.
    expected = 0
    for begin, end in sorted(ranges):
        if begin < expected:
            raise ModelError(f"{name}: tensor byte ranges overlap at offset {begin}")
        if begin > expected:
            raise ModelError(f"{name}: {begin - expected} bytes at offset {expected} belong to no tensor")
        expected = end
    if expected != data_size:
        raise ModelError(f"{name}: {data_size - expected} bytes after the last tensor belong to no tensor")
    return SafetensorsHeader(prefix + text, tensors, parameters)


def check_weight(handle: BinaryIO, name: str) -> int | None:
    """Validate one weight file, open as `handle`, by its format; return its parameter count when known."""
    suffix = Path(name).suffix
    if suffix == ".safetensors":
        return safetensors_parameters(handle, name)
    if suffix in (".bin", ".pt", ".pth"):
        check_zip_checkpoint(handle, name)
    elif suffix == ".gguf":
        check_gguf(handle, name)
    elif suffix == ".onnx":
        check_onnx(handle, name)
    return None
