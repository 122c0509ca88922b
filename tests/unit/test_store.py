"""Model store resolution: order, strict mode, HF cache, and nothing outside the root."""

import os

import pytest

from gpu_orchestrator.loaders.store import ModelStore, StoreError, check_model_id


def mkdir(path):
    path.mkdir(parents=True)
    return path


@pytest.fixture
def root(tmp_path):
    return mkdir(tmp_path / "store")


def test_resolution_order(root):
    store = ModelStore(root, base_model_dir="base")
    shared = mkdir(root / "org" / "m")
    assert store.resolve("agent", "org/m").path == shared.resolve()
    assert store.resolve("agent", "org/m").source == "shared"
    base = mkdir(root / "base" / "agent" / "org" / "m")
    assert store.resolve("agent", "org/m").path == base.resolve()
    mkdir(root / "agent" / "versions" / "v2" / "org" / "m")
    os.symlink("versions/v2", root / "agent" / "current")
    snapshot = store.resolve("agent", "org/m")
    assert snapshot.source == "agent-current"
    assert snapshot.path == (root / "agent" / "versions" / "v2" / "org" / "m").resolve()


def test_base_model_dir_only_when_set(root):
    mkdir(root / "base" / "agent" / "org" / "m")
    with pytest.raises(StoreError) as caught:
        ModelStore(root).resolve("agent", "org/m")
    assert "store/base/" not in str(caught.value)


def test_missing_model_lists_every_path_tried(root, tmp_path):
    store = ModelStore(root, base_model_dir="base", hf_hub=tmp_path / "hub")
    with pytest.raises(StoreError) as caught:
        store.resolve("agent", "org/m")
    message = str(caught.value)
    for path in (root / "agent/current/org/m", root / "base/agent/org/m", root / "org/m",
                 tmp_path / "hub/models--org--m/snapshots"):
        assert str(path) in message


def make_hf_snapshot(hub, model_id, revision):
    repo = hub / ("models--" + model_id.replace("/", "--"))
    blob = mkdir(repo / "blobs") / "abc123"
    blob.write_text("{}")
    snapshot = mkdir(repo / "snapshots" / revision)
    os.symlink("../../blobs/abc123", snapshot / "config.json")
    mkdir(repo / "refs")
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hf_cache_used_only_when_not_strict(root, tmp_path):
    hub = tmp_path / "hub"
    snapshot = make_hf_snapshot(hub, "org/m", "rev1")
    found = ModelStore(root, hf_hub=hub).resolve("agent", "org/m")
    assert (found.path, found.source) == (snapshot.resolve(), "hf-cache")
    with pytest.raises(StoreError, match="STRICT_MODEL_STORE=1"):
        ModelStore(root, strict=True, hf_hub=hub).resolve("agent", "org/m")


def test_store_beats_hf_cache(root, tmp_path):
    make_hf_snapshot(tmp_path / "hub", "org/m", "rev1")
    local = mkdir(root / "org" / "m")
    assert ModelStore(root, hf_hub=tmp_path / "hub").resolve("agent", "org/m").path == local.resolve()


@pytest.mark.parametrize("model_id", ["/etc", "../x", "a/../../b", "a//b", "a/./b", "", "a\\..\\b", "a/"])
def test_unsafe_ids_refused(root, model_id):
    with pytest.raises(StoreError):
        check_model_id(model_id)
    with pytest.raises(StoreError):
        ModelStore(root).resolve("agent", model_id)


def test_symlink_escaping_the_root_is_refused(root, tmp_path):
    outside = mkdir(tmp_path / "outside" / "m")
    mkdir(root / "org")
    os.symlink(outside, root / "org" / "m")
    with pytest.raises(StoreError, match="outside MODEL_STORE_ROOT"):
        ModelStore(root).resolve("agent", "org/m")


def test_agent_current_symlink_escaping_is_refused(root, tmp_path):
    mkdir(tmp_path / "elsewhere" / "org" / "m")
    mkdir(root / "agent")
    os.symlink(tmp_path / "elsewhere", root / "agent" / "current")
    with pytest.raises(StoreError, match="outside MODEL_STORE_ROOT"):
        ModelStore(root).resolve("agent", "org/m")


# The Hugging Face cache: refs/main names one snapshot folder, and that folder is the repo's own.


def hf_store(root, tmp_path):
    return ModelStore(root, hf_hub=tmp_path / "hub")


@pytest.fixture
def outside(tmp_path):
    folder = mkdir(tmp_path / "outside" / "m")
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize("revision", ["../../../outside/m", "ABSOLUTE", "..", ".", "rev1/../../../../outside/m",
                                      "", "   \n", "a\x01b", "x" * 256])
