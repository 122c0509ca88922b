"""The built-in demo: a small model store with real safetensors files, a model map
and an allocation file, laid out the way a production store is."""

import json
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

from gpu_orchestrator.loaders.backends import MANIFEST, snapshot_checksum
from gpu_orchestrator.supervisor.jsonfile import ConfigError

# model id -> (hidden size, layers, vocabulary): small transformer-shaped tensors.
MODELS = {
    "demo/news-classifier": (128, 2, 8000),
    "demo/sentiment": (256, 2, 8000),
    "demo/tiny-gpt": (384, 4, 12000),
    "sentence-transformers/mini-embedder": (192, 3, 10000),
}
CLIENTS = {
    "scout": ["demo/news-classifier", "sentence-transformers/mini-embedder"],
    "analyst": ["demo/sentiment", "sentence-transformers/mini-embedder"],
    "synthesizer": ["demo/tiny-gpt"],
}
LIMITS_GB = {"scout": (0.5, 0.3, 0.2, "high"), "analyst": (0.5, 0.3, 0.2, "medium"), "synthesizer": (1.0, 0.6, 0.4, "low")}


@dataclass(frozen=True)
class DemoFiles:
    store: str
    model_map: str
    allocation: str


RANDOM_CHUNK = 64 * 2**20


def write_safetensors(path: Path, tensors: dict[str, list[int]], seed: int) -> int:
    """Write F16 tensors of the given shapes with random bytes; return the parameter count."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    generator = random.Random(seed)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for start in range(0, offset, RANDOM_CHUNK):  # one randbytes() makes at most 2**28 bytes
            handle.write(generator.randbytes(min(RANDOM_CHUNK, offset - start)))
    return offset // 2


def transformer_tensors(hidden: int, layers: int, vocabulary: int) -> dict[str, list[int]]:
    tensors = {"embeddings.word_embeddings.weight": [vocabulary, hidden]}
    for layer in range(layers):
        for part in ("query", "key", "value", "output"):
            tensors[f"encoder.layer.{layer}.attention.{part}.weight"] = [hidden, hidden]
        tensors[f"encoder.layer.{layer}.intermediate.weight"] = [4 * hidden, hidden]
        tensors[f"encoder.layer.{layer}.output.weight"] = [hidden, 4 * hidden]
    return tensors


def write_snapshot(directory: Path, shape: tuple[int, int, int], seed: int, manifest: bool) -> None:
    """A transformer-shaped snapshot: config, tokenizer files, model.safetensors, maybe a manifest."""
    hidden, layers, vocabulary = shape
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "bert", "hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocabulary}))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (directory / "vocab.txt").write_text("\n".join(f"token{i}" for i in range(vocabulary)))
    write_safetensors(directory / "model.safetensors", transformer_tensors(hidden, layers, vocabulary), seed)
    if manifest:
        checksum = snapshot_checksum(directory)
        (directory / MANIFEST).write_text(json.dumps({"version": "1", "checksum": checksum, "metadata": {"demo": True}}))


def write_demo(directory: str) -> DemoFiles:
    """Shared snapshots at the store root, and scout's own copy under scout/current. Nothing is
    written into a folder that holds files of its own where the demo's go: `demo --dir` pointed
    at a real AGENT_MODEL_MAP.json must not replace it (a demo run before is fine)."""
    root = Path(directory)
    allocations = {
        client: {"mps_memory_limit_gb": limit, "calculated_requirement_gb": need, "safety_margin_gb": margin,
                 "priority": priority, "models": CLIENTS[client]}
        for client, (limit, need, margin, priority) in LIMITS_GB.items()
    }
    files = {root / "AGENT_MODEL_MAP.json": json.dumps(CLIENTS, indent=2),
             root / "mps_allocation_config.json": json.dumps({"mps_resource_allocation": {
                 "agent_allocations": allocations,
                 "mps_configuration": {"total_gpu_memory_gb": 24.0},
                 "system_summary": {"note": "recomputed by the orchestrator; never trusted"}}}, indent=2)}
    for path, text in files.items():
        if os.path.lexists(path) and not is_file_holding(path, text):
            raise ConfigError(f"{path} exists and is not the demo's; point --dir at a new or empty folder")
    store = root / "models"
    for seed, model_id in enumerate(MODELS):
        write_snapshot(store / model_id, MODELS[model_id], seed, manifest=seed % 2 == 0)
    version = store / "scout" / "versions" / "v1"
    write_snapshot(version / "demo/news-classifier", MODELS["demo/news-classifier"], 99, manifest=True)
    current = store / "scout" / "current"
    if not current.is_symlink():
        os.symlink("versions/v1", current)
    for path, text in files.items():
        path.write_text(text)
    model_map, allocation = files
    return DemoFiles(str(store), str(model_map), str(allocation))


def is_file_holding(path: Path, text: str) -> bool:
    """Whether `path` is a regular file holding exactly `text` (a folder or binary file there is not)."""
    try:
        return path.is_file() and path.read_bytes() == text.encode()
    except OSError:
        return False


def instructions(host: str, port: int, kept: str | None = None) -> str:
    """What to try; `kept`: the --dir the demo's files stay in after Ctrl-C."""
    base = f"http://{host}:{port}"
    ending = f"Ctrl-C stops it; its files stay in {kept}" if kept else "Ctrl-C stops it and removes what it wrote"
    return f"""
gpu-orchestrator demo is serving on {base} ({ending}).
Try, from another terminal:

  curl -s {base}/health
  curl -s {base}/models/status | jq '{{in_progress, all_ready, summary}}'
  curl -s -X POST -H 'Content-Type: application/json' -d '{{"refresh": true}}' {base}/models/preload
  curl -s {base}/gpu/info | jq '{{mps_enabled, mps}}'
  curl -s {base}/mps/allocation | jq '.mps_resource_allocation.system_summary'
"""
