"""Host layouts for the fake NVML module (tests/fakes/nvml/pynvml.py reads them from FAKE_NVML_CONFIG)."""

import json
from pathlib import Path

GiB = 1024**3

HEALTHY_H100 = {
    "uuid": "GPU-11111111-2222-3333-4444-555555555555", "name": "NVIDIA H100 80GB HBM3",
    "bus": "00000000:18:00.0", "memory": [80 * GiB, 3 * GiB], "util": [37, 12], "temp": 54,
    "power_mw": 245000, "limit_mw": 700000, "sm_mhz": 1980, "mem_mhz": 2619, "mode": 3,
    "persistence": 1, "ecc": [1, 1], "ecc_errors": 2, "throttle": 0x4 | 0x1,
    "processes": [[1, 512 * 1024**2]], "children_bytes": 256 * 1024**2,
}
NO_POWER_OR_ECC = {
    "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000001", "name": "NVIDIA GeForce RTX 3090",
    "bus": "00000000:65:00.0", "memory": [24 * GiB, 1 * GiB], "util": [0, 0], "temp": 41,
    "power_mw": 0, "limit_mw": 0, "sm_mhz": 210, "mem_mhz": 405, "mode": 0, "persistence": 0,
    "ecc": [0, 0], "ecc_errors": 0, "throttle": 0, "unsupported": ["power", "ecc"], "processes": [],
}
LOST = {"uuid": "GPU-dead", "name": "NVIDIA A100", "lost": True}


def write(path, gpus=(HEALTHY_H100, NO_POWER_OR_ECC, LOST), init_error=None, **extra):
    """Atomically: the fake reads the file again at every sample, also while a test rewrites it."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(json.dumps({"init_error": init_error, "driver": "550.54.15", "cuda": 12040,
                                  "gpus": list(gpus), **extra}))
    staged.replace(path)
    return path


FAKE_NVML = Path(__file__).resolve().parent / "fakes" / "nvml"


def env(tmp_path, **extra) -> dict:
    """An orchestrator environment with NVML on and the fake pynvml, on the default host, first on PYTHONPATH."""
    return {"ENABLE_NVML": "true", "PYTHONPATH": str(FAKE_NVML),
            "FAKE_NVML_CONFIG": str(write(tmp_path / "nvml.json")), **extra}
