"""`gpu-orchestrator gpu-check`: the real NVML and MPS paths on a host with an NVIDIA GPU.

It prints what it saw: the GPUs through NVML, a real nvidia-cuda-mps-control
started on private pipe and log folders (the host's own daemon is not touched),
one CUDA client allocating under its pinned MPS limit and one allocating past it,
and what NVML and the daemon report meanwhile. Without a GPU it says "no GPU"
and exits 0. Exit 1 when a step that should work did not. With --model-dir (a
safetensors snapshot such as all-MiniLM-L6-v2) and torch installed, the torch
backend also loads it onto the GPU under a pinned limit that fits and one that does not.
"""

import ctypes
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile

from gpu_orchestrator.supervisor import mps, nvml

LIMIT_MIB = 512
UNDER_MIB = 256
OVER_MIB = 1024


def say(message: str) -> None:
    print(message, flush=True)


def allocate(mib: int) -> dict:
    """In a child process: CUDA driver API through ctypes (no framework), one allocation."""
    cuda = ctypes.CDLL("libcuda.so.1")

    def name(code: int) -> str:
        text = ctypes.c_char_p()
        cuda.cuGetErrorName(code, ctypes.byref(text))
        return (text.value or b"?").decode()

    def call(function, *args) -> None:
        code = getattr(cuda, function)(*args)
        if code != 0:
            raise RuntimeError(f"{function}: {name(code)}")

    call("cuInit", 0)
    device, context = ctypes.c_int(), ctypes.c_void_p()
    call("cuDeviceGet", ctypes.byref(device), 0)
    call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
    call("cuCtxSetCurrent", context)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
    pointer = ctypes.c_uint64()
    code = cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(mib * 1024 * 1024))
    return {"requested_mib": mib, "result": name(code), "ok": code == 0,
            "context_free_mib": free.value // 2**20, "context_total_mib": total.value // 2**20}


def torch_load(directory: str, limit_mib: int) -> dict:
    """In a child process: the torch backend on a snapshot, under a pinned MPS limit."""
    from gpu_orchestrator.loaders.backends import ModelError, plan
    from gpu_orchestrator.loaders.store import Snapshot
    from gpu_orchestrator.loaders.torch_backend import load_torch
    path = os.path.realpath(directory)
    snapshot = Snapshot(Path(path), Path(path), "local")
    try:
        result = load_torch(snapshot, plan(snapshot), 0, limit_mib * 2**20, warmup=True)
    except ModelError as exc:
        return {"ok": False, "result": str(exc)}
    return {"ok": True, "result": f"{result.memory_bytes // 2**20} MiB on {result.device}"
                                  + (f", embedding of {result.embedding_dim}" if result.embedding_dim else "")}


def run_client(settings: mps.MpsSettings, limit_mib: int, *child_args: str) -> dict:
    env = {**os.environ, **mps.mps_env(settings), "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={limit_mib}M"}
    result = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.gpucheck", *child_args],
                            capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        return {"ok": False, "result": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def show_gpus(module) -> None:
    say(f"driver {nvml.text(module.nvmlSystemGetDriverVersion())}, "
        f"CUDA driver {module.nvmlSystemGetCudaDriverVersion()}")
    for index in range(module.nvmlDeviceGetCount()):
        handle = module.nvmlDeviceGetHandleByIndex(index)
        memory = module.nvmlDeviceGetMemoryInfo(handle)
        mode = module.nvmlDeviceGetComputeMode(handle)
        say(f"GPU {index}: {nvml.text(module.nvmlDeviceGetName(handle))}, {memory.total // 2**20} MiB total, "
            f"{memory.used // 2**20} MiB used, compute mode {mode} (0 DEFAULT, 3 EXCLUSIVE_PROCESS)")


def show_processes(module) -> None:
    handle = module.nvmlDeviceGetHandleByIndex(0)
    for process in module.nvmlDeviceGetComputeRunningProcesses(handle):
        used = process.usedGpuMemory
        say(f"  NVML process pid {process.pid}: {'n/a' if used is None else used // 2**20} MiB")


def check(model_dir: str | None = None) -> int:
    """`model_dir`: a safetensors snapshot (e.g. all-MiniLM-L6-v2) for the torch backend, if torch imports."""
    module, error = nvml.nvml()
    if module is None:
        say(f"no GPU: {error}")
        return 0
    show_gpus(module)
    if shutil.which(mps.BINARY) is None:
        say(f"MPS: {mps.BINARY} is not on PATH; nothing more to check")
        return 1
    folder = tempfile.mkdtemp(prefix="gpu-check-mps-")
    os.chmod(folder, 0o755)
    settings = mps.MpsSettings(os.path.join(folder, "pipe"), os.path.join(folder, "log"))
    daemon = mps.MpsDaemon(settings)
    failures = 0
    try:
        if not daemon.start():
            say(f"MPS: the control daemon did not start: {daemon.report()['error']}")
            return 1
        say(f"MPS: control daemon pid {daemon.control_pid()} answering on {settings.pipe_dir}; "
            f"default active thread percentage {mps.query(settings, 'get_default_active_thread_percentage')}")
        for mib, should_work in ((UNDER_MIB, True), (OVER_MIB, False)):
            outcome = run_client(settings, LIMIT_MIB, "--allocate", str(mib))
            verdict = "as expected" if outcome["ok"] == should_work else "UNEXPECTED"
            failures += outcome["ok"] != should_work
            say(f"client with {LIMIT_MIB} MiB pinned limit allocating {mib} MiB: {outcome['result']} ({verdict}); "
                f"context sees {outcome.get('context_total_mib', '?')} MiB total")
        say(f"MPS servers: {mps.query(settings, 'get_server_list') or 'none'}")
        show_processes(module)
        if model_dir:
            for limit, should_work in ((1024, True), (32, False)):
                outcome = run_client(settings, limit, "--torch-load", model_dir, str(limit))
                failures += outcome["ok"] != should_work
                say(f"torch backend, {model_dir} under a {limit} MiB limit: {outcome['result']} "
                    f"({'as expected' if outcome['ok'] == should_work else 'UNEXPECTED'})")
    finally:
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)
    say("gpu-check: all as expected" if not failures else f"gpu-check: {failures} unexpected result(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--allocate"]:
        print(json.dumps(allocate(int(sys.argv[2]))))
    elif sys.argv[1:2] == ["--torch-load"]:
        print(json.dumps(torch_load(sys.argv[2], int(sys.argv[3]))))
    else:
        sys.exit(check())
