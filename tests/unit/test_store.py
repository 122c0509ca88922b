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
