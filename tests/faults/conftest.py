"""The fault suite: each test injects a fault for real and records what held.

GPU_ORCHESTRATOR_SOAK=1 runs the long variants (more kills, longer stress and load).
Figures go to stdout (run with -s) and to $FAULT_FIGURES (JSON lines) when set.
"""

import json
import os

import pytest


@pytest.fixture
def record():
    def write(fault: str, **figures):
        line = json.dumps({"fault": fault, **figures})
        print(f"\nFIGURES {line}")
        if os.environ.get("FAULT_FIGURES"):
            with open(os.environ["FAULT_FIGURES"], "a") as out:
                out.write(line + "\n")
    return write
