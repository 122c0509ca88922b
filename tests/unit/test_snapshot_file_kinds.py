"""What a snapshot may hold besides files and folders: FIFOs and sockets (in a checked file's place,
or as its manifest.json), links to nothing, loops of links, folders nested deeper than Python's
recursion limit, a manifest.json that is not a file. Each fails the model with a ModelError that
names it (never blocks the loader, never an unexpected exception), or, for deep folders, loads. A
FIFO or socket found in the snapshot beside its files is left out (test_backends.py)."""

import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import add_model

from gpu_orchestrator.loaders.backends import MANIFEST, ModelError, plan, snapshot_checksum, warm
from gpu_orchestrator.loaders.store import Snapshot


def snapshot_of(path: Path) -> Snapshot:
    return Snapshot(path.resolve(), path.resolve().parent, "shared")


@contextmanager
def fifo_with_a_writer(path: Path):
    """A FIFO at `path` that a writer holds open, so that even a blocking open() of it returns (the
    test can never hang, before the fix or after); nothing is ever written to it."""
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a writer's open needs a reader, or fails
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        yield path
    finally:
        os.close(writer)
        os.close(reader)


def test_a_fifo_with_no_writer_is_refused_at_once_not_waited_for(tmp_path):
    from gpu_orchestrator.loaders.snapshot_files import open_regular  # how every file of a snapshot is opened

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # no writer: a blocking open() would wait for one for good
    with pytest.raises(ModelError, match=r"model.safetensors is not a regular file"):
        open_regular(fifo)
    with pytest.raises(ModelError, match=r"is not a regular file"):
        open_regular(tmp_path)
    with socket.socket(socket.AF_UNIX) as sock:  # a socket cannot even be opened: ENXIO
        sock.bind(str(tmp_path / "socket.json"))
        with pytest.raises(ModelError, match=r"socket.json is not a regular file"):
            open_regular(tmp_path / "socket.json")
    (tmp_path / "file").write_bytes(b"ok")
    with open_regular(tmp_path / "file") as handle:  # a regular file: read as ever, blocking again
        assert handle.read() == b"ok" and os.get_blocking(handle.fileno())


def test_a_fifo_renamed_over_a_checked_file_fails_the_read_by_name(tmp_path):
    """The attack: a FIFO renamed over a snapshot file after its check. A plain open() of it blocked
    the loader for good (SIGTERM could not interrupt it); now the read refuses it."""
    path = add_model(tmp_path, "org/m")
    (path / "zz_notes.txt").write_text("read last")
    model_plan = plan(snapshot_of(path))
    with fifo_with_a_writer(tmp_path / "fifo"):
        os.rename(tmp_path / "fifo", path / "zz_notes.txt")
        with pytest.raises(ModelError, match=r"zz_notes.txt is not a regular file"):
            warm(snapshot_of(path), model_plan, lambda n: None)


def test_a_fifo_renamed_over_a_file_after_the_listing_fails_the_plan(tmp_path, monkeypatch):
    """The listing saw a file; by the plan's open it is a FIFO (a writer holds it: the old blocking
    open returned, and the plan took the FIFO for an empty file)."""
    from gpu_orchestrator.loaders import backends

    path = add_model(tmp_path, "org/m")
    listed = backends.list_files
    with fifo_with_a_writer(tmp_path / "fifo"):
        def list_then_swap(snapshot):
            files = listed(snapshot)
            os.rename(tmp_path / "fifo", path / "vocab.txt")  # not a JSON file: the old plan read none of it
            return files
        monkeypatch.setattr(backends, "list_files", list_then_swap)
        with pytest.raises(ModelError, match=r"vocab.txt is not a regular file"):
            plan(snapshot_of(path))


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling link", "socket"])
def test_a_manifest_that_is_not_a_regular_file_fails_the_model(tmp_path, kind):
    """It was ignored: the model passed, unverified, with nothing said."""
    path = add_model(tmp_path, "org/m")
    manifest = path / MANIFEST
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "folder":
        manifest.mkdir()
    elif kind == "dangling link":
        manifest.symlink_to("gone.json")
    with socket.socket(socket.AF_UNIX) as sock:
        if kind == "socket":
            sock.bind(str(manifest))
        # A dangling link is refused by the walk; a FIFO or socket left out by it, and with a folder
        # refused by the manifest's own check.
        with pytest.raises(ModelError, match=r"manifest.json(: manifest.json)? is (not a regular file|a link to nothing)"):
            plan(snapshot_of(path))


def test_a_link_to_nothing_in_the_snapshot_fails_the_model(tmp_path):
    """It was skipped without a word: a Hugging Face snapshot whose tokenizer.json links to a blob
    removed since was ready, and its service failed to start on it. (A FIFO or socket there from
    the start is not part of the model: left out and never opened, test_backends.py.)"""
    path = add_model(tmp_path, "org/m")
    (path / "tokenizer.json").symlink_to("../blobs/0a1b2c")
    with pytest.raises(ModelError, match="tokenizer.json is a link to nothing .*blobs/0a1b2c"):
        plan(snapshot_of(path))


def test_a_manifest_nested_too_deep_is_unreadable_not_a_crash(tmp_path):
    path = add_model(tmp_path, "org/m")
    (path / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match=r"manifest.json: unreadable manifest \(maximum recursion depth"):
        plan(snapshot_of(path))


@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_loop_of_links_in_the_snapshot_is_refused_by_name(tmp_path, where):
    path = add_model(tmp_path, "org/m")
    at = path / "x" if where == "file" else path / "sub" / "x"
    at.parent.mkdir(exist_ok=True)
    at.symlink_to("x")
    with pytest.raises(ModelError, match=r"/x is a loop of symbolic links \(it leads back to itself\)"):
        plan(snapshot_of(path))
    at.unlink()
    (path / "a").symlink_to("b")
    (path / "b").symlink_to("a")
    with pytest.raises(ModelError, match=r"is a loop of symbolic links"):
        snapshot_checksum(path)


def test_folders_nested_deeper_than_pythons_recursion_limit_are_walked(tmp_path):
    """The walk was one recursion per folder: 1,100 nested folders gave an unexpected RecursionError."""
    path = add_model(tmp_path, "org/m")
    depth = sys.getrecursionlimit() + 100
    deepest = path
    try:
        for _ in range(depth):  # not mkdir(parents=True): it recurses per level
            deepest = deepest / "a"
            deepest.mkdir()
        (deepest / "f").write_text("x")
        model_plan = plan(snapshot_of(path))
        assert deepest / "f" in model_plan.files
        warm(snapshot_of(path), model_plan, lambda n: None)
    finally:  # shutil.rmtree (pytest's clean-up) recurses per level too
        (deepest / "f").unlink(missing_ok=True)
        while deepest != path:
            deepest.rmdir()
            deepest = deepest.parent
