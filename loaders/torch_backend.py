"""The PyTorch backend: put a model's safetensors weights where the client will run it.

Chosen per client (`"backend": "torch"` in its allocation) or for all
(GPU_ORCHESTRATOR_BACKEND=torch); used only when torch imports. Weights go to
cuda:0 of what the loader sees (CUDA_VISIBLE_DEVICES and the MPS limits apply),
else to the CPU. The memory they took is measured and checked against the
client's limit; with `"warmup": true` and sentence-transformers installed, one
sentence is embedded. The weights are then released: the backend proves the
model loads and fits, the client service holds its own copy.

The weights are read once, as the warm-up's read of their files (backends.warm with a place):
each file's data is read in chunks, by several threads at once, into pinned (page-locked) host
buffers taken in turn, and each chunk is copied asynchronously to one device buffer while the
next are read; the tensors are then views of that buffer. safetensors' own
`load_file(device="cuda")` copies tensor by tensor from pageable memory, after a warm-up that
read the files already.
"""

import ctypes
import gc
import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gpu_orchestrator.loaders.backends import ModelError, Plan, Progress, warm
from gpu_orchestrator.loaders.formats import safetensors_header
from gpu_orchestrator.loaders.snapshot_files import check_unchanged_after, check_unchanged_before
from gpu_orchestrator.loaders.store import Snapshot

STAGING_BYTES = 16 * 2**20  # per pinned buffer: large enough that a copy's setup cost vanishes
STAGING_SLOTS = 8  # buffers per load: enough to keep READERS reading while copies run
READERS = 8  # threads reading one file at once

# safetensors dtype -> torch attribute; a dtype torch lacks is refused by name.
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
    "I64": "int64", "U64": "uint64", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",  # two to a byte: the last dimension halves, as safetensors loads it
}  # F6 has no torch type (safetensors 0.8 refuses it too)
PACKED = {"F4": 2}  # elements per torch element

WARMUP_SENTENCE = "The orchestrator checks that this model answers before its client starts."


class OverLimit(ModelError):
    """The weights did not fit: over the client's limit, or out of device memory under it (a
    context that does not fit is a plain ModelError: it says nothing of the model)."""


@dataclass
class TorchResult:
    device: str
    memory_bytes: int
    embedding_dim: int | None = None
    note: str | None = None
    verified: bool = False  # the bytes matched the snapshot's manifest


def import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ModelError(f"backend 'torch' chosen but {exc.name} is not installed: "
                         "pip install 'gpu-orchestrator[torch]', or drop \"backend\": \"torch\"") from None
    return torch


def load_torch(snapshot: Snapshot, model_plan: Plan, used_bytes: int, limit_bytes: int | None,
               warmup: bool, progress: Progress = lambda done: None) -> TorchResult:
    """Check and read the model as warm() does (it is warm(), with the safetensors files read
    straight onto the device), then measure what the weights took and hold it to the limit."""
    torch = import_torch()
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    weights = [f for f in model_plan.files if f.suffix == ".safetensors"]
    if not weights:
        raise ModelError("backend 'torch' loads safetensors weights; this snapshot has none")
    limit = f"{limit_bytes / 2**30:.2f} GiB" if limit_bytes is not None else "none set"
    pinned = os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "unset")
    if device != "cpu":
        create_context(torch, device, limit, pinned)
    before = torch.cuda.memory_allocated(0) if device != "cpu" else 0
    placement = None
    try:
        largest = max(model_plan.identities[path][0] for path in weights)
        placement = Placement(torch, device, staging_buffers(torch, largest, pinned=device != "cpu"))
        verified = warm(snapshot, model_plan, progress, placement.place)
        taken = (torch.cuda.memory_allocated(0) - before) if device != "cpu" else \
            sum(t.numel() * t.element_size() for t in placement.tensors.values())
        if limit_bytes is not None and used_bytes + taken > limit_bytes:
            raise OverLimit(f"took {taken / 2**30:.2f} GiB on {device}, over the client's limit of "
                             f"{limit_bytes / 2**30:.2f} GiB ({used_bytes / 2**30:.2f} GiB already taken)")
        result = TorchResult(device, taken, verified=verified)
        if warmup:
            embed(snapshot, device, result)
        return result
    except BaseException as exc:
        # The traceback keeps the frames that held the device buffers (and warm()'s, holding the
        # placement) alive for as long as the caller keeps the error: let them go now, so that
        # empty_cache below gives the memory back to the device.
        traceback.clear_frames(exc.__traceback__)
        if not isinstance(exc, RuntimeError) or "out of memory" not in str(exc).lower():
            raise
        raise OverLimit(f"out of GPU memory loading {model_plan.weight_bytes / 2**30:.2f} GiB of weights "
                         f"(client limit {limit}; CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={pinned}): {exc}") from None
    finally:
        if placement is not None:
            placement.tensors.clear()  # views of one buffer per file: freed with their last reference
            placement.staging = None
        placement = None
        if warmup:
            gc.collect()  # the embedding model's objects hold reference cycles
        if device != "cpu":
            torch.cuda.empty_cache()
            # torch keeps freed pinned blocks for reuse, so the staging buffers would stay locked
            # in the loader for good; its own graphs.py frees them with this (not public API).
            getattr(torch._C, "_host_emptyCache", lambda: None)()


