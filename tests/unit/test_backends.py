"""The default backend: snapshot completeness, safetensors headers, manifests, memory limits."""

import io
import itertools
import json
import math
import os
import re
import struct
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import add_model, safetensors_bytes

from gpu_orchestrator.loaders.backends import (CHUNK, PROGRESS_BYTES, ModelError, check_fits, plan, snapshot_checksum,
                                               warm)
from gpu_orchestrator.loaders.formats import SAFETENSORS_DTYPE_BITS, check_safetensors
from gpu_orchestrator.loaders.store import Snapshot, is_inside


def snapshot_of(path):
    return Snapshot(path.resolve(), path.resolve().parent, "shared")


def write_raw_safetensors(path, header: dict, data_len: int):
    path.write_bytes(safetensors_bytes(header, bytes(data_len)))


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
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ModelError, match="header length 1000 does not fit the 10-byte file"):
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


def test_manifest_checksum_is_the_same_through_a_symlink_or_a_relative_path(tmp_path, monkeypatch):
    """`make demo` writes its store under TMPDIR, which may be a symlink, or under a relative --dir."""
    a = add_model(tmp_path / "real", "org/a")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real")
    assert snapshot_checksum(tmp_path / "link" / "org" / "a") == snapshot_checksum(a)
    assert snapshot_checksum(Path("org/a")) == snapshot_checksum(a)


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


def test_progress_comes_at_each_files_end_and_at_most_every_progress_bytes_between(tmp_path):
    """Reads are CHUNK long, progress (the loader's look at signals and stdin) comes every
    PROGRESS_BYTES of a file and at its end: every byte counted, none twice."""
    path = add_model(tmp_path, "org/m", shape=(256, 1, 40000))  # a ~20 MB weight file, many reads
    model_plan = plan(snapshot_of(path))
    seen = []
    warm(snapshot_of(path), model_plan, seen.append)
    ends = list(itertools.accumulate(model_plan.sizes[f] for f in model_plan.files))
    assert set(ends) <= set(seen) and seen == sorted(seen) and seen[-1] == model_plan.total_bytes
    steps = [b - a for a, b in zip([0, *seen], seen)]
    assert max(steps) < PROGRESS_BYTES + CHUNK and len(seen) < len(ends) + model_plan.total_bytes // PROGRESS_BYTES + 1
    assert len(seen) > len(ends)  # the large file was reported on its way, not only at its end


def test_files_are_listed_through_their_snapshot_even_when_it_is_reached_through_a_link(tmp_path):
    """list_files resolves only symbolic links; every other name is judged by the snapshot's real
    path, so a snapshot named through a linked folder lists and confines as its real folder does."""
    store = tmp_path / "store"
    path = add_model(store, "org/m")
    (path / "sub").mkdir()
    (path / "sub" / "extra.json").write_text("{}")
    (path / "linked.json").symlink_to(path / "sub" / "extra.json")  # a link that stays inside: listed
    os.mkfifo(path / "pipe")  # not a regular file: left out, never opened
    (tmp_path / "alias").symlink_to(store)
    via_link = Snapshot(tmp_path / "alias" / "org" / "m", store.resolve(), "shared")
    model_plan = plan(via_link)
    names = [f.relative_to(via_link.path).as_posix() for f in model_plan.files]
    assert names == sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                           if p.is_file() and p.name != "pipe") and "linked.json" in names
    outside = Snapshot(tmp_path / "alias" / "org" / "m", (tmp_path / "elsewhere").resolve(), "shared")
    with pytest.raises(ModelError, match="outside"):
        plan(outside)


@pytest.mark.parametrize("path,root,inside", [
    ("/a/b", "/a", True), ("/a", "/a", True), ("/ab", "/a", False), ("/a/bc", "/a/b", False),
    ("/a", "/a/b", False), ("/a", "/", True), ("/", "/", True)])