def test_hf_ref_must_name_one_snapshot_folder(root, tmp_path, outside, revision):
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", "rev1")
    ref = snapshot.parent.parent / "refs" / "main"
    ref.write_text(str(outside) if revision == "ABSOLUTE" else revision)
    with pytest.raises(StoreError, match="refs/main") as caught:
        hf_store(root, tmp_path).resolve("agent", "org/m")
    assert "run the download again" in str(caught.value)


@pytest.mark.parametrize("revision", ["0123456789abcdef0123456789abcdef01234567", "v1.0", "rev1\n"])
def test_hf_ref_names_any_single_folder(root, tmp_path, revision):
    """HF writes the commit's 40 hex digits, but a revision is whatever the server named it."""
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", revision.strip())
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    assert hf_store(root, tmp_path).resolve("agent", "org/m").path == snapshot.resolve()


@pytest.mark.parametrize("with_ref", [True, False])
def test_hf_snapshot_linking_outside_the_repo_is_refused(root, tmp_path, outside, with_ref):
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", "rev1")
    repo = snapshot.parent.parent
    os.symlink(outside, repo / "snapshots" / "rev2")
    if with_ref:
        (repo / "refs" / "main").write_text("rev2")
    else:  # the newest snapshot, there being no refs/main
        (repo / "refs" / "main").unlink()
        os.utime(repo / "snapshots" / "rev2", (2**31, 2**31))
    with pytest.raises(StoreError, match="not a folder inside .*/snapshots; refused"):
        hf_store(root, tmp_path).resolve("agent", "org/m")


@pytest.mark.parametrize("target", ["../blobs", ".", "../../../outside/m"])
def test_hf_snapshot_must_be_below_the_snapshots_folder(root, tmp_path, outside, target):
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", "rev1")
    repo = snapshot.parent.parent
    os.symlink(target, repo / "snapshots" / "rev2")
    (repo / "refs" / "main").write_text("rev2")
    with pytest.raises(StoreError, match="not a folder inside .*/snapshots; refused"):
        hf_store(root, tmp_path).resolve("agent", "org/m")


def test_hf_snapshot_linking_to_another_snapshot_is_followed(root, tmp_path):
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", "rev1")
    repo = snapshot.parent.parent
    os.symlink("rev1", repo / "snapshots" / "rev2")
    (repo / "refs" / "main").write_text("rev2")
    found = hf_store(root, tmp_path).resolve("agent", "org/m")
    assert (found.path, found.confined_to) == (snapshot.resolve(), repo.resolve())


def test_hf_ref_naming_a_missing_snapshot_fails(root, tmp_path):
    """Not the newest other revision: that is not what refs/main asks for."""
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", "oldrev")
    (snapshot.parent.parent / "refs" / "main").write_text("newrev")
    with pytest.raises(StoreError, match="names revision 'newrev'.*missing.*run the download again"):
        hf_store(root, tmp_path).resolve("agent", "org/m")


def test_hf_without_ref_takes_the_newest_snapshot(root, tmp_path):
    old = make_hf_snapshot(tmp_path / "hub", "org/m", "old")
    new = mkdir(old.parent / "new")
    os.utime(old, (1, 1))
    (old.parent.parent / "refs" / "main").unlink()
    assert hf_store(root, tmp_path).resolve("agent", "org/m").path == new.resolve()


@pytest.mark.parametrize("kind", ["not-utf8", "fifo", "folder", "dangling", "loop", "huge"])
def test_hf_unreadable_ref_is_a_store_error(root, tmp_path, kind):
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", "rev1")
    ref = snapshot.parent.parent / "refs" / "main"
    ref.unlink()
    if kind == "not-utf8":
        ref.write_bytes(b"\xff\xfe")
    elif kind == "fifo":  # opened without blocking: nobody will ever write to it
        os.mkfifo(ref)
    elif kind == "folder":
        ref.mkdir()
    elif kind == "dangling":
        os.symlink("gone", ref)
    elif kind == "loop":
        os.symlink("main", ref)
    else:
        ref.write_text("rev1" + " " * 10000)
    with pytest.raises(StoreError, match=str(ref)):
        hf_store(root, tmp_path).resolve("agent", "org/m")


def test_symlink_loop_at_the_model_folder_is_a_store_error(root):
    mkdir(root / "org")
    os.symlink("m", root / "org" / "m")
    with pytest.raises(StoreError, match=f"symlink loop at {root / 'org' / 'm'}"):
        ModelStore(root).resolve("agent", "org/m")


def test_symlink_loop_at_an_hf_snapshot_is_a_store_error(root, tmp_path):
    snapshot = make_hf_snapshot(tmp_path / "hub", "org/m", "rev1")
    repo = snapshot.parent.parent
    os.symlink("rev2", repo / "snapshots" / "rev2")
    (repo / "refs" / "main").write_text("rev2")
    with pytest.raises(StoreError, match="symlink loop at .*rev2"):
        hf_store(root, tmp_path).resolve("agent", "org/m")
