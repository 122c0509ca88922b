"""How a model is checked and warmed: no ML framework needed.

A model passes when its snapshot is complete (config.json, at least one weight
file in a known format, every safetensors header consistent with its file),
fits the client's memory limit, matches its manifest when it has one, and every
byte of it has been read once, so the page cache is hot when the client starts.
Files are read through one reused buffer: the loader never holds a model copy.
"""

import hashlib
import json
import math
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gpu_orchestrator.loaders.store import Snapshot, is_inside

CHUNK = 8 * 1024 * 1024
MANIFEST = "manifest.json"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

# Bytes per element of every dtype the safetensors format defines.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


class ModelError(Exception):
    """This model cannot be used; the message says why and, where it can, what to do."""


@dataclass
class Plan:
    """What a model is made of, learned from its headers before any weight byte is read."""

    files: list[Path]
    weight_bytes: int
    total_bytes: int
    parameters: int | None
    format: str
    manifest: dict | None = None
    sizes: dict = field(default_factory=dict)


def check_safetensors(path: Path) -> int:
    """Validate a safetensors header against its file; return the parameter count."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelError(f"{path.name}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise ModelError(f"{path.name}: safetensors header length {header_len} does not fit the {size}-byte file")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path.name}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path.name}: safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    ranges, parameters = [], 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ModelError(f"{path.name}: tensor {name!r} lacks dtype, shape or data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise ModelError(f"{path.name}: tensor {name!r} has a malformed shape or offsets")
        count = math.prod(shape)
        if not 0 <= begin <= end <= data_size:
            raise ModelError(f"{path.name}: tensor {name!r} bytes {begin}-{end} lie outside the file's {data_size} data bytes; the file is truncated or corrupt")
        if end - begin != count * SAFETENSORS_DTYPES[dtype]:
            raise ModelError(f"{path.name}: tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {count * SAFETENSORS_DTYPES[dtype]}")
        ranges.append((begin, end))
        parameters += count
    # The format indexes the whole data buffer: no overlap, no hole, nothing after the last tensor.
    expected = 0
    for begin, end in sorted(ranges):
        if begin < expected:
            raise ModelError(f"{path.name}: tensor byte ranges overlap at offset {begin}")
        if begin > expected:
            raise ModelError(f"{path.name}: {begin - expected} bytes at offset {expected} belong to no tensor")
        expected = end
    if expected != data_size:
        raise ModelError(f"{path.name}: {data_size - expected} bytes after the last tensor belong to no tensor")
    return parameters


def check_zip_checkpoint(path: Path) -> None:
    """PyTorch's zip checkpoints: a valid archive with a data.pkl. Never unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path.name}: not a valid PyTorch zip checkpoint: {exc}") from None
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise ModelError(f"{path.name}: PyTorch checkpoint has no data.pkl")


def check_magic(path: Path, magic: bytes, what: str) -> None:
    with open(path, "rb") as handle:
        if handle.read(len(magic)) != magic:
            raise ModelError(f"{path.name}: does not start the way {what} files do; it is corrupt or not {what}")


def check_weight(path: Path) -> int | None:
    """Validate one weight file by its format; return its parameter count when known."""
    suffix = path.suffix
    if suffix == ".safetensors":
        return check_safetensors(path)
    if suffix in (".bin", ".pt", ".pth"):
        check_zip_checkpoint(path)
    elif suffix == ".gguf":
        check_magic(path, b"GGUF", "GGUF")
    elif suffix == ".onnx":
        # An ONNX model is a protobuf ModelProto whose first field is ir_version (tag 0x08).
        check_magic(path, b"\x08", "ONNX")
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
    """Check completeness and headers; nothing is read beyond headers yet."""
    root = snapshot.path
    everything = list_files(snapshot)
    files = [f for f in everything if f != root / MANIFEST]
    relative = {f.relative_to(root).as_posix() for f in files}
    if "config.json" not in relative:
        raise ModelError(f"{root}: config.json is missing; the snapshot is incomplete")
    weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise ModelError(f"{root}: no weight file ({', '.join(WEIGHT_SUFFIXES)}); the snapshot is incomplete")
    check_shard_index(root, relative)
    check_configs(root, relative)
    counts = [c for c in map(check_weight, weights) if c is not None]
    sizes = {f: f.stat().st_size for f in files}
    return Plan(
        files=files,
        weight_bytes=sum(sizes[f] for f in weights),
        total_bytes=sum(sizes.values()),
        parameters=sum(counts) if counts else None,
        format="+".join(sorted({f.suffix.lstrip(".") for f in weights})),
        manifest=read_manifest(root) if len(everything) > len(files) else None,
        sizes=sizes,
    )


