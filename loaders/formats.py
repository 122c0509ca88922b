"""How each weight file format is checked, from its header alone: safetensors as the library
itself validates it, PyTorch zip checkpoints, GGUF and ONNX by how they start. No ML framework.
"""

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, NamedTuple

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


class ModelError(Exception):
    """This model cannot be used; the message says why and, where it can, what to do."""


def is_usize(value) -> bool:
    return type(value) is int and 0 <= value < USIZE_LIMIT  # bool is an int to Python, not to JSON


def tensor_fields(name: str, tensor: str, info) -> tuple:
    """(dtype, shape, data_offsets) of one tensor entry, whichever form the library accepts."""
    if isinstance(info, list) and len(info) == 3:
        return tuple(info)  # serde also reads a struct from a JSON array, in field order
    if isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys():
        return info["dtype"], info["shape"], info["data_offsets"]
    raise ModelError(f"{name}: tensor {tensor!r} lacks dtype, shape or data_offsets")


def tensor_bytes(name: str, tensor: str, dtype, shape, offsets) -> tuple[int, int, int, int]:
    """(begin, end, bytes needed, elements) of one tensor entry's fields, checked as the library
    checks them."""
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise ModelError(f"{name}: tensor {tensor!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(map(is_usize, shape))
            and isinstance(offsets, list) and len(offsets) == 2 and all(map(is_usize, offsets))):
        raise ModelError(f"{name}: tensor {tensor!r} has a malformed shape or offsets")
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
    try:
        header = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{name}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{name}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ModelError(f"{name}: safetensors __metadata__ must map names to strings")
    data_size = size - 8 - header_len
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


def check_zip_checkpoint(handle: BinaryIO, name: str) -> None:
    """PyTorch's zip checkpoints: a valid archive with a data.pkl. Never unpickled."""
    import zipfile  # only here: most stores hold safetensors, and a loader keeps what it imports

    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{name}: not a valid PyTorch zip checkpoint: {exc}") from None
    if not any(entry.endswith("/data.pkl") or entry == "data.pkl" for entry in names):
        raise ModelError(f"{name}: PyTorch checkpoint has no data.pkl")


def check_magic(handle: BinaryIO, name: str, magic: bytes, what: str) -> None:
    handle.seek(0)
    if handle.read(len(magic)) != magic:
        raise ModelError(f"{name}: does not start the way {what} files do; it is corrupt or not {what}")


def check_weight(handle: BinaryIO, name: str) -> int | None:
    """Validate one weight file, open as `handle`, by its format; return its parameter count when known."""
    suffix = Path(name).suffix
    if suffix == ".safetensors":
        return safetensors_parameters(handle, name)
    if suffix in (".bin", ".pt", ".pth"):
        check_zip_checkpoint(handle, name)
    elif suffix == ".gguf":
        check_magic(handle, name, b"GGUF", "GGUF")
    elif suffix == ".onnx":
        # An ONNX model is a protobuf ModelProto whose first field is ir_version (tag 0x08).
        check_magic(handle, name, b"\x08", "ONNX")
    return None
