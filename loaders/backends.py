"""How a model is checked and warmed: no ML framework needed.

A model passes when its snapshot is complete (config.json, at least one weight
file in a known format, every header as formats.py checks it),
fits the client's memory limit, matches its manifest when it has one, and every
byte of it has been read once, so the page cache is hot when the client starts.
Files are read through one buffer per model: the loader never holds a model copy.

plan() records each file's identity (size, inode, mtime, ctime) as it checks it, and warm() reads it
through a descriptor whose identity must still be that one, before and after the read, so the
bytes read are the bytes checked. No file stays open between the two: a snapshot of thousands
of files must not need thousands of descriptors (systemd's soft limit is 1024).

A loader keeps what it imports for good: hashlib (OpenSSL) is imported only to verify a manifest,
zipfile only for a zip checkpoint; the read buffer is unmapped after each model (a freed heap
block would stay resident).

Every file is opened by snapshot_files.open_regular(): without blocking, and only a regular file.
"""

import json
import mmap
import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable

import msgspec

from gpu_orchestrator.loaders.formats import WEIGHT_SUFFIXES, ModelError, check_weight
from gpu_orchestrator.loaders.snapshot_files import (
    check_unchanged_after,
    check_unchanged_before,
    escaped,
    identity,
    list_files,
    open_checked,
    open_regular,
    read_whole,
)
from gpu_orchestrator.loaders.store import Snapshot

# One read's size, and the read buffer's. Small enough to stay in the core's L2 cache and to be
# paged in by a few dozen faults: a fresh 8 MiB buffer took 2048 page faults per model (each a
# zeroed 4 KiB page) and missed the cache on every copy, 2.4x the CPU time of this size for the
# same bytes (48 clients x 2 models, 2.15 GiB, hot cache: 0.84-1.07 s against 0.43-0.55 s).
CHUNK = 256 * 1024
# Progress (and with it the loader's look at signals and stdin) every this many bytes and at each
# file's end: per 256 KiB read it was a tenth of a warm-up's CPU time.
PROGRESS_BYTES = 8 * 1024 * 1024
MANIFEST = "manifest.json"


class Plan(msgspec.Struct):
    """What a model is made of, learned from its headers before any weight byte is read.

    `identities` holds each file's identity() as it was checked; warm() reads only those files.
    """

    files: list[Path]
    weight_bytes: int
    total_bytes: int
    parameters: int | None
    format: str
    manifest: dict | None = None
    sizes: dict = {}
    identities: dict[Path, tuple] = {}