def create_context(torch, device: str, limit: str, pinned: str) -> None:
    """The CUDA context, before any weight: under MPS it counts against the client's pinned limit
    (512-544 MiB on an H200 with driver 580), and a limit too small for it must say so rather
    than blame the weights."""
    try:
        torch.empty(1, device=device)
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        raise ModelError(f"the CUDA context itself does not fit under the client's limit ({limit}; "
                         f"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT={pinned}): a context takes about 0.5 GiB of it "
                         f"on recent GPUs; raise mps_memory_limit_gb (gpu-check measures it): "
                         f"{str(exc).splitlines()[0]}") from None


def embed(snapshot: Snapshot, device: str, result: TorchResult) -> None:
    """One embedding of a fixed sentence; offline only: nothing is ever downloaded."""
    if not (snapshot.path / "modules.json").exists():
        result.note = "warm-up inference skipped: not a sentence-transformers snapshot"
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        result.note = "warm-up inference skipped: sentence-transformers is not installed"
        return
    model = SentenceTransformer(str(snapshot.path), device=device)
    vector = model.encode([WARMUP_SENTENCE])
    result.embedding_dim = int(vector.shape[-1])
    del model


def staging_buffers(torch, largest: int, pinned: bool, size: int = STAGING_BYTES, slots: int = STAGING_SLOTS) -> list:
    """The host buffers a load reads into, `slots` of them taken in turn: pinned (page-locked) for a
    GPU, whose copies from pinned memory run asynchronously at the link's full rate; ordinary for the
    CPU, where they let several threads read at once; one set per load."""
    chunk = max(1, min(size, largest))
    slots = max(2, min(slots, -(-largest // chunk)))  # no more than the largest file fills, two for overlap
    try:
        return [torch.empty(chunk, dtype=torch.uint8, pin_memory=pinned) for _ in range(slots)]
    except RuntimeError:
        # Page-locked host memory refused (a container's limit, no allocator; the context exists
        # already, so this is not the device's memory): slower synchronous copies from ordinary
        # memory still load the model.
        return [torch.empty(chunk, dtype=torch.uint8) for _ in range(slots)]


class Placement:
    """Where warm() puts a model's safetensors files on the torch backend: each file's bytes go
    from the store into one buffer on the device as they are read (checked, hashed and counted as
    read_file does), and its tensors are views of that buffer."""

    def __init__(self, torch, device: str, staging: list):
        self.torch, self.device, self.staging = torch, device, staging
        self.tensors = {}

    def place(self, handle: BinaryIO, path: Path, checked: tuple, digest, progress: Progress) -> int:
        """One file, open as `handle` (the plan checked its header; `checked` is its identity then)."""
        check_unchanged_before(handle, path, checked)
        size = checked[0]
        header = safetensors_header(handle, path.name, with_tensors=True)  # checked again: these bytes place
        start = len(header.raw)
        if digest is not None:
            digest.update(header.raw)
        data = self.torch.empty(size - start, dtype=self.torch.uint8, device=self.device)
        os.posix_fadvise(handle.fileno(), start, data.numel(), os.POSIX_FADV_SEQUENTIAL)
        copy_through(self.torch, handle, start, data, self.staging, digest, lambda n: progress(start + n))
        check_unchanged_after(handle, path, checked, size)
        for name, dtype, shape, begin, end in header.tensors:
            self.tensors[name] = tensor_view(self.torch, data, name, dtype, shape, begin, end)
        return size


def copy_through(torch, handle, start: int, data, staging: list, digest, progress: Progress) -> None:
    """Read the file from `start` into `data` through the staging buffers: up to READERS threads
    read chunks into free buffers at once (one thread copies the page cache at a fraction of the
    link's rate), and each chunk, in file order, is hashed into `digest` (if any), counted, and
    copied to the device asynchronously (on the CPU, at once). A buffer is read into again only
    once the copy out of it has finished (its event). Progress, and with it a loader's look at
    SIGTERM, comes between chunks."""
    on_gpu = data.device.type == "cuda"
    size, chunk, slots = data.numel(), staging[0].numel(), len(staging)
    offsets = range(0, size, chunk)
    copied = [None] * slots  # per buffer: the event of the last copy out of it

    def read(index: int) -> int:
        turn = index % slots
        if copied[turn] is not None:
            copied[turn].synchronize()
        count = min(chunk, size - offsets[index])
        read_exactly(handle, start + offsets[index], staging[turn], count)
        return count

    # Leaving the pool waits for reads in flight: no thread writes into a buffer after this returns.
    with ThreadPoolExecutor(max_workers=min(READERS, slots)) as pool:
        reads = {index: pool.submit(read, index) for index in range(min(slots, len(offsets)))}
        try:
            for index, offset in enumerate(offsets):
                count, turn = reads.pop(index).result(), index % slots
                if digest is not None:
                    digest.update(host_view(staging[turn], count))
                data[offset:offset + count].copy_(staging[turn][:count], non_blocking=on_gpu)
                if on_gpu:
                    copied[turn] = torch.cuda.Event()
                    copied[turn].record()
                progress(offset + count)
                if index + slots < len(offsets):
                    reads[index + slots] = pool.submit(read, index + slots)
        finally:
            for pending in reads.values():
                pending.cancel()
    if on_gpu:
        torch.cuda.current_stream(data.device).synchronize()


def read_exactly(handle, position: int, buffer, count: int) -> None:
    """`count` bytes of the file at `position` into the host tensor `buffer`, or a ModelError."""
    view, got = host_view(buffer, count), 0
    while got < count:
        n = os.preadv(handle.fileno(), [view[got:]], position + got)
        if n == 0:
            raise ModelError(f"{os.path.basename(handle.name)}: ended {count - got} bytes early while loading "
                             "(it shrank since it was checked); the store must be immutable")
        got += n


def host_view(buffer, count: int) -> memoryview:
    """The first `count` bytes of a host (CPU) uint8 tensor, as a writable memoryview."""
    if count == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * count).from_address(buffer.data_ptr())).cast("B")


def tensor_view(torch, data, name: str, dtype: str, shape: list, begin: int, end: int):
    """One tensor as a view of the file's device buffer; a copy where its offset is not aligned
    to its element size (the format does not promise alignment, a view needs it)."""
    kind = getattr(torch, TORCH_DTYPES.get(dtype, ""), None)
    if kind is None:
        raise ModelError(f"tensor {name!r} is {dtype}, which the torch backend cannot load with this torch "
                         f"({torch.__version__}); use the default backend for this model")
    if dtype in PACKED:
        if not shape or shape[-1] % PACKED[dtype]:
            raise ModelError(f"tensor {name!r} is {dtype}{shape}: its last dimension does not pack "
                             f"{PACKED[dtype]} to a byte, as torch holds {dtype}; use the default backend")
        shape = [*shape[:-1], shape[-1] // PACKED[dtype]]
    raw = data[begin:end]
    size = torch.empty((), dtype=kind).element_size()
    if begin % size:
        raw = raw.clone()
    return raw.view(kind).view(shape)
