"""The torch backend's own safetensors loading (staged chunks, tensors as views of one buffer),
judged against the safetensors library's load_file on the same files. On the CPU here; the same
code runs on cuda with pinned buffers (scripts/gpu-check and `gpu-orchestrator bench-gpu`)."""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the torch backend needs the [torch] extra")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="the torch backend needs the [torch] extra")

from gpu_orchestrator.loaders.snapshot_files import identity
from gpu_orchestrator.loaders.formats import SAFETENSORS_DTYPE_BITS, ModelError
from gpu_orchestrator.loaders.torch_backend import Placement, staging_buffers


def load_safetensors(torch, path: str, device: str, staging=None, digest=None, progress=lambda n: None) -> dict:
    """One file placed as warm() places it on the torch backend (`staging` None: as load_torch
    stages it): its tensors."""
    placement = Placement(torch, device, staging or staging_buffers(torch, os.path.getsize(path), pinned=False))
    with open(path, "rb") as handle:
        assert placement.place(handle, Path(path), identity(handle), digest, progress) == os.path.getsize(path)
    return placement.tensors


def sample_tensors() -> dict:
    generator = torch.Generator().manual_seed(7)
    return {
        "embeddings.weight": torch.randn(300, 17, generator=generator),
        "layer.0.bias": torch.randn(17, generator=generator).to(torch.float16),
        "layer.0.scale": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "positions": torch.arange(11, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("staging, slots", [(None, 0), (7, 2), (4096, 3), (4096, 8), (64 * 2**20, 8)])
def test_same_tensors_as_the_library_whatever_the_chunking(tmp_path, staging, slots):
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sample_tensors(), str(path))
    expected = safetensors_torch.load_file(str(path))
    buffers = None if staging is None else staging_buffers(torch, path.stat().st_size, False, staging, slots)
    loaded = load_safetensors(torch, str(path), "cpu", buffers)
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def write_misaligned(path) -> bytes:
    """Three U8 bytes, then an F32 tensor starting at byte 3: valid safetensors, no alignment."""
    values = [1.5, -2.25, 1e-3]
    data = bytes([9, 8, 7]) + struct.pack("<3f", *values)
    header = {"bytes": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "floats": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return data


def test_a_tensor_off_its_alignment_is_copied_not_misread(tmp_path):
    path = tmp_path / "model.safetensors"
    write_misaligned(path)
    loaded = load_safetensors(torch, str(path), "cpu", staging_buffers(torch, 15, pinned=False, size=5))
    assert loaded["bytes"].tolist() == [9, 8, 7]
    assert loaded["floats"].tolist() == pytest.approx([1.5, -2.25, 1e-3])


def test_a_file_that_shrinks_while_it_loads_fails_saying_so(tmp_path):
    """Cut short after its first chunk was placed: the missing bytes fail the load by name,
    never load as zeros."""
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sample_tensors(), str(path))
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    cut = 8 + header_len + 2 * 4096 + 10

    def cut_short(done: int) -> None:
        if done <= 8 + header_len + 4096:
            os.truncate(path, cut)

    staging = staging_buffers(torch, path.stat().st_size, pinned=False, size=4096, slots=2)
    with pytest.raises(ModelError, match=r"model.safetensors: ended \d+ bytes early while loading"):
        load_safetensors(torch, str(path), "cpu", staging, progress=cut_short)


def test_every_byte_is_hashed_in_order_and_counted(tmp_path):
    """The manifest's digest sees the file as read_file would feed it: every byte, in order; and
    progress comes per chunk on the CPU too (a loader stops between chunks on SIGTERM)."""
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sample_tensors(), str(path))
    for staging in (staging_buffers(torch, path.stat().st_size, pinned=False, size=1000, slots=1),
                    staging_buffers(torch, path.stat().st_size, pinned=False, size=1000, slots=3)):
        digest, seen = hashlib.sha256(), []
        load_safetensors(torch, str(path), "cpu", staging, digest, seen.append)
        assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert seen == sorted(seen) and seen[-1] == path.stat().st_size and len(seen) > 10


