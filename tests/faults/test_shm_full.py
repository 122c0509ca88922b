"""A full /dev/shm: one line naming /dev/shm and the size, a plain exit status, never SIGBUS.

The supervisor runs in a private mount namespace whose /dev/shm is a 16 KiB tmpfs,
so the host's /dev/shm is never touched. That needs root (or CAP_SYS_ADMIN) for
`unshare -m` and `mount`; where they are refused the test skips and says so.
"""

import shutil
import subprocess
import sys

import pytest
from support import add_model, write_config

NAMESPACE = ["unshare", "--mount", "--propagation", "private"]


def private_shm_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*NAMESPACE, "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /dev/shm"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not private_shm_works(), reason="needs unshare --mount and mount (root): "
                                                    "cannot give the test a private, tiny /dev/shm")
def test_full_dev_shm_is_a_one_line_error_and_exit_71(tmp_path, record):
    store = tmp_path / "store"
    add_model(store, "org/small")
    model_map, _ = write_config(tmp_path, {"alpha": ["org/small"]})
    serve = [sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port", "0",
             "--model-store", str(store), "--model-map", str(model_map)]
    script = 'mount -t tmpfs -o size=16k tmpfs /dev/shm && exec "$@"'
    result = subprocess.run([*NAMESPACE, "sh", "-c", script, "sh", *serve],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 71, result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "/dev/shm" in errors[0] and "-byte shared-memory segment" in errors[0]
    assert "loader started" not in result.stderr
    record("full /dev/shm", exit_status=result.returncode, error=errors[0].split("error=", 1)[-1][:160])
