import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_without_a_gpu_says_so_and_succeeds():
    from gpu_orchestrator.supervisor import nvml
    if nvml.nvml()[0] is not None:
        pytest.skip("this host has a working NVML: gpu-check exercises the real GPU here instead")
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run([str(REPO / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no GPU: ")


# The real pynvml, with an nvmlInit that fails as NVML_INIT_ERROR names: a driver as a host may have it.
FAILING_PYNVML = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("real_pynvml", os.environ["REAL_PYNVML"])
real = sys.modules["real_pynvml"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(real)
globals().update({name: value for name, value in vars(real).items() if not name.startswith("__")})

def nvmlInit():
    raise NVMLError(getattr(real, os.environ["NVML_INIT_ERROR"]))
"""


@pytest.mark.parametrize("error, code, says", [
    ("NVML_ERROR_LIBRARY_NOT_FOUND", 0, "no GPU: NVML library not found"),
    ("NVML_ERROR_DRIVER_NOT_LOADED", 0, "no GPU: NVIDIA driver not loaded"),
    ("NVML_ERROR_LIB_RM_VERSION_MISMATCH", 1, "as after a driver upgrade: reboot"),
    ("NVML_ERROR_NO_PERMISSION", 1, "may not open /dev/nvidiactl"),
    ("NVML_ERROR_UNKNOWN", 1, "dmesg"),
])
def test_only_a_missing_driver_is_no_gpu_a_broken_one_fails(tmp_path, error, code, says):
    """A driver upgraded without a reboot, or devices this user may not open, is not a host without
    a GPU: gpu-check must fail there saying what to do, not pass as if there were nothing to check."""
    (tmp_path / "pynvml.py").write_text(FAILING_PYNVML)
    real = importlib.util.find_spec("pynvml").origin
    assert "fakes" not in real
    bin_dir = str(Path(sys.executable).parent)
    result = subprocess.run([str(REPO / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(tmp_path),
                                 "REAL_PYNVML": real, "NVML_INIT_ERROR": error})
    assert result.returncode == code, result.stdout + result.stderr
    assert says in result.stdout
    if code:
        assert result.stdout.startswith(f"NVML: UNEXPECTED: NVML does not start ({error}: ")
        assert "no GPU" not in result.stdout


def test_a_driver_that_sees_no_gpu_is_no_gpu(tmp_path):
    import nvml_hosts
    bin_dir = str(Path(sys.executable).parent)
    env = {**nvml_hosts.env(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    nvml_hosts.write(Path(env["FAKE_NVML_CONFIG"]), gpus=())
    result = subprocess.run([str(REPO / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=300,
                            env=env)
    assert (result.returncode, result.stdout) == (0, "no GPU: NVML sees none (driver 550.54.15)\n"), result.stderr


def test_gpu_check_drives_the_product_on_fake_nvml_and_mps(tmp_path):
    """Everything gpu-check does beside CUDA itself, on the fake NVML host (3 GPUs, one lost) and
    the fake control daemon: the CUDA steps must fail saying why, never pass for the wrong reason."""
    import nvml_hosts
    fakes = REPO / "tests" / "fakes" / "bin"
    bin_dir = str(Path(sys.executable).parent)
    env = {**nvml_hosts.env(tmp_path), "PATH": f"{fakes}:{bin_dir}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "0,1,2",
           "TMPDIR": str(tmp_path)}
    result = subprocess.run([str(REPO / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=300,
                            env=env)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "GPU 0: NVIDIA H100 80GB HBM3, 81920 MiB total" in out and "GPU 2: " in out
    assert "MPS: control daemon pid" in out
    # No libcuda here: no context under any limit, then each step still runs and says so.
    assert "MPS: UNEXPECTED: no CUDA context could be created under a 4096 MiB pinned limit" in out
    assert "allocating 256 MiB: " in out and "UNEXPECTED, wanted CUDA_SUCCESS" in out
    assert "allocating 1024 MiB: " in out and "UNEXPECTED, wanted CUDA_ERROR_OUT_OF_MEMORY" in out
    torch = importlib.util.find_spec("torch") is not None
    if torch:  # torch on the CPU here: the limit checks must not count as the GPU path working
        # The generated snapshot's 154 MiB: fits under 1024 MiB, refused (would be) under half of it.
        assert "under a 1024 MiB limit on cpu: " in out and "under a 77 MiB limit on cpu: " in out
        assert out.count("MiB limit on cpu: ") == out.count("(UNEXPECTED)") == 2
        assert "UNEXPECTED: the torch backend put the weights on {'cpu'}" in out
    assert f"orchestrator: serve with ENABLE_NVML=true, ENABLE_MPS=true, backend {'torch' if torch else 'default'}" in out
    for line in ("ok: all_ready after the warm-up",
                 "ok: the loader's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT is 0=1024M,1=1024M,2=1024M",
                 "ok: /gpu/info: 3 GPU(s), driver 550.54.15, CUDA 12.4",
                 "ok: MPS: control daemon", "ok: /mps/allocation judged on NVML", "ok: /metrics: ",
                 "ok: SIGTERM: exit status 0", "ok: the MPS control pipe is gone after shutdown (left there: [])"):
        assert line in out, out
    assert f"gpu-check: {6 if torch else 3} unexpected result(s)" in out
    assert not list(tmp_path.glob("gpu-check-*")), "gpu-check left its folders behind"


def test_the_context_cost_is_bisected_and_the_limits_are_set_from_it(monkeypatch):
    """On an H200 a bare context did not fit under 512 MiB: the limits must come from the
    measured cost, never from a guess. Here a client 'fits' from 530 MiB up."""
    from gpu_orchestrator.supervisor.commands import gpucheck
    asked = []

    def client(settings, limit, *args):
        asked.append(limit)
        return {"ok": limit >= 530}

    monkeypatch.setattr(gpucheck, "run_client", client)
    assert gpucheck.context_cost(None) == 544  # 512 refused, 544 accepted: to 32 MiB
    assert asked[0] == gpucheck.CONTEXT_PROBE_MAX_MIB and len(asked) <= 8
    monkeypatch.setattr(gpucheck, "run_client", lambda *a: {"ok": False, "result": "no libcuda"})
    assert gpucheck.context_cost(None) is None
