"""How a model is checked and warmed: no ML framework needed.

A model passes when its snapshot is complete (config.json, at least one weight
file in a known format, every safetensors header consistent with its file),
fits the client's memory limit, matches its manifest when it has one, and every
byte of it has been read once, so the page cache is hot when the client starts.
Files are read through one reused buffer: the loader never holds a model copy.

Each file is opened once, by plan(): its checks and warm()'s read go through that
one descriptor, whose size, inode and mtime must not change from the check to the
end of the read, so the bytes read are the bytes checked.
"""

import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from gpu_orchestrator.loaders.store import Snapshot, is_inside

CHUNK = 8 * 1024 * 1024
MANIFEST = "manifest.json"
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


@dataclass
class Plan:
    """What a model is made of, learned from its headers before any weight byte is read.

    `handles` holds each file open as it was checked; warm() reads through them and closes
    them, and close() does when the model is given up before (they close with the Plan too).
    """

    files: list[Path]
    weight_bytes: int
    total_bytes: int
    parameters: int | None
    format: str
    manifest: dict | None = None
    sizes: dict = field(default_factory=dict)
    handles: dict[Path, BinaryIO] = field(default_factory=dict)
    identities: dict[Path, tuple] = field(default_factory=dict)

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def identity(handle: BinaryIO) -> tuple:
    """What changes when a file is written or replaced: size, inode (device too) and mtime."""
    info = os.fstat(handle.fileno())
    return info.st_size, info.st_dev, info.st_ino, info.st_mtime_ns


def is_usize(value) -> bool:
    return type(value) is int and 0 <= value < USIZE_LIMIT  # bool is an int to Python, not to JSON


def tensor_bytes(name: str, tensor: str, info) -> tuple[int, int, int, int]:
    """(begin, end, bytes needed, elements) of one tensor entry, checked as the library checks it."""
    if isinstance(info, list) and len(info) == 3:
        dtype, shape, offsets = info  # serde also reads a struct from a JSON array, in field order
    elif isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys():
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    else:
        raise ModelError(f"{name}: tensor {tensor!r} lacks dtype, shape or data_offsets")
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


