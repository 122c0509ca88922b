"""The PyTorch backend: put a model's safetensors weights where the client will run it.

Chosen per client (`"backend": "torch"` in its allocation) or for all
(GPU_ORCHESTRATOR_BACKEND=torch); used only when torch imports. Weights go to
cuda:0 of what the loader sees (CUDA_VISIBLE_DEVICES and the MPS limits apply),
else to the CPU. The memory they took is measured and checked against the
client's limit; with `"warmup": true` and sentence-transformers installed, one
sentence is embedded. The weights are then released: the backend proves the
model loads and fits, the client service holds its own copy.
"""

import gc
import os
from dataclasses import dataclass

from gpu_orchestrator.loaders.backends import ModelError, Plan
from gpu_orchestrator.loaders.store import Snapshot

WARMUP_SENTENCE = "The orchestrator checks that this model answers before its client starts."


@dataclass
class TorchResult:
    device: str
    memory_bytes: int
    embedding_dim: int | None = None
    note: str | None = None


def import_torch():
    try:
        import torch
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ModelError(f"backend 'torch' chosen but {exc.name} is not installed: "
                         "pip install 'gpu-orchestrator[torch]', or drop \"backend\": \"torch\"") from None
    return torch, load_file


def load_torch(snapshot: Snapshot, model_plan: Plan, used_bytes: int, limit_bytes: int | None,
               warmup: bool) -> TorchResult:
    torch, load_file = import_torch()
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    weights = [f for f in model_plan.files if f.suffix == ".safetensors"]
    if not weights:
        raise ModelError("backend 'torch' loads safetensors weights; this snapshot has none")
    before = torch.cuda.memory_allocated(0) if device != "cpu" else 0
    tensors = {}
    try:
        for path in weights:
            tensors.update(load_file(str(path), device=device))
        taken = (torch.cuda.memory_allocated(0) - before) if device != "cpu" else \
            sum(t.numel() * t.element_size() for t in tensors.values())
        if limit_bytes is not None and used_bytes + taken > limit_bytes:
            raise ModelError(f"took {taken / 2**30:.2f} GiB on {device}, over the client's limit of "
                             f"{limit_bytes / 2**30:.2f} GiB ({used_bytes / 2**30:.2f} GiB already taken)")
        result = TorchResult(device, taken)
        if warmup:
            embed(snapshot, device, result)
        return result
    except RuntimeError as exc:
        # OutOfMemoryError from the allocator; a plain RuntimeError ("CUDA error: out of memory")
        # when the pinned limit is too small for the context itself.
        if not isinstance(exc, torch.cuda.OutOfMemoryError) and "out of memory" not in str(exc).lower():
            raise
        limit = f"{limit_bytes / 2**30:.2f} GiB" if limit_bytes is not None else "none set"
        raise ModelError(f"out of GPU memory loading {model_plan.weight_bytes / 2**30:.2f} GiB of weights "
                         f"(client limit {limit}; CUDA_MPS_PINNED_DEVICE_MEM_LIMIT="
                         f"{os.environ.get('CUDA_MPS_PINNED_DEVICE_MEM_LIMIT', 'unset')}): {exc}") from None
    finally:
        tensors.clear()
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()


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
