"""The fault suite: each test injects a fault for real and records what held.

GPU_ORCHESTRATOR_SOAK=1 runs the long variants (more kills, longer stress and load).
Figures go to stdout (run with -s) and to $FAULT_FIGURES (JSON lines) when set.
"""

import pytest
from support import write_figures


@pytest.fixture
def record():
    return write_figures