def test_is_inside_is_by_whole_components(path, root, inside):
    assert is_inside(Path(path), Path(root)) is inside


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
    with pytest.raises(ModelError, match="needs folder 1_Pooling, which is missing"):  # empty: nothing to load
        plan(snapshot_of(path))
    (path / "1_Pooling" / "config.json").write_text("{}")
    assert plan(snapshot_of(path)).format == "safetensors"  # Normalize loads nothing: no folder needed
    for outside in ("/etc", "../../other/1_Pooling", "1_Pooling/../.."):  # is_dir() said yes to /etc
        modules[1]["path"] = outside
        (path / "modules.json").write_text(json.dumps(modules))
        with pytest.raises(ModelError, match=f"names folder {re.escape(outside)}, outside the snapshot"):
            plan(snapshot_of(path))


def test_onnx_must_look_like_a_model_proto(tmp_path):
    path = add_model(tmp_path, "org/m")
    (path / "model.safetensors").unlink()
    (path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch:\x00")  # ir_version 7, producer, an (empty) graph
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


def test_every_dtype_of_the_format_is_accepted_sub_byte_ones_counted_in_bits(tmp_path):
    path = tmp_path / "model.safetensors"
    for dtype, bits in SAFETENSORS_DTYPE_BITS.items():
        # 8 elements of a b-bit type fill exactly b bytes.
        write_raw_safetensors(path, {"w": {"dtype": dtype, "shape": [2, 4], "data_offsets": [0, bits]}}, bits)
        assert check_safetensors(path) == 8, dtype
    for dtype, elements, needed in [("F4", 6, 3), ("F6_E2M3", 4, 3), ("F6_E3M2", 12, 9), ("C64", 3, 24)]:
        write_raw_safetensors(path, {"w": {"dtype": dtype, "shape": [elements], "data_offsets": [0, needed]}}, needed)
        assert check_safetensors(path) == elements, dtype
    write_raw_safetensors(path, {"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2)
    with pytest.raises(ModelError, match=r"F4\[3\] is 12 bits, which does not end on a byte boundary"):
        check_safetensors(path)


class CountingFile(io.FileIO):
    """A real file that counts the bytes read from it."""
    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_a_header_over_the_formats_limit_is_refused_before_it_is_read(tmp_path):
    from gpu_orchestrator.loaders.formats import MAX_SAFETENSORS_HEADER, safetensors_parameters
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as handle:  # sparse: the file is large, its blocks are not
        handle.write(struct.pack("<Q", MAX_SAFETENSORS_HEADER + 1))
        handle.truncate(MAX_SAFETENSORS_HEADER + 100)
    with CountingFile(path) as handle:
        with pytest.raises(ModelError, match="header length 100000001 is over the format's limit of 100000000 bytes"):
            safetensors_parameters(handle, path.name)
        assert handle.read_bytes == 8


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def test_a_file_is_read_only_if_it_is_still_the_file_checked_and_nothing_stays_open(tmp_path):
    path = add_model(tmp_path, "org/m")
    before = open_fds()
    model_plan = plan(snapshot_of(path))
    assert open_fds() == before  # a plan holds no descriptor: warm() reopens each file and compares
    # The path now names another file; the checked one is still read, but the model fails.
    weights = path / "model.safetensors"
    replacement = path / "replacement"
    replacement.write_bytes(weights.read_bytes())
    replacement.rename(weights)
    with pytest.raises(ModelError, match=r"model.safetensors: changed since it was checked \(the path now names another file\)"):
        warm(snapshot_of(path), model_plan, lambda n: None)
    assert open_fds() == before
    plan(snapshot_of(path))
    (path / "config.json").write_text("{no")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        plan(snapshot_of(path))
    assert open_fds() == before  # a plan given up, or one that fails, closes what it opened


def test_a_file_rewritten_in_place_after_its_check_fails_the_model(tmp_path):
    path = add_model(tmp_path, "org/m")
    model_plan = plan(snapshot_of(path))
    weights = path / "model.safetensors"
    with open(weights, "r+b") as handle:  # same size, same inode: a header that passed is gone
        handle.write(b"\xff" * 8)
    checked = os.stat(weights)
    os.utime(weights, ns=(checked.st_atime_ns, checked.st_mtime_ns + 10**9))  # whatever the clock's grain
    with pytest.raises(ModelError, match=r"model.safetensors: changed since it was checked \(its mtime changed\)"):
        warm(snapshot_of(path), model_plan, lambda n: None)


def test_a_file_that_changes_while_it_is_read_fails_the_model(tmp_path):
    path = add_model(tmp_path, "org/m")
    model_plan = plan(snapshot_of(path))

    def grow(done):
        with open(model_plan.files[0], "ab") as handle:
            handle.write(b"x")
    with pytest.raises(ModelError, match="changed while it was being read .size changed from"):
        warm(snapshot_of(path), model_plan, grow)


def raw_safetensors(header, data_len: int) -> bytes:
    return safetensors_bytes(header, bytes(data_len))


def tensor(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BROKEN_AND_ODD = [
    raw_safetensors({"w": tensor(shape=[2, 2], offsets=[0, 16])}, 8),       # past the end
    raw_safetensors({"w": tensor(shape=[2, 2], offsets=[0, 12])}, 16),      # wrong size
    raw_safetensors({"w": tensor("Q4", [2], [0, 2])}, 2),                    # unknown dtype
    raw_safetensors({"w": tensor(["F32"], [1])}, 4),                         # dtype not a string
    raw_safetensors({"w": {"dtype": "F16", "shape": [2]}}, 4),               # no offsets
    raw_safetensors({"a": tensor("F16", [2], [0, 4]), "b": tensor("F16", [2], [2, 6])}, 8),  # overlap
    raw_safetensors({"a": tensor("F16", [2], [0, 4]), "b": tensor("F16", [2], [8, 12])}, 12),  # hole
    raw_safetensors({"a": tensor("F16", [2], [0, 4])}, 10),                  # trailing bytes
    raw_safetensors({"b": tensor("F16", [2], [4, 8]), "a": tensor("F16", [2], [0, 4])}, 8),  # listed out of order
    raw_safetensors({"z": tensor("F32", [0], [0, 0]), "w": tensor()}, 4),    # empty tensor
    raw_safetensors({"w": tensor("F4", [3], [0, 2])}, 2),                    # 12 bits
    raw_safetensors({"w": tensor("F6_E2M3", [2], [0, 2])}, 2),               # 12 bits
    raw_safetensors({"w": tensor(shape=[True])}, 4),                         # bool dimension
    raw_safetensors({"w": tensor(shape=[-1], offsets=[0, 0])}, 0),
    raw_safetensors({"w": tensor(shape=[1.0])}, 4),
    raw_safetensors({"w": tensor(shape=[2**64], offsets=[0, 0])}, 0),
    raw_safetensors({"w": tensor(shape=[2**40, 2**40, 0], offsets=[0, 0])}, 0),  # overflows on the way
    raw_safetensors({"w": tensor(offsets=[0, 4, 4])}, 4),
    raw_safetensors({"w": {"dtype": "F32", "shape": [1], "data_offsets": {"a": 0, "b": 4}}}, 4),
    raw_safetensors({"w": ["F32", [1], [0, 4]]}, 4),                         # serde's array form of a struct
    raw_safetensors({"w": ["F32", [1], [0, 4], 1]}, 4),
    raw_safetensors({"w": {**tensor(), "extra": 1}}, 4),
    raw_safetensors({"__metadata__": {"format": "pt"}, "w": tensor()}, 4),
    raw_safetensors({"__metadata__": {"n": 1}}, 0),
    raw_safetensors({"__metadata__": None}, 0),
    raw_safetensors({}, 0),
    raw_safetensors([], 0),
    raw_safetensors(b"", 0),
    raw_safetensors(b"{}    ", 0),
    raw_safetensors(b"\xef\xbb\xbf{}", 0),                                   # a BOM
    raw_safetensors(b"\xff{}", 0),                                           # not UTF-8
    raw_safetensors(b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', 4),
    raw_safetensors(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                    b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4),  # a name twice
    b"\x01\x02",
    struct.pack("<Q", 1000) + b"{}",
    struct.pack("<Q", 10**12) + b"{}",
]


def library_accepts(blob: bytes, safetensors) -> int | None:
    try:
        return sum(math.prod(info["shape"]) for _, info in safetensors.deserialize(blob))
    except safetensors.SafetensorError:
        return None


def we_accept(blob: bytes, path) -> int | None:
    path.write_bytes(blob)
    try:
        return check_safetensors(path)
    except ModelError:
        return None


def test_the_check_agrees_with_the_safetensors_library_on_every_dtype_and_broken_headers(tmp_path):
    safetensors = pytest.importorskip("safetensors", reason="the [torch] extra installs safetensors")
    path = tmp_path / "model.safetensors"
    valid = [raw_safetensors({"w": tensor(dtype, [8], [0, bits])}, bits) for dtype, bits in SAFETENSORS_DTYPE_BITS.items()]
    for blob in valid:
        assert we_accept(blob, path) == library_accepts(blob, safetensors) == 8, blob[:80]
    for blob in BROKEN_AND_ODD:
        assert we_accept(blob, path) == library_accepts(blob, safetensors), blob[:200]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.lists(st.tuples(st.sampled_from(sorted(SAFETENSORS_DTYPE_BITS) + ["F8", "c64"]),
                                  st.lists(st.integers(0, 5), max_size=3), st.integers(-2, 2)),
                        max_size=4),
       trailing=st.integers(-1, 2))
def test_the_check_agrees_with_the_library_on_generated_headers(tmp_path, tensors, trailing):
    """Tensors laid end to end, each span nudged by `skew` bytes and the buffer by `trailing`."""
    safetensors = pytest.importorskip("safetensors", reason="the [torch] extra installs safetensors")
    header, offset = {}, 0
    for index, (dtype, shape, skew) in enumerate(tensors):
        span = max(0, math.prod(shape) * SAFETENSORS_DTYPE_BITS.get(dtype, 8) // 8 + skew)
        header[f"t{index}"] = tensor(dtype, shape, [offset, offset + span])
        offset += span
    blob = raw_safetensors(header, max(0, offset + trailing))
    assert we_accept(blob, tmp_path / "model.safetensors") == library_accepts(blob, safetensors)


def test_a_same_size_rewrite_that_puts_the_mtime_back_fails_the_model(tmp_path):
    """cp -p, rsync --inplace -t and tar -x restore the mtime; the ctime, which no writer can set,
    still tells."""
    path = add_model(tmp_path, "org/m")
    weights = path / "model.safetensors"
    checked = os.stat(weights)
    model_plan = plan(snapshot_of(path))
    # Rewritten until the ctime differs from the checked one: a coarse file-system clock may give a
    # write the ctime the file already had (the state decides the loop, not a time).
    while os.stat(weights).st_ctime_ns == checked.st_ctime_ns:
        with open(weights, "r+b") as handle:  # same size, same inode: a header that passed is gone
            handle.seek(8)
            handle.write(b"\xff" * 64)
        os.utime(weights, ns=(checked.st_atime_ns, checked.st_mtime_ns))
    assert os.stat(weights).st_mtime_ns == checked.st_mtime_ns and os.stat(weights).st_size == checked.st_size
    with pytest.raises(ModelError, match=r"model.safetensors: changed since it was checked \(its ctime changed with "
                                         r"its size, mtime, links, mode and owner as they were: rewritten"):
        warm(snapshot_of(path), model_plan, lambda n: None)


def test_a_hard_link_or_chmod_while_a_model_loads_is_no_change(tmp_path):
    """Publishing a version beside this one with hard links (cp -al, rsync --link-dest) moves every
    shared file's ctime, and so does a chmod: the reviewer saw such a model fail, 'rewritten with its
    mtime put back', though not a byte had changed. The link count or mode moved with the ctime."""
    path = add_model(tmp_path, "org/m")
    weights = path / "model.safetensors"
    model_plan = plan(snapshot_of(path))
    os.link(weights, tmp_path / "published-copy.safetensors")
    os.chmod(path / "config.json", 0o600)
    warm(snapshot_of(path), model_plan, lambda n: None)


def test_a_json_file_over_the_cap_is_refused_from_its_size_before_it_is_read(tmp_path, monkeypatch):
    """A 1 GiB sparse config.json took 2 GB of the loader's memory to be found invalid."""
    from gpu_orchestrator.loaders import backends
    from gpu_orchestrator.loaders.backends import MANIFEST
    from gpu_orchestrator.loaders.snapshot_files import MAX_JSON_BYTES

    opened = []  # every file the plan opens, counting what is read from it
    monkeypatch.setattr(backends, "open_regular", lambda p: opened.append(CountingFile(p)) or opened[-1])
    path = add_model(tmp_path, "org/m")
    for name in ("config.json", "tokenizer_config.json", "modules.json", "model.safetensors.index.json", MANIFEST):
        with open(path / name, "wb") as handle:  # sparse: large, no blocks
            handle.truncate(MAX_JSON_BYTES + 1)
        with pytest.raises(ModelError, match=f"{re.escape(name)} is {MAX_JSON_BYTES + 1} bytes, over the "
                                             f"{MAX_JSON_BYTES} bytes a JSON file of a snapshot may hold"):
            plan(snapshot_of(path))
        assert [f.read_bytes for f in opened if str(f.name) == str(path / name)] == [0]
        opened.clear()
        (path / name).write_text("{}") if name == "config.json" else (path / name).unlink()
    (path / "config.json").write_bytes(b" " * MAX_JSON_BYTES)  # at the cap: read, and judged as JSON
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        plan(snapshot_of(path))


def test_a_shard_index_names_only_weight_files_of_its_own_kind_by_string(tmp_path):
    path = add_model(tmp_path, "org/m")
    index = path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": 1, "b": "model.safetensors"}}))  # was: unexpected TypeError
    with pytest.raises(ModelError, match=r"model.safetensors.index.json: not a valid shard index"):
        plan(snapshot_of(path))
    index.write_text(json.dumps({"weight_map": {"a": "config.json", "b": "vocab.txt", "c": "model.safetensors"}}))
    with pytest.raises(ModelError, match=r"model.safetensors.index.json names files that are not .safetensors "
                                         r"weight files as shards: config.json, vocab.txt"):
        plan(snapshot_of(path))
    index.write_text(json.dumps({"weight_map": {"a": "model.safetensors"}}))
    assert plan(snapshot_of(path)).format == "safetensors"
    index.unlink()
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors"}}))
    with pytest.raises(ModelError, match=r"pytorch_model.bin.index.json names files that are not .bin"):
        plan(snapshot_of(path))


def test_tokenizer_files_named_outside_the_snapshot_are_records_not_requirements(tmp_path):
    """transformers 4 wrote the saver's absolute cache path into tokenizer_file, in snapshots on the
    Hub that load everywhere: transformers opens the snapshot's own file by that name, never the
    path. Refusing them (as this session's first fix did) failed valid models; a name inside the
    snapshot must still be there."""
    path = add_model(tmp_path, "org/m")
    tokenizer = path / "tokenizer_config.json"
    for elsewhere in ("/home/someone/.cache/huggingface/0123abcd.json", "../other/vocab.txt", "sub/../../vocab.txt"):
        tokenizer.write_text(json.dumps({"vocab_file": "vocab.txt", "tokenizer_file": elsewhere,
                                         "special_tokens_map_file": "/root/.cache/special_tokens_map.json"}))
        assert plan(snapshot_of(path)).format == "safetensors"
    tokenizer.write_text(json.dumps({"vocab_file": "vocab.txt", "merges_file": "merges.txt"}))
    with pytest.raises(ModelError, match="tokenizer_config.json names files that are missing: merges.txt"):
        plan(snapshot_of(path))


def test_a_manifest_checksum_in_upper_case_hex_verifies(tmp_path):
    path = add_model(tmp_path, "org/m", manifest=True)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["checksum"] = "sha256:" + manifest["checksum"].removeprefix("sha256:").upper()
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert warm(snapshot_of(path), plan(snapshot_of(path)), lambda n: None) is True
