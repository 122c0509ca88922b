"""How a model is checked and warmed: no ML framework needed.

A model passes when its snapshot is complete (config.json, at least one weight
file in a known format, every header as formats.py checks it),
fits the client's memory limit, matches its manifest when it has one, and every
byte of it has been read once, so the page cache is hot when the client starts.
Files are read through one buffer per model: the loader never holds a model copy.

Each file is opened once, by plan(): its checks and warm()'s read go through that
one descriptor, whose size, inode and mtime must not change from the check to the
end of the read, so the bytes read are the bytes checked.

A loader keeps what it imports for good: hashlib (OpenSSL) is imported only to verify a manifest,
zipfile only for a zip checkpoint; the read buffer is unmapped after each model (a freed heap
block would stay resident).
"""

import json
import mmap
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

import msgspec

from gpu_orchestrator.loaders.formats import WEIGHT_SUFFIXES, ModelError, check_weight
from gpu_orchestrator.loaders.store import Snapshot, is_inside

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

    `handles` holds each file open as it was checked; warm() reads through them and closes
    them, and close() does when the model is given up before (they close with the Plan too).
    """

    files: list[Path]
    weight_bytes: int
    total_bytes: int
    parameters: int | None
    format: str
    manifest: dict | None = None
    sizes: dict = {}
    handles: dict[Path, BinaryIO] = {}
    identities: dict[Path, tuple] = {}

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()


def identity(handle: BinaryIO) -> tuple:
    """What changes when a file is written or replaced: size, inode (device too) and mtime."""
    info = os.fstat(handle.fileno())
    return info.st_size, info.st_dev, info.st_ino, info.st_mtime_ns


def list_files(snapshot: Snapshot) -> list[Path]:
    """Every regular file of the snapshot, sorted by relative path (the manifest's order),
    each proven to lie inside its confinement.

    Only a symbolic link is resolved: the walk never follows one, so every other name's real
    path is the snapshot's real path joined with its relative path. One lstat per name instead of
    one per component of its path (a fifth of a warm-up's checks with 48 loaders x 2 models)."""
    files = []
    real_root = Path(os.path.realpath(snapshot.path))
    for directory, _, names in os.walk(snapshot.path, followlinks=False):
        real_directory = real_root / os.path.relpath(directory, snapshot.path)
        for name in names:
            path = Path(directory) / name
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue  # gone since the walk listed it: not part of the snapshot
            link = stat.S_ISLNK(mode)
            real = path.resolve() if link else real_directory / name
            if not is_inside(real, snapshot.confined_to):
                raise ModelError(f"{path} resolves to {real}, outside {snapshot.confined_to}; refused")
            if real.is_file() if link else stat.S_ISREG(mode):
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
    import hashlib

    digest = hashlib.sha256()
    root = root.resolve()  # the files are listed resolved: a relative root, or one through a symlink, too
    with read_buffer() as view:
        for path in list_files(Snapshot(root, root, "local")):
            relative = path.relative_to(root).as_posix()
            if relative != MANIFEST:
                add_path_to_digest(digest, relative)
                with open(path, "rb", buffering=0) as handle:
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

    `progress(bytes_done)` is called after every chunk; it may raise to abandon. Reads go
    through the descriptors the plan checked, which are closed afterwards. With `place`, the
    safetensors files are read by it instead, so their bytes are read once, not twice.
    """
    digest = None
    if model_plan.manifest:
        import hashlib  # only for a manifest: it loads OpenSSL, which the loader then keeps

        digest = hashlib.sha256()
    done = 0
    try:
        with read_buffer() as view:
            for path in model_plan.files:
                relative = path.relative_to(snapshot.path).as_posix()
                if digest is not None:
                    add_path_to_digest(digest, relative)
                handle, checked = model_plan.handles[path], model_plan.identities[path]
                step = lambda n: progress(done + n)  # noqa: E731  (done: the files before this one)
                if place is not None and path.suffix == ".safetensors":
                    done += place(handle, path, checked, digest, step)
                else:
                    done += read_file(handle, path, checked, view, digest, step)
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


def check_unchanged_before(handle: BinaryIO, path: Path, checked: tuple) -> None:
    if before := changes(checked, identity(handle), path):
        raise ModelError(f"{path.name}: changed since it was checked ({before}); the store must be immutable")


def check_unchanged_after(handle: BinaryIO, path: Path, checked: tuple, done: int) -> None:
    during = changes(checked, identity(handle), path)
    if not during and done != checked[0]:
        during = f"read {done} of its {checked[0]} bytes"
    if during:
        raise ModelError(f"{path.name}: changed while it was being read ({during}); the store must be immutable")


def check_fits(model_plan: Plan, used_bytes: int, limit_bytes: int | None) -> None:
    """Refuse, before reading, a model that would take the client past its memory limit."""
    if limit_bytes is not None and used_bytes + model_plan.weight_bytes > limit_bytes:
        raise ModelError(
            f"needs {model_plan.weight_bytes / 2**30:.2f} GiB of weights, but the client's limit is "
            f"{limit_bytes / 2**30:.2f} GiB with {used_bytes / 2**30:.2f} GiB already taken by its other models; "
            "raise mps_memory_limit_gb for this client or move the model to another client")
