"""Which files a snapshot is made of, how each is opened, and how a file is known to be the one
checked (plan and warm in backends.py use these).

Every file of a snapshot is opened by open_regular(): without blocking, and refused unless it is a
regular file. A FIFO put in a file's place would otherwise block its open() for good, where no
signal reaches it (PEP 475 retries the call), while the loader's heartbeat thread kept it looking
alive to the supervisor.
"""

import os
from pathlib import Path
from typing import BinaryIO

from gpu_orchestrator.loaders import files
from gpu_orchestrator.loaders.formats import ModelError
from gpu_orchestrator.loaders.store import Snapshot, StoreError, is_inside, real_path

# The most bytes a JSON file that plan() reads whole (backends.CHECKED_JSON, the manifest) may hold, refused
# from its size before it is read: json.loads of 1 GiB took 2 GB of the loader's memory, of 64 GiB a
# MemoryError, and hostile JSON costs up to 25 times its size (32 MiB of "[[],[]...]" peaked at 850
# MiB). Not 16 MiB: the largest real files are shard indexes, one entry per tensor, and an index
# written as transformers writes it for a GPTQ DeepSeek-V3 (178,176 tensors) is 15.6 MiB, for an
# FP8 Kimi-K2 (140,544) 13 MiB; this leaves twice that.
MAX_JSON_BYTES = 32 * 2**20


def identity(handle: BinaryIO) -> tuple:
    """What changes when a file is written or replaced: size, inode (device too), mtime and ctime;
    and what else moves the ctime: links, mode, owner. The ctime is the one a writer cannot put
    back: a same-size rewrite that restores the mtime (cp -p, rsync --inplace -t, tar -x) still
    moves it. So does a new hard link (cp -al, rsync --link-dest publishing a version beside this
    one) or a chmod: changes() tells those apart by the fields that moved with it."""
    info = os.fstat(handle.fileno())
    return (info.st_size, info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns,
            info.st_nlink, info.st_mode, info.st_uid, info.st_gid)


def open_regular(path: Path) -> BinaryIO:
    """`path` open for reading (unbuffered), refused unless it is a regular file, without blocking
    (files.open_regular): a FIFO renamed over a snapshot file would otherwise hold the loader for good."""
    try:
        return open(files.open_regular(path), "rb", buffering=0)
    except files.NotAFile as exc:
        raise ModelError(f"{escaped(path)} is not a regular file ({exc.kind}); a snapshot holds only files, "
                         "folders and links to them") from None


def read_whole(handle: BinaryIO, path: Path, size: int) -> bytes:
    """A JSON file's `size` bytes (its size as checked), refused above MAX_JSON_BYTES before any is read."""
    if size > MAX_JSON_BYTES:
        raise ModelError(f"{escaped(path)} is {size} bytes, over the {MAX_JSON_BYTES} bytes a JSON file of a "
                         "snapshot may hold; refused before it was read")
    data = handle.read(size)  # a regular file gives it in one read; a short read is taken up below
    while len(data) < size and (more := handle.read(size - len(data))):
        data += more
    return data


def list_files(snapshot: Snapshot) -> list[Path]:
    """Every regular file of the snapshot, sorted by relative path (the manifest's order),
    each proven to lie inside its confinement.

    A link to a folder is followed when it stays inside the confinement, as the client that opens
    the model follows it, so its files are checked, read and hashed like any other; one that leads
    outside, or to a folder the walk has been through already, is refused: a loop, or a second way
    to the same files (links two to a level, 30 levels deep, would walk 2**30 folders). Only a link
    is resolved: every other name's real path is its folder's real path joined with its name (one
    lstat per name, from the directory entry, instead of one per component of its path)."""
    files: list[Path] = []
    walk(Path(snapshot.path), Path(os.path.realpath(snapshot.path)), snapshot.confined_to, files)
    return sorted(files, key=lambda f: os.fsencode(f.relative_to(snapshot.path).as_posix()))


