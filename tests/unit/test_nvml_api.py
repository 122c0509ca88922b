"""The NVML names the supervisor uses exist in the installed nvidia-ml-py (tests use a fake
pynvml, so this is what holds pyproject.toml's lower bound to the real module)."""

import os
import re
import subprocess
import sys
from pathlib import Path

SUPERVISOR = Path(__file__).resolve().parents[2] / "supervisor"
NAME = re.compile(r"\b(nvml[A-Z]\w+|NVML_[A-Z0-9_]*[A-Z0-9])\b")  # not the prefix "NVML_ERROR_" itself
# Importing pynvml loads no library (nvmlInit does): this runs on any machine.
MISSING = "import pynvml, sys; print(pynvml.__file__); print(' '.join(n for n in sys.argv[1:] if not hasattr(pynvml, n)))"


def test_every_nvml_function_and_constant_the_supervisor_names_exists_in_pynvml():
    used = sorted({name for source in SUPERVISOR.glob("*.py") for name in NAME.findall(source.read_text())})
    assert {"nvmlInit", "nvmlDeviceGetComputeRunningProcesses"} <= set(used)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the real module, never the fake
    origin, missing = subprocess.run([sys.executable, "-c", MISSING, *used], env=env, cwd="/", check=True,
                                     capture_output=True, text=True).stdout.splitlines()
    assert "fakes" not in origin and missing == "", f"{origin} lacks {missing}"