def test_every_dtype_the_library_loads_loads_here_and_the_others_are_refused_by_name(tmp_path):
    """Each dtype of the format (the model check accepts them all): where safetensors' own
    load_file loads it, so must the torch backend, byte for byte; else a ModelError naming it."""
    path = tmp_path / "model.safetensors"
    for dtype, bits in SAFETENSORS_DTYPE_BITS.items():
        elements = 8  # a whole number of bytes for every width
        text = json.dumps({"w": {"dtype": dtype, "shape": [elements], "data_offsets": [0, elements * bits // 8]}})
        path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + bytes(range(1, 1 + elements * bits // 8)))
        try:
            expected = safetensors_torch.load_file(str(path))["w"]
        except Exception:  # noqa: BLE001  (the library refuses it: so may we, by name)
            with pytest.raises(ModelError, match=f"'w' is {dtype}, which the torch backend cannot load"):
                load_safetensors(torch, str(path), "cpu")
            continue
        loaded = load_safetensors(torch, str(path), "cpu")["w"]
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape, dtype
        assert torch.equal(loaded.view(torch.uint8), expected.view(torch.uint8)), dtype


def test_a_failed_load_lets_go_of_its_buffers_while_the_error_is_still_held(tmp_path, monkeypatch):
    """A manifest mismatch after the weights were placed: the caller (a loader that lives on)
    still holds the error, and the tensors must be gone all the same, or a GPU's memory would
    stay taken until the next load."""
    import weakref

    from gpu_orchestrator.loaders import torch_backend
    from gpu_orchestrator.loaders.backends import plan
    from gpu_orchestrator.loaders.store import Snapshot
    from gpu_orchestrator.supervisor.commands.demo import write_snapshot

    placed = []
    real_view = torch_backend.tensor_view
    monkeypatch.setattr(torch_backend, "tensor_view", lambda *a: placed.append(real_view(*a)) or placed[-1])
    root = tmp_path / "org" / "m"
    write_snapshot(root, (64, 1, 100), seed=1, manifest=True)
    data = bytearray((root / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (root / "model.safetensors").write_bytes(bytes(data))
    snapshot = Snapshot(root, root, "test")
    with pytest.raises(ModelError, match="manifest checksum mismatch") as raised:
        torch_backend.load_torch(snapshot, plan(snapshot), 0, None, warmup=False)
    alive = [weakref.ref(t) for t in placed]
    placed.clear()
    assert alive and all(ref() is None for ref in alive), "a failed load still holds its tensors"
    assert raised.value is not None


def test_where_memory_cannot_be_pinned_the_staging_buffers_are_ordinary_memory(tmp_path):
    """A CPU-only torch has no pinned allocator, as some containers refuse page-locked memory:
    the load still works, through ordinary buffers."""
    if torch.cuda.is_available():
        pytest.skip("this torch can pin memory")
    buffers = staging_buffers(torch, 1000, pinned=True, size=64, slots=3)
    assert [b.numel() for b in buffers] == [64, 64, 64] and not buffers[0].is_pinned()
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sample_tensors(), str(path))
    assert torch.equal(load_safetensors(torch, str(path), "cpu", buffers)["embeddings.weight"],
                       sample_tensors()["embeddings.weight"])


def test_the_torch_backend_is_the_warm_up_itself_manifest_checked_on_the_bytes_it_placed(tmp_path):
    """One read: the torch backend's placement is warm()'s read of the weights, so a manifest
    is verified on the very bytes that went to the device, and a flipped byte fails the model."""
    from gpu_orchestrator.loaders.backends import plan
    from gpu_orchestrator.loaders.store import Snapshot
    from gpu_orchestrator.loaders.torch_backend import load_torch
    from gpu_orchestrator.supervisor.commands.demo import write_snapshot

    root = tmp_path / "org" / "m"
    write_snapshot(root, (64, 1, 100), seed=1, manifest=True)
    snapshot = Snapshot(root, root, "test")
    seen = []
    result = load_torch(snapshot, plan(snapshot), 0, None, warmup=False, progress=seen.append)
    files = sum(p.stat().st_size for p in root.iterdir() if p.name != "manifest.json")
    assert result.verified and result.device in ("cpu", "cuda:0") and seen[-1] == files
    weights = root / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="manifest checksum mismatch"):
        load_torch(snapshot, plan(snapshot), 0, None, warmup=False)


def test_a_load_failing_mid_file_lets_go_of_the_file_buffer_while_the_error_is_held(tmp_path, monkeypatch):
    """The error comes from inside the placement, whose frame holds the file's whole buffer: the
    traceback the caller keeps must not keep that buffer (on a GPU: device memory) alive."""
    import weakref

    from gpu_orchestrator.loaders import torch_backend
    from gpu_orchestrator.loaders.backends import plan
    from gpu_orchestrator.loaders.store import Snapshot
    from gpu_orchestrator.supervisor.commands.demo import write_snapshot

    buffers = []
    real_copy = torch_backend.copy_through

    def copy_then_fail(torch, handle, start, data, staging, digest, progress):
        buffers[:] = [weakref.ref(data), *(weakref.ref(buffer) for buffer in staging)]
        real_copy(torch, handle, start, data, staging, digest, progress)
        raise ModelError("model.safetensors: ended 1 bytes early while loading")

    monkeypatch.setattr(torch_backend, "copy_through", copy_then_fail)
    root = tmp_path / "org" / "m"
    write_snapshot(root, (64, 1, 100), seed=1, manifest=False)
    snapshot = Snapshot(root, root, "test")
    with pytest.raises(ModelError, match="ended 1 bytes early") as raised:
        torch_backend.load_torch(snapshot, plan(snapshot), 0, None, warmup=False)
    assert len(buffers) >= 3 and all(ref() is None for ref in buffers), "the failed load's buffers are still alive"
    assert raised.traceback  # the error, and its traceback, are still held here


def test_entries_in_array_form_load_as_the_check_accepts_them(tmp_path):
    """The library (serde) reads a tensor entry as [dtype, shape, data_offsets] too, and the model
    check accepts it: the torch backend must load it, not crash on a list."""
    path = tmp_path / "model.safetensors"
    text = json.dumps({"w": ["F32", [2], [0, 8]], "b": {"dtype": "U8", "shape": [3], "data_offsets": [8, 11]}})
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + struct.pack("<2f", 1.5, -2.0) + bytes([7, 8, 9]))
    loaded = load_safetensors(torch, str(path), "cpu")
    assert loaded["w"].tolist() == [1.5, -2.0] and loaded["b"].tolist() == [7, 8, 9]


def test_a_header_changed_in_place_since_the_check_is_checked_again(tmp_path):
    """Same size and mtime, another header: the placement validates the header it places by,
    so offsets out of the data fail by name instead of cutting tensors from the wrong bytes. (The
    identity's ctime now catches such a rewrite first: it is taken after the rewrite here, as if
    the writer had got the ctime back too, so that the placement's own check is what is tested.)"""
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sample_tensors(), str(path))
    whole = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", whole[:8])
    header = json.loads(whole[8:8 + header_len])
    begin, end = header["positions"]["data_offsets"]
    header["positions"]["data_offsets"] = [begin + 8, end + 8]  # now overlaps the next tensor
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    stat = path.stat()
    path.write_bytes(bytes(whole[:8]) + text + bytes(whole[8 + header_len:]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with open(path, "rb") as handle:
        checked = identity(handle)
    placement = Placement(torch, "cpu", staging_buffers(torch, path.stat().st_size, pinned=False))
    with open(path, "rb") as handle, pytest.raises(ModelError, match="model.safetensors: "):
        placement.place(handle, path, checked, None, lambda n: None)


def test_staging_is_no_larger_than_the_largest_file_needs():
    """A load stages through at most STAGING_SLOTS buffers of STAGING_BYTES, fewer and smaller
    for small files, and always two at least (one read while the other is copied)."""
    from gpu_orchestrator.loaders.torch_backend import STAGING_BYTES, STAGING_SLOTS
    assert [b.numel() for b in staging_buffers(torch, 1000, pinned=False)] == [1000, 1000]
    assert [b.numel() for b in staging_buffers(torch, 40 * 2**20, pinned=False)] == [STAGING_BYTES] * 3
    assert len(staging_buffers(torch, 10**12, pinned=False)) == STAGING_SLOTS


def test_only_weights_that_do_not_fit_are_over_the_limit(tmp_path, monkeypatch):
    """gpu-check counts a refusal as 'for its size' only for an OverLimit: a changed file or a
    context that does not fit is a ModelError that says nothing of the model's size."""
    from gpu_orchestrator.loaders import torch_backend
    from gpu_orchestrator.loaders.backends import plan
    from gpu_orchestrator.loaders.store import Snapshot
    from gpu_orchestrator.supervisor.commands import gpucheck
    from gpu_orchestrator.supervisor.commands.demo import write_snapshot

    root = tmp_path / "org" / "m"
    write_snapshot(root, (64, 1, 100), seed=1, manifest=False)
    snapshot = Snapshot(root, root, "test")
    with pytest.raises(torch_backend.OverLimit, match="over the client's limit"):
        torch_backend.load_torch(snapshot, plan(snapshot), 0, 1024, warmup=False)
    assert gpucheck.torch_load(str(root), 0)["over_limit"] is True  # 0 MiB: nothing fits
    monkeypatch.setattr(torch_backend, "load_torch",
                        lambda *a, **k: (_ for _ in ()).throw(ModelError("the CUDA context itself does not fit")))
    outcome = gpucheck.torch_load(str(root), 4096)
    assert outcome["over_limit"] is False and "context itself" in outcome["result"]