def walk(top: Path, real_top: Path, confined_to: Path, files: list) -> None:
    """Add the files below `top` (whose real path is `real_top`) to `files`. Folders wait on a stack,
    not in Python's own (a recursion per level failed at 1,000 nested folders); `visited` holds the
    real path of every folder taken so far, so that none is walked twice."""
    visited = {real_top}
    stack = [(top, real_top)]
    while stack:
        directory, real_directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)  # closed before going on: one descriptor at a time
        except FileNotFoundError:
            continue  # gone since its parent listed it: not part of the snapshot
        for entry in entries:
            path = directory / entry.name
            link = entry.is_symlink()
            real = resolve_link(path) if link else real_directory / entry.name
            if link and not is_inside(real, confined_to):
                raise ModelError(f"{escaped(path)} links to {escaped(real)}, outside {confined_to}; refused: "
                                 "copy what it names into the store instead")
            if entry.is_dir(follow_symlinks=link):
                # A link reaches a folder taken before, or one holding it; a plain folder, one a link reached first.
                if real in visited or (link and any(is_inside(folder, real) for folder in visited)):
                    raise ModelError(f"{escaped(path)} links to {escaped(real)}, a folder already walked (or one "
                                     "holding it): a loop, or a second way to the same files; remove the link")
                visited.add(real)
                stack.append((path, real))
            elif entry.is_file(follow_symlinks=link):
                files.append(path)
            elif link and not os.path.exists(path):  # a Hugging Face snapshot's link to a blob deleted since
                raise ModelError(f"{escaped(path)} is a link to nothing ({escaped(real)}): what it named was "
                                 "removed, or the download did not finish; restore it, or remove the link")
            # else a FIFO, socket or device: not part of the model, left out and never opened


def resolve_link(path: Path) -> Path:
    """The real path a symlink leads to; a loop of links (x -> x) refused, on every Python (store.real_path)."""
    try:
        return real_path(path)
    except StoreError:
        raise ModelError(f"{escaped(path)} is a loop of symbolic links (it leads back to itself); remove the link") from None


def escaped(path: Path) -> str:
    """A path for a message: a name that is not UTF-8 shows its bytes escaped, as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def open_checked(path: Path, checked: tuple) -> BinaryIO:
    """`path` open for reading, refused unless it is still the file whose identity() was `checked`."""
    handle = open_regular(path)
    try:
        check_unchanged_before(handle, path, checked)
    except BaseException:
        handle.close()
        raise
    return handle


def changes(checked: tuple, now: tuple, path: Path) -> str:
    """What differs between the identity() checked and the descriptor's `now`, in words; also
    whether the path still names that file (the client will open the path)."""
    current = os.stat(path)
    if now[1:3] != checked[1:3] or (current.st_dev, current.st_ino) != checked[1:3]:
        return "the path now names another file"  # its size and mtime say nothing then
    said = []
    if now[0] != checked[0]:
        said.append(f"size changed from {checked[0]} to {now[0]} bytes")
    if now[3] != checked[3]:
        said.append("its mtime changed")
    elif now[4] != checked[4] and now[5:] == checked[5:]:  # a new link, mode or owner moves it too: not a change
        said.append("its ctime changed with its size, mtime, links, mode and owner as they were: rewritten with "
                    "its mtime put back (cp -p, rsync --inplace -t), or its attributes set again (restorecon)")
    return ", ".join(said)


def check_unchanged_before(handle: BinaryIO, path: Path, checked: tuple) -> None:
    if before := changes(checked, identity(handle), path):
        raise ModelError(f"{path.name}: changed since it was checked ({before}); the store must be immutable")


def check_unchanged_after(handle: BinaryIO, path: Path, checked: tuple, done: int) -> None:
    during = changes(checked, identity(handle), path)
    if not during and done != checked[0]:
        during = f"read {done} of its {checked[0]} bytes"
    if during:
        raise ModelError(f"{path.name}: changed while it was being read ({during}); the store must be immutable")
