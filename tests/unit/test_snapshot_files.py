"""Which files a snapshot is made of: links to folders, thousands of files, names that are not
UTF-8. Every file the client could open is checked, read and hashed, or the model is refused."""

import hashlib
import json
import os
import resource
from pathlib import Path

import pytest
from support import add_model, safetensors_bytes

from gpu_orchestrator.loaders.backends import MANIFEST, ModelError, plan, snapshot_checksum, warm
from gpu_orchestrator.loaders.store import Snapshot


def sentence_transformers_model(store: Path) -> Path:
    """A model whose modules.json names the folder 2_Dense, which the test then provides."""
    path = add_model(store, "org/st1")
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    return path


def dense_folder(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{broken")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def write_manifest(path: Path, checksum: str) -> None:
    (path / MANIFEST).write_text(json.dumps({"version": "1", "checksum": checksum, "metadata": {}}))


def load(path: Path, store: Path) -> bool:
    snapshot = Snapshot(path.resolve(), store.resolve(), "shared")
    return warm(snapshot, plan(snapshot), lambda done: None)


def test_a_folder_link_leading_outside_the_store_is_refused(tmp_path):
    store = tmp_path / "store"
    path = sentence_transformers_model(store)
    write_manifest(path, snapshot_checksum(path))  # a manifest that leaves the link out
    elsewhere = dense_folder(tmp_path / "elsewhere", b"bogus")
    (path / "2_Dense").symlink_to(elsewhere)
    with pytest.raises(ModelError, match=r"2_Dense links to .*/elsewhere, outside .*/store; refused"):
        load(path, store)


def test_a_folder_link_inside_the_store_is_followed_checked_and_hashed(tmp_path):
    store = tmp_path / "store"
    path = sentence_transformers_model(store)
    dense = dense_folder(store / "shared" / "dense", b"bogus")
    (path / "2_Dense").symlink_to(dense)
    with pytest.raises(ModelError, match="2_Dense/config.json|model.safetensors: truncated"):
        load(path, store)
    (dense / "config.json").write_text("{}")
    (dense / "model.safetensors").write_bytes(safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    write_manifest(path, snapshot_checksum(path, store))
    snapshot = Snapshot(path.resolve(), store.resolve(), "shared")
    model_plan = plan(snapshot)
    assert path / "2_Dense" / "model.safetensors" in model_plan.files
    assert warm(snapshot, model_plan, lambda done: None) is True
    (dense / "model.safetensors").write_bytes(safetensors_bytes(
        {"w": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)))
    with pytest.raises(ModelError, match="manifest checksum mismatch"):
        load(path, store)  # the linked files are part of the checksum


@pytest.mark.parametrize("target", [".", "..", "../.."])  # the snapshot, org/, the store root
def test_a_folder_link_back_into_a_folder_it_is_in_is_refused_as_a_loop(tmp_path, target):
    store = tmp_path / "store"
    path = sentence_transformers_model(store)
    (path / "2_Dense").symlink_to(target)
    with pytest.raises(ModelError, match="2_Dense links to .*, a folder already walked .*: a loop"):
        load(path, store)


def test_folder_links_that_lead_into_each_other_are_a_loop(tmp_path):
    store = tmp_path / "store"
    path = sentence_transformers_model(store)
    (path / "a").mkdir()
    (path / "b").mkdir()
    (path / "a" / "to_b").symlink_to("../b")
    (path / "b" / "to_a").symlink_to("../a")
    with pytest.raises(ModelError, match="a loop"):
        load(path, store)


def test_links_that_reach_one_folder_twice_are_refused_not_walked_twice(tmp_path):
    """Found by a reviewer: d_i/{a,b} -> ../d_{i+1} has no loop, yet 30 levels of it would walk
    2**30 folders (13 levels took 8 s), with the loader's CPU counting as life all along."""
    store = tmp_path / "store"
    path = sentence_transformers_model(store)
    for level in range(20):
        (path / f"d{level}").mkdir()
        for name in "ab":
            (path / f"d{level}" / name).symlink_to(f"../d{level + 1}")
    (path / "d20").mkdir()
    (path / "d20" / "leaf.json").write_text("{}")
    with pytest.raises(ModelError, match="a folder already walked .*a second way to the same files"):
        load(path, store)


def test_a_snapshot_of_more_files_than_the_open_file_limit_loads(tmp_path):
    store = tmp_path / "store"
    path = add_model(store, "org/many")
    for index in range(300):
        (path / f"extra{index:03}.json").write_text("{}")
    write_manifest(path, snapshot_checksum(path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = len(os.listdir("/proc/self/fd")) + 64  # what this process holds now, and a little more
    resource.setrlimit(resource.RLIMIT_NOFILE, (room, hard))
    try:
        assert load(path, store) is True
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_name_that_is_not_utf8_is_hashed_as_its_bytes(tmp_path):
    """The manifest hashes each path as the file system holds it: its bytes, in byte order."""
    store = tmp_path / "store"
    path = add_model(store, "org/odd")
    odd = os.fsencode(path) + b"/notes-\xff.txt"
    with open(odd, "wb") as handle:
        handle.write(b"latin-1 notes")
    (path / "notes-\u00e9.txt").write_text("utf-8 notes")
    expected = hashlib.sha256()
    for name in sorted(os.listdir(os.fsencode(path))):
        with open(os.fsencode(path) + b"/" + name, "rb") as handle:
            expected.update(name + b"\0" + handle.read())
    checksum = snapshot_checksum(path)
    assert checksum == "sha256:" + expected.hexdigest()
    write_manifest(path, checksum)
    assert load(path, store) is True
