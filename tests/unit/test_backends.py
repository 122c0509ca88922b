"""The default backend: snapshot completeness, safetensors headers, manifests, memory limits."""

import json
import struct
import zipfile

import pytest

from gpu_orchestrator.loaders.backends import (
    ModelError, check_fits, check_safetensors, plan, snapshot_checksum, warm,
)
from gpu_orchestrator.loaders.store import Snapshot
from support import add_model


def snapshot_of(path):
    return Snapshot(path.resolve(), path.resolve().parent, "shared")


def write_raw_safetensors(path, header: dict, data_len: int):
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_len))


def test_demo_style_snapshot_passes_and_counts_parameters(tmp_path):
    path = add_model(tmp_path, "org/m")
    model_plan = plan(snapshot_of(path))
    assert model_plan.format == "safetensors"
    assert model_plan.parameters == check_safetensors(path / "model.safetensors") > 0
    assert model_plan.weight_bytes == (path / "model.safetensors").stat().st_size
    assert model_plan.total_bytes == sum(f.stat().st_size for f in path.iterdir())


@pytest.mark.parametrize("header,data_len,message", [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, 8, "outside the file"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, 16, "needs 16"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, 2, "unknown dtype"),
    ({"w": {"dtype": "F16", "shape": [2]}}, 4, "lacks dtype, shape or data_offsets"),
    ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
      "b": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, 8, "overlap"),
])
def test_inconsistent_safetensors_headers_are_refused(tmp_path, header, data_len, message):
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, header, data_len)
    with pytest.raises(ModelError, match=message):
        check_safetensors(path)


def test_truncated_and_garbage_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ModelError, match="truncated"):
        check_safetensors(path)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelError, match="does not fit"):
        check_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(ModelError, match="not valid JSON"):
        check_safetensors(path)


def test_truncated_model_file_fails_the_plan(tmp_path):
    path = add_model(tmp_path, "org/m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        plan(snapshot_of(path))


def test_incomplete_snapshots(tmp_path):
    path = add_model(tmp_path, "org/m")
    (path / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json is missing"):
        plan(snapshot_of(path))
    path = add_model(tmp_path, "org/n")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weight file"):
        plan(snapshot_of(path))


def test_shard_index_names_missing_shards(tmp_path):
    path = add_model(tmp_path, "org/m")
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors"):
        plan(snapshot_of(path))


def test_torch_zip_checkpoint_is_checked_never_unpickled(tmp_path):
    path = add_model(tmp_path, "org/m")
    (path / "model.safetensors").unlink()
    with zipfile.ZipFile(path / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x04not-a-real-pickle")
    assert plan(snapshot_of(path)).format == "bin"
    (path / "pytorch_model.bin").write_bytes(b"legacy pickle bytes")
    with pytest.raises(ModelError, match="not a valid PyTorch zip checkpoint"):
        plan(snapshot_of(path))


def test_warm_reads_every_byte_and_verifies_the_manifest(tmp_path):
    path = add_model(tmp_path, "org/m", manifest=True)
    model_plan = plan(snapshot_of(path))
    seen = []
    assert warm(snapshot_of(path), model_plan, seen.append) is True
    assert seen[-1] == model_plan.total_bytes


def test_manifest_mismatch_fails_with_a_clear_error(tmp_path):
    path = add_model(tmp_path, "org/m", manifest=True)
    with open(path / "vocab.txt", "r+b") as handle:
        handle.write(b"X")
    with pytest.raises(ModelError, match="manifest checksum mismatch: expected sha256:"):
        warm(snapshot_of(path), plan(snapshot_of(path)), lambda n: None)


def test_manifest_checksum_covers_paths_not_only_bytes(tmp_path):
    a = add_model(tmp_path, "org/a")
    before = snapshot_checksum(a)
    (a / "vocab.txt").rename(a / "vocab2.txt")
    assert snapshot_checksum(a) != before


def test_file_changed_between_plan_and_read_is_caught(tmp_path):
    path = add_model(tmp_path, "org/m")
    model_plan = plan(snapshot_of(path))
    with open(path / "vocab.txt", "ab") as handle:
        handle.write(b"more")
    with pytest.raises(ModelError, match="size changed"):
        warm(snapshot_of(path), model_plan, lambda n: None)


def test_symlinked_file_escaping_the_store_is_refused(tmp_path):
    path = add_model(tmp_path / "store", "org/m")
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    (path / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ModelError, match="outside"):
        plan(Snapshot(path.resolve(), (tmp_path / "store").resolve(), "shared"))


def test_memory_limit_is_checked_before_reading(tmp_path):
    path = add_model(tmp_path, "org/m")
    model_plan = plan(snapshot_of(path))
    check_fits(model_plan, 0, model_plan.weight_bytes)
    with pytest.raises(ModelError, match="client's limit is"):
        check_fits(model_plan, 1, model_plan.weight_bytes)
    check_fits(model_plan, 10**12, None)


def test_holes_and_trailing_bytes_in_the_data_buffer_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
                                 "b": {"dtype": "F16", "shape": [2], "data_offsets": [8, 12]}}, 12)
    with pytest.raises(ModelError, match="4 bytes at offset 4 belong to no tensor"):
        check_safetensors(path)
    write_raw_safetensors(path, {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, 10)
    with pytest.raises(ModelError, match="6 bytes after the last tensor"):
        check_safetensors(path)


def test_config_tokenizer_and_sentence_transformers_modules(tmp_path):
    path = add_model(tmp_path, "org/m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        plan(snapshot_of(path))
    (path / "config.json").write_text("{}")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_file": "tokenizer.json", "vocab_file": "vocab.txt"}))
    with pytest.raises(ModelError, match="names files that are missing: tokenizer.json"):
        plan(snapshot_of(path))
    (path / "tokenizer.json").write_text("{}")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelError, match="module 1 .*Pooling.* needs folder 1_Pooling"):
        plan(snapshot_of(path))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text("{}")
    assert plan(snapshot_of(path)).format == "safetensors"  # Normalize loads nothing: no folder needed


def test_onnx_must_look_like_a_model_proto(tmp_path):
    path = add_model(tmp_path, "org/m")
    (path / "model.safetensors").unlink()
    (path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    assert plan(snapshot_of(path)).format == "onnx"
    (path / "model.onnx").write_bytes(b"<html>not a model</html>")
    with pytest.raises(ModelError, match="does not start the way ONNX files do"):
        plan(snapshot_of(path))


def test_torch_backend_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    import sys
    from gpu_orchestrator.loaders.torch_backend import load_torch
    monkeypatch.setitem(sys.modules, "torch", None)
    path = add_model(tmp_path, "org/m")
    with pytest.raises(ModelError, match=r"torch is not installed: pip install 'gpu-orchestrator\[torch\]'"):
        load_torch(snapshot_of(path), plan(snapshot_of(path)), 0, None, warmup=False)