def check_shard_index(root: Path, relative: set[str]) -> None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name not in relative:
            continue
        try:
            weight_map = json.loads((root / index_name).read_text())["weight_map"]
            shards = set(weight_map.values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index_name}: not a valid shard index") from None
        missing = sorted(s for s in shards if s not in relative)
        if missing:
            raise ModelError(f"{index_name} names shards that are missing: {', '.join(missing)}")


# sentence-transformers modules that load nothing from their folder, which may then be absent.
PARAMETERLESS_MODULES = {"sentence_transformers.models.Normalize"}


def read_json(root: Path, name: str):
    try:
        return json.loads((root / name).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{name}: not valid JSON ({exc})") from None


def check_configs(root: Path, relative: set[str]) -> None:
    """config.json parses; tokenizer files it names exist; sentence-transformers modules have their folders."""
    if not isinstance(read_json(root, "config.json"), dict):
        raise ModelError("config.json: not a JSON object")
    if "tokenizer_config.json" in relative:
        tokenizer = read_json(root, "tokenizer_config.json")
        named = [v for k, v in tokenizer.items() if k.endswith("_file") and isinstance(v, str)] \
            if isinstance(tokenizer, dict) else []
        missing = sorted(n for n in named if not os.path.isabs(n) and n not in relative)
        if missing:
            raise ModelError(f"tokenizer_config.json names files that are missing: {', '.join(missing)}")
    if "modules.json" in relative:
        modules = read_json(root, "modules.json")
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
    """Each file contributes its relative path, a NUL, then its bytes (DESIGN.md)."""
    digest.update(relative_path.encode() + b"\0")


def snapshot_checksum(root: Path) -> str:
    """The manifest checksum of a directory, for whoever writes a manifest."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(CHUNK))
    for path in list_files(Snapshot(root.resolve(), root.resolve(), "local")):
        relative = path.relative_to(root).as_posix()
        if relative != MANIFEST:
            add_path_to_digest(digest, relative)
            read_file(path, path.stat().st_size, view, digest, lambda n: None)
    return "sha256:" + digest.hexdigest()


Progress = Callable[[int], None]


def warm(snapshot: Snapshot, model_plan: Plan, progress: Progress) -> bool:
    """Read every byte once (hashing when there is a manifest); return True if verified.

    `progress(bytes_done)` is called after every chunk; it may raise to abandon.
    """
    digest = hashlib.sha256() if model_plan.manifest else None
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    done = 0
    for path in model_plan.files:
        relative = path.relative_to(snapshot.path).as_posix()
        if digest is not None:
            add_path_to_digest(digest, relative)
        done += read_file(path, model_plan.sizes[path], view, digest, lambda n: progress(done + n))
    if digest is not None:
        expected = model_plan.manifest["checksum"].removeprefix("sha256:")
        if digest.hexdigest() != expected:
            raise ModelError(f"manifest checksum mismatch: expected sha256:{expected}, got sha256:{digest.hexdigest()}; the snapshot was altered or is incomplete")
    return digest is not None


def read_file(path: Path, planned_size: int, view: memoryview, digest, progress: Progress) -> int:
    """Read a file through `view`; fail if it changes size or is replaced meanwhile."""
    with open(path, "rb", buffering=0) as handle:
        before = os.fstat(handle.fileno())
        if before.st_size != planned_size:
            raise ModelError(f"{path.name}: size changed from {planned_size} to {before.st_size} bytes since it was checked")
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        while n := handle.readinto(view):
            if digest is not None:
                digest.update(view[:n])
            done += n
            progress(done)
        after = os.fstat(handle.fileno())
    current = os.stat(path)
    if done != planned_size or after.st_mtime_ns != before.st_mtime_ns or (current.st_ino, current.st_dev) != (before.st_ino, before.st_dev):
        raise ModelError(f"{path.name}: changed while it was being read; the store must be immutable")
    return done


def check_fits(model_plan: Plan, used_bytes: int, limit_bytes: int | None) -> None:
    """Refuse, before reading, a model that would take the client past its memory limit."""
    if limit_bytes is not None and used_bytes + model_plan.weight_bytes > limit_bytes:
        raise ModelError(
            f"needs {model_plan.weight_bytes / 2**30:.2f} GiB of weights, but the client's limit is "
            f"{limit_bytes / 2**30:.2f} GiB with {used_bytes / 2**30:.2f} GiB already taken by its other models; "
            "raise mps_memory_limit_gb for this client or move the model to another client")