def safetensors_parameters(handle: BinaryIO, name: str) -> int:
    """The header of the file open as `handle`, validated; the parameter count."""
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
    try:
        header = json.loads(handle.read(header_len).decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{name}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{name}: safetensors header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ModelError(f"{name}: safetensors __metadata__ must map names to strings")
    data_size = size - 8 - header_len
    ranges, parameters = [], 0
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        begin, end, needed, count = tensor_bytes(name, tensor, info)
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
    return parameters


def check_zip_checkpoint(handle: BinaryIO, name: str) -> None:
    """PyTorch's zip checkpoints: a valid archive with a data.pkl. Never unpickled."""
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


def list_files(snapshot: Snapshot) -> list[Path]:
    """Every regular file of the snapshot, sorted by relative path (the manifest's order),
    each proven to lie inside its confinement."""
    files = []
    for directory, _, names in os.walk(snapshot.path, followlinks=False):
        for name in names:
            path = Path(directory) / name
            real = path.resolve()
            if not is_inside(real, snapshot.confined_to):
                raise ModelError(f"{path} resolves to {real}, outside {snapshot.confined_to}; refused")
            if real.is_file():
                files.append(path)
    return sorted(files, key=lambda f: f.relative_to(snapshot.path).as_posix())


def plan(snapshot: Snapshot) -> Plan:
    """Check completeness and headers; nothing is read beyond headers yet. Every file stays open
    in the plan, so warm() reads what was checked here."""
    root = snapshot.path
    everything = list_files(snapshot)
    files = [f for f in everything if f != root / MANIFEST]
    relative = {f.relative_to(root).as_posix() for f in files}
    if "config.json" not in relative:
        raise ModelError(f"{root}: config.json is missing; the snapshot is incomplete")
    weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise ModelError(f"{root}: no weight file ({', '.join(WEIGHT_SUFFIXES)}); the snapshot is incomplete")
    handles = {}
    try:
        for path in files:
            handles[path] = open(path, "rb", buffering=0)
        identities = {path: identity(handle) for path, handle in handles.items()}
        check_shard_index(handles, root, relative)
        check_configs(handles, root, relative)
        counts = [c for c in (check_weight(handles[f], f.name) for f in weights) if c is not None]
        manifest = read_manifest(root) if len(everything) > len(files) else None
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    sizes = {path: info[0] for path, info in identities.items()}
    return Plan(
        files=files,
        weight_bytes=sum(sizes[f] for f in weights),
        total_bytes=sum(sizes.values()),
        parameters=sum(counts) if counts else None,
        format="+".join(sorted({f.suffix.lstrip(".") for f in weights})),
        manifest=manifest,
        sizes=sizes,
        handles=handles,
        identities=identities,
    )


def check_shard_index(handles: dict, root: Path, relative: set[str]) -> None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name not in relative:
            continue
        try:
            weight_map = read_json(handles, root, index_name)["weight_map"]
            shards = set(weight_map.values())
        except (ModelError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index_name}: not a valid shard index") from None
        missing = sorted(s for s in shards if s not in relative)
        if missing:
            raise ModelError(f"{index_name} names shards that are missing: {', '.join(missing)}")


# sentence-transformers modules that load nothing from their folder, which may then be absent.
PARAMETERLESS_MODULES = {"sentence_transformers.models.Normalize"}


def read_json(handles: dict, root: Path, name: str):
    """A snapshot file as JSON, read through the descriptor the plan holds for it."""
    handle = handles[root / name]
    handle.seek(0)
    try:
        return json.loads(handle.read().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{name}: not valid JSON ({exc})") from None


def check_configs(handles: dict, root: Path, relative: set[str]) -> None:
    """config.json parses; tokenizer files it names exist; sentence-transformers modules have their folders."""
    if not isinstance(read_json(handles, root, "config.json"), dict):
        raise ModelError("config.json: not a JSON object")
    if "tokenizer_config.json" in relative:
        tokenizer = read_json(handles, root, "tokenizer_config.json")
        named = [v for k, v in tokenizer.items() if k.endswith("_file") and isinstance(v, str)] \
            if isinstance(tokenizer, dict) else []
        missing = sorted(n for n in named if not os.path.isabs(n) and n not in relative)
        if missing:
            raise ModelError(f"tokenizer_config.json names files that are missing: {', '.join(missing)}")
    if "modules.json" in relative:
        modules = read_json(handles, root, "modules.json")
        if not isinstance(modules, list):
            raise ModelError("modules.json: not a list of modules")
        for module in modules:
            folder = module.get("path", "") if isinstance(module, dict) else None
            if folder is None:
                raise ModelError("modules.json: an entry is not an object with a path")
            if folder and module.get("type") not in PARAMETERLESS_MODULES and not (root / folder).is_dir():
                raise ModelError(f"modules.json: module {module.get('name', '?')} ({module.get('type')}) "
                                 f"needs folder {folder}, which is missing")


def read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        checksum = manifest["checksum"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{root / MANIFEST}: unreadable manifest ({exc})") from None
    if not isinstance(checksum, str) or not checksum.removeprefix("sha256:"):
        raise ModelError(f"{root / MANIFEST}: checksum must be a sha256 hex string")
    return manifest


def add_path_to_digest(digest, relative_path: str) -> None:
    """Each file contributes its relative path, a NUL, then its bytes (README, "The model store")."""
    digest.update(relative_path.encode() + b"\0")


def snapshot_checksum(root: Path) -> str:
    """The manifest checksum of a directory, for whoever writes a manifest."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(CHUNK))
    for path in list_files(Snapshot(root.resolve(), root.resolve(), "local")):
        relative = path.relative_to(root).as_posix()
        if relative != MANIFEST:
            add_path_to_digest(digest, relative)
            with open(path, "rb", buffering=0) as handle:
                read_file(handle, path, identity(handle), view, digest, lambda n: None)
    return "sha256:" + digest.hexdigest()


Progress = Callable[[int], None]


def warm(snapshot: Snapshot, model_plan: Plan, progress: Progress) -> bool:
    """Read every byte once (hashing when there is a manifest); return True if verified.

    `progress(bytes_done)` is called after every chunk; it may raise to abandon. Reads go
    through the descriptors the plan checked, which are closed afterwards.
    """
    digest = hashlib.sha256() if model_plan.manifest else None
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    done = 0
    try:
        for path in model_plan.files:
            relative = path.relative_to(snapshot.path).as_posix()
            if digest is not None:
                add_path_to_digest(digest, relative)
            done += read_file(model_plan.handles[path], path, model_plan.identities[path], view, digest,
                              lambda n: progress(done + n))
    finally:
        model_plan.close()
    if digest is not None:
        expected = model_plan.manifest["checksum"].removeprefix("sha256:")
        if digest.hexdigest() != expected:
            raise ModelError(f"manifest checksum mismatch: expected sha256:{expected}, got sha256:{digest.hexdigest()}; the snapshot was altered or is incomplete")
    return digest is not None


def changes(checked: tuple, now: tuple, path: Path) -> str:
    """What differs between the identity() checked and the descriptor's `now`, in words; also
    whether the path still names that file (the client will open the path)."""
    said = []
    if now[0] != checked[0]:
        said.append(f"size changed from {checked[0]} to {now[0]} bytes")
    if now[1:3] != checked[1:3]:
        said.append("it is another file (inode)")
    if now[3] != checked[3]:
        said.append("its mtime changed")
    current = os.stat(path)
    if (current.st_dev, current.st_ino) != checked[1:3]:
        said.append("the path now names another file")
    return ", ".join(said)


def read_file(handle: BinaryIO, path: Path, checked: tuple, view: memoryview, digest, progress: Progress) -> int:
    """Read the file open as `handle` through `view`; fail if it is not the file that was checked
    (`checked`, its identity() then), changes while read, or its path now names another file."""
    if before := changes(checked, identity(handle), path):
        raise ModelError(f"{path.name}: changed since it was checked ({before}); the store must be immutable")
    handle.seek(0)
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    done = 0
    # Never past the checked size: a file that keeps growing would otherwise be read forever.
    while done < checked[0] and (n := handle.readinto(view[:checked[0] - done])):
        if digest is not None:
            digest.update(view[:n])
        done += n
        progress(done)
    during = changes(checked, identity(handle), path)
    if not during and done != checked[0]:
        during = f"read {done} of its {checked[0]} bytes"
    if during:
        raise ModelError(f"{path.name}: changed while it was being read ({during}); the store must be immutable")
    return done


def check_fits(model_plan: Plan, used_bytes: int, limit_bytes: int | None) -> None:
    """Refuse, before reading, a model that would take the client past its memory limit."""
    if limit_bytes is not None and used_bytes + model_plan.weight_bytes > limit_bytes:
        raise ModelError(
            f"needs {model_plan.weight_bytes / 2**30:.2f} GiB of weights, but the client's limit is "
            f"{limit_bytes / 2**30:.2f} GiB with {used_bytes / 2**30:.2f} GiB already taken by its other models; "
            "raise mps_memory_limit_gb for this client or move the model to another client")