# The snapshot's JSON files that plan() reads to check the others.
CHECKED_JSON = ("config.json", "tokenizer_config.json", "modules.json",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")


def plan(snapshot: Snapshot) -> Plan:
    """Check completeness and headers; nothing is read beyond headers yet. Each file is opened,
    checked and closed in turn (one open at a time), and its identity kept for warm()."""
    root = snapshot.path
    everything = list_files(snapshot)
    files = [f for f in everything if f != root / MANIFEST]
    relative = {f.relative_to(root).as_posix() for f in files}
    if "config.json" not in relative:
        raise ModelError(f"{root}: config.json is missing; the snapshot is incomplete")
    weights = [f for f in files if f.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise ModelError(f"{root}: no weight file ({', '.join(WEIGHT_SUFFIXES)}); the snapshot is incomplete")
    identities, texts, counts = {}, {}, []
    for path in files:
        name = path.relative_to(root).as_posix()
        with open_regular(path) as handle:
            identities[path] = identity(handle)
            if name in CHECKED_JSON:
                texts[name] = read_whole(handle, path, identities[path][0])
    check_shard_index(texts, relative)
    check_configs(texts, root, relative)
    for path in weights:  # checked after the configs: a broken config is the first thing to fix
        with open_checked(path, identities[path]) as handle:
            if (count := check_weight(handle, path.name)) is not None:
                counts.append(count)
    # Not only when the walk listed it: a manifest.json that is a FIFO, a folder or a dangling link
    # is not ignored (the model would pass unverified), it fails the model.
    manifest = read_manifest(root) if os.path.lexists(root / MANIFEST) else None
    sizes = {path: info[0] for path, info in identities.items()}
    return Plan(
        files=files,
        weight_bytes=sum(sizes[f] for f in weights),
        total_bytes=sum(sizes.values()),
        parameters=sum(counts) if counts else None,
        format="+".join(sorted({f.suffix.lstrip(".") for f in weights})),
        manifest=manifest,
        sizes=sizes,
        identities=identities,
    )


# Each shard index, and the suffix of the weight files it may name as shards.
SHARD_INDEXES = {"model.safetensors.index.json": ".safetensors", "pytorch_model.bin.index.json": ".bin"}


def check_shard_index(texts: dict, relative: set[str]) -> None:
    for index_name, suffix in SHARD_INDEXES.items():
        if index_name not in relative:
            continue
        try:
            weight_map = read_json(texts, index_name)["weight_map"]
            shards = set(weight_map.values())
        except (ModelError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index_name}: not a valid shard index") from None
        if not all(isinstance(s, str) for s in shards):
            raise ModelError(f"{index_name}: not a valid shard index (a shard name that is not a string)")
        if others := sorted(s for s in shards if PurePosixPath(s).suffix != suffix):
            raise ModelError(f"{index_name} names files that are not {suffix} weight files as shards: "
                             f"{', '.join(others)}")
        missing = sorted(s for s in shards if s not in relative)
        if missing:
            raise ModelError(f"{index_name} names shards that are missing: {', '.join(missing)}")


# sentence-transformers modules that load nothing from their folder, which may then be absent.
PARAMETERLESS_MODULES = {"sentence_transformers.models.Normalize"}


def outside(name: str) -> bool:
    """A path named by a snapshot file that leads out of the snapshot: absolute, or climbing `..`."""
    inside = PurePosixPath(name)
    return inside.is_absolute() or ".." in inside.parts


def read_json(texts: dict, name: str):
    """A snapshot file as JSON, from the bytes plan() read through the descriptor it checked."""
    try:
        return json.loads(texts[name].decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ModelError(f"{name}: not valid JSON ({exc})") from None


def check_configs(texts: dict, root: Path, relative: set[str]) -> None:
    """config.json parses; tokenizer files it names exist; sentence-transformers modules have their folders."""
    if not isinstance(read_json(texts, "config.json"), dict):
        raise ModelError("config.json: not a JSON object")
    if "tokenizer_config.json" in relative:
        tokenizer = read_json(texts, "tokenizer_config.json")
        named = [v for k, v in tokenizer.items() if k.endswith("_file") and isinstance(v, str)] \
            if isinstance(tokenizer, dict) else []
        # A name outside the snapshot only records where the saver's file was (transformers 4 wrote its
        # absolute cache path into tokenizer_file, in snapshots that load everywhere): transformers
        # opens the snapshot's own file by that name, never the path. A name inside must be there.
        missing = sorted(n for n in named if not outside(n) and n not in relative)
        if missing:
            raise ModelError(f"tokenizer_config.json names files that are missing: {', '.join(missing)}")
    if "modules.json" in relative:
        modules = read_json(texts, "modules.json")
        if not isinstance(modules, list):
            raise ModelError("modules.json: not a list of modules")
        for module in modules:
            folder = module.get("path", "") if isinstance(module, dict) else None
            if folder is None:
                raise ModelError("modules.json: an entry is not an object with a path")
            if not folder or module.get("type") in PARAMETERLESS_MODULES:
                continue
            shown = f"modules.json: module {module.get('name', '?')} ({module.get('type')})"
            inside = PurePosixPath(folder)
            if outside(folder):  # sentence-transformers would load it from there
                raise ModelError(f"{shown} names folder {folder}, outside the snapshot; its files must be in it")
            # A folder of the snapshot's own checked files: its existence alone (is_dir) said nothing
            # of what the client loads from it.
            if not any(name.startswith(inside.as_posix() + "/") for name in relative):
                raise ModelError(f"{shown} needs folder {folder}, which is missing")


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        handle = open_regular(path)
    except FileNotFoundError:  # removed since plan() found it (the walk refuses a link to nothing)
        raise ModelError(f"{escaped(path)}: manifest.json is gone since the snapshot was listed; "
                         "the store must be immutable") from None
    except ModelError:
        raise ModelError(f"{escaped(path)}: manifest.json is not a regular file") from None
    with handle:
        text = read_whole(handle, path, os.fstat(handle.fileno()).st_size)
    try:
        manifest = json.loads(text.decode("utf-8"))
        checksum = manifest["checksum"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ModelError(f"{escaped(path)}: unreadable manifest ({exc})") from None
    if not isinstance(checksum, str) or not checksum.removeprefix("sha256:"):
        raise ModelError(f"{escaped(path)}: checksum must be a sha256 hex string")
    return manifest


def add_path_to_digest(digest, relative_path: str) -> None:
    """Each file contributes its relative path, a NUL, then its bytes (README, "The model store")."""
    # The name's bytes as the file system holds them: a name that is not UTF-8 has no other.
    digest.update(os.fsencode(relative_path) + b"\0")


def snapshot_checksum(root: Path, store: Path | None = None) -> str:
    """The manifest checksum of a directory, for whoever writes a manifest; links in it may lead
    anywhere inside `store` (by default, only inside the directory)."""
    import hashlib

    digest = hashlib.sha256()
    root = root.resolve()  # the files are listed resolved: a relative root, or one through a symlink, too
    with read_buffer() as view:
        for path in list_files(Snapshot(root, root if store is None else store.resolve(), "local")):
            relative = path.relative_to(root).as_posix()
            if relative != MANIFEST:
                add_path_to_digest(digest, relative)
                with open_regular(path) as handle:
                    read_file(handle, path, identity(handle), view, digest, lambda n: None)
    return "sha256:" + digest.hexdigest()


@contextmanager
def read_buffer():
    """A CHUNK-byte memoryview for one model's reads, an anonymous mapping unmapped afterwards."""
    mapping = mmap.mmap(-1, CHUNK)
    view = memoryview(mapping)
    try:
        yield view
    finally:
        view.release()
        mapping.close()


Progress = Callable[[int], None]
# place(handle, path, checked, digest, progress) reads a weight file as read_file does (same
# checks, every byte into `digest` in order) and puts it somewhere: the torch backend's device.
Place = Callable[[BinaryIO, Path, tuple, object, Progress], int]


def warm(snapshot: Snapshot, model_plan: Plan, progress: Progress, place: Place | None = None) -> bool:
    """Read every byte once (hashing when there is a manifest); return True if verified.

    `progress(bytes_done)` is called after every chunk; it may raise to abandon. Each file is
    reopened and must still be the one the plan checked (open_checked), then closed. With
    `place`, the safetensors files are read by it instead, so their bytes are read once, not twice.
    """
    digest = None
    if model_plan.manifest:
        import hashlib  # only for a manifest: it loads OpenSSL, which the loader then keeps

        digest = hashlib.sha256()
    done = 0
    with read_buffer() as view:
        for path in model_plan.files:
            relative = path.relative_to(snapshot.path).as_posix()
            if digest is not None:
                add_path_to_digest(digest, relative)
            checked = model_plan.identities[path]
            step = lambda n: progress(done + n)  # noqa: E731  (done: the files before this one)
            with open_checked(path, checked) as handle:
                if place is not None and path.suffix == ".safetensors":
                    done += place(handle, path, checked, digest, step)
                else:
                    done += read_file(handle, path, checked, view, digest, step)
    if digest is not None:
        expected = model_plan.manifest["checksum"].removeprefix("sha256:")
        if digest.hexdigest() != expected.lower():  # hex in either case: the same digest
            raise ModelError(f"manifest checksum mismatch: expected sha256:{expected}, got sha256:{digest.hexdigest()}; the snapshot was altered or is incomplete")
    return digest is not None


def read_file(handle: BinaryIO, path: Path, checked: tuple, view: memoryview, digest, progress: Progress) -> int:
    """Read the file open as `handle` through `view`; fail if it is not the file that was checked
    (`checked`, its identity() then), changes while read, or its path now names another file."""
    check_unchanged_before(handle, path, checked)
    handle.seek(0)
    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    done = reported = 0
    # Never past the checked size: a file that keeps growing would otherwise be read forever.
    while done < checked[0] and (n := handle.readinto(view[:checked[0] - done])):
        if digest is not None:
            digest.update(view[:n])
        done += n
        if done - reported >= PROGRESS_BYTES or done == checked[0]:
            progress(done)
            reported = done
    check_unchanged_after(handle, path, checked, done)
    return done


def check_fits(model_plan: Plan, used_bytes: int, limit_bytes: int | None) -> None:
    """Refuse, before reading, a model that would take the client past its memory limit."""
    if limit_bytes is not None and used_bytes + model_plan.weight_bytes > limit_bytes:
        raise ModelError(
            f"needs {model_plan.weight_bytes / 2**30:.2f} GiB of weights, but the client's limit is "
            f"{limit_bytes / 2**30:.2f} GiB with {used_bytes / 2**30:.2f} GiB already taken by its other models; "
            "raise mps_memory_limit_gb for this client or move the model to another client")
