"""`gpu-orchestrator gpu-check`: the real NVML and MPS paths on a host with an NVIDIA GPU.

It prints what it saw, in two parts. First the pieces: the GPUs through NVML, a
real nvidia-cuda-mps-control started on private pipe and log folders (the host's
own daemon is not touched), what a bare CUDA context takes of a client's pinned
limit, one CUDA client allocating under its pinned MPS limit and one allocating
past it, and, where torch imports, the torch backend loading a generated snapshot
(or --model-dir, a real one such as all-MiniLM-L6-v2) onto the GPU under a pinned
limit that fits and one that does not. Then the product: a
real `gpu-orchestrator serve` with ENABLE_NVML and ENABLE_MPS on its own folders
and a free loopback port, warming a client up under its limit, its answers read
over HTTP, and a SIGTERM that must leave nothing behind.

Without a GPU (no NVIDIA driver or library, or none NVML sees) it says "no GPU" and exits 0.
Exit 1 when a step that should work did not, NVML's start on a broken driver included.
"""

import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from gpu_orchestrator.supervisor import mps, mps_control, nvml
from gpu_orchestrator.supervisor.commands import statusview
from gpu_orchestrator.supervisor.commands.demo import write_snapshot
from gpu_orchestrator.supervisor.commands.harness import Orchestrator, get_json, wait

# A client's pinned limit counts its CUDA context too (over 512 MiB on an H200 with driver 580):
# each limit below is the measured context cost plus what the step must fit, or must not.
UNDER_MIB = 256
OVER_MIB = 1024
HEADROOM_MIB = 512
CONTEXT_PROBE_MAX_MIB = 4096
CONTEXT_PROBE_STEP_MIB = 32


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
    from gpu_orchestrator.loaders.torch_backend import OverLimit, import_torch, load_torch
    path = os.path.realpath(directory)
    snapshot = Snapshot(Path(path), Path(path), "local")
    # Where the weights went matters as much as whether they fit: a limit failing on the CPU proves nothing.
    device = "cuda:0" if import_torch().cuda.is_available() else "cpu"
    try:
        result = load_torch(snapshot, plan(snapshot), 0, limit_mib * 2**20, warmup=True)
    except ModelError as exc:  # refused for its size only by the memory, not by a context that does not fit
        return {"ok": False, "device": device, "result": str(exc), "over_limit": isinstance(exc, OverLimit)}
    except Exception as exc:  # whatever else broke is reported, and is not the limit at work
        return {"ok": False, "device": device, "result": f"{type(exc).__name__}: {exc}", "over_limit": False}
    return {"ok": True, "device": result.device, "result": f"{result.memory_bytes // 2**20} MiB on {result.device}"
                                  + (f", embedding of {result.embedding_dim}" if result.embedding_dim else "")}


def context_cost(settings: mps_control.MpsSettings) -> int | None:
    """The smallest pinned limit (MiB, to CONTEXT_PROBE_STEP_MIB) under which a client creates its
    CUDA context and allocates 1 MiB, by bisection; None if not even under CONTEXT_PROBE_MAX_MIB."""
    def fits(limit: int) -> bool:
        return run_client(settings, limit, "--allocate", "1").get("ok", False)

    low, high = 0, CONTEXT_PROBE_MAX_MIB
    if not fits(high):
        return None
    while high - low > CONTEXT_PROBE_STEP_MIB:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def weight_mib(directory: str) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*.safetensors")) // 2**20


def run_client(settings: mps_control.MpsSettings, limit_mib: int, *child_args: str) -> dict:
    env = {**os.environ, **mps_control.mps_env(settings), "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={limit_mib}M"}
    result = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.gpucheck", *child_args],
                            capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        return {"ok": False, "result": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def show_gpus(module) -> None:
    say(f"driver {nvml.text(module.nvmlSystemGetDriverVersion())}, "
        f"CUDA driver {module.nvmlSystemGetCudaDriverVersion()}")
    for index in range(module.nvmlDeviceGetCount()):
        try:
            handle = module.nvmlDeviceGetHandleByIndex(index)
            memory = module.nvmlDeviceGetMemoryInfo(handle)
            mode = module.nvmlDeviceGetComputeMode(handle)
            name = nvml.text(module.nvmlDeviceGetName(handle))
        except module.NVMLError as exc:
            say(f"GPU {index}: {nvml.describe(exc)}")
            continue
        say(f"GPU {index}: {name}, {memory.total // 2**20} MiB total, "
            f"{memory.used // 2**20} MiB used, compute mode {mode} (0 DEFAULT, 3 EXCLUSIVE_PROCESS)")


def show_processes(module) -> None:
    for index in range(module.nvmlDeviceGetCount()):
        try:
            processes = module.nvmlDeviceGetComputeRunningProcesses(module.nvmlDeviceGetHandleByIndex(index))
        except module.NVMLError as exc:
            say(f"  GPU {index}: no process list: {nvml.describe(exc)}")
            continue
        for process in processes:
            used = process.usedGpuMemory
            say(f"  GPU {index} NVML process pid {process.pid}: {'n/a' if used is None else used // 2**20} MiB")


# What to do about the usual ways a driver that is there is broken (nvml.NO_GPU_ERRORS: none there).
INIT_FIXES = {
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": "the loaded nvidia kernel module is not the version of the installed "
    "driver libraries, as after a driver upgrade: reboot, or stop what uses the GPU and reload the module "
    "(cat /proc/driver/nvidia/version shows the loaded one)",
    "NVML_ERROR_NO_PERMISSION": "this user may not open /dev/nvidiactl and /dev/nvidia*: check their permissions "
    "(ls -l /dev/nvidia*) and, in a container, its device access (--gpus, the device cgroup)",
    "ImportError": "reinstall gpu-orchestrator into its venv (nvidia-ml-py is one of its dependencies)",
}
INIT_FIX_OTHER = "run nvidia-smi, and read what the kernel logged (dmesg | grep -i nvrm)"


def open_nvml():
    """(pynvml initialised, 0), or (None, the exit status) after saying why: 0 for a host without
    a GPU, 1 for a driver that is there but broken."""
    module, error = nvml.nvml()
    if module is None:
        failure = nvml.init_failure()
        if failure in nvml.NO_GPU_ERRORS:
            say(f"no GPU: {error}")
            return None, 0
        say(f"NVML: UNEXPECTED: NVML does not start ({failure or 'no error code'}: {error}): "
            f"{INIT_FIXES.get(failure, INIT_FIX_OTHER)}")
        say("gpu-check: the GPU is not checked: its driver does not work")
        return None, 1
    if module.nvmlDeviceGetCount() == 0:
        say(f"no GPU: NVML sees none (driver {nvml.text(module.nvmlSystemGetDriverVersion())})")
        return None, 0
    return module, 0


def check(model_dir: str | None = None) -> int:
    """`model_dir`: a real safetensors snapshot (e.g. all-MiniLM-L6-v2) to load as well."""
    module, code = open_nvml()
    if module is None:
        return code
    show_gpus(module)
    use_torch = importlib.util.find_spec("torch") is not None
    if not use_torch:
        say("torch does not import here: the torch backend is not checked (pip install 'gpu-orchestrator[torch]')")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.chmod(work, 0o755)  # MPS servers must reach the pipe folders inside
    try:
        # Big enough that a 32 MiB limit must refuse it: about 160 MiB of F16 weights.
        write_snapshot(work / "store" / "check" / "generated", (1024, 4, 30000), seed=1, manifest=True)
        torch_dir = model_dir or str(work / "store" / "check" / "generated")
        failures = 0
        with_mps = shutil.which(mps_control.BINARY) is not None
        if with_mps:
            failures += check_mps_clients(module, work / "mps", torch_dir if use_torch else None)
        else:
            say(f"MPS: {mps_control.BINARY} is not on PATH: the MPS checks are skipped and the orchestrator runs without MPS")
            failures += 1
        failures += check_orchestrator(work, model_dir, use_torch, with_mps, module.nvmlDeviceGetCount())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say("gpu-check: all as expected" if not failures else f"gpu-check: {failures} unexpected result(s)")
    return 1 if failures else 0


def check_mps_clients(module, folder: Path, torch_dir: str | None) -> int:
    """A real control daemon on private folders, CUDA clients under pinned limits; the number of surprises."""
    settings = mps_control.MpsSettings(str(folder / "pipe"), str(folder / "log"))
    daemon = mps.MpsDaemon(settings)
    failures = 0
    try:
        if not daemon.start():
            say(f"MPS: the control daemon did not start: {daemon.report()['error']}")
            return 1
        say(f"MPS: control daemon pid {daemon.control_pid()} answering on {settings.pipe_dir}; "
            f"default active thread percentage {mps_control.query(settings, 'get_default_active_thread_percentage')}")
        context = context_cost(settings)
        if context is None:  # the steps below still run, and say what they see
            say(f"MPS: UNEXPECTED: no CUDA context could be created under a {CONTEXT_PROBE_MAX_MIB} MiB pinned limit")
            failures, context = failures + 1, 0
        else:
            say(f"MPS: a CUDA context (with 1 MiB allocated) takes {context - CONTEXT_PROBE_STEP_MIB}-{context} MiB "
                "of a client's pinned limit (the smallest limit it is created under)")
        limit = context + HEADROOM_MIB
        # Over the limit must fail for the right reason: out of memory, not a missing library.
        for mib, expected in ((UNDER_MIB, "CUDA_SUCCESS"), (OVER_MIB, "CUDA_ERROR_OUT_OF_MEMORY")):
            outcome = run_client(settings, limit, "--allocate", str(mib))
            verdict = "as expected" if outcome["result"] == expected else f"UNEXPECTED, wanted {expected}"
            failures += outcome["result"] != expected
            say(f"client with {limit} MiB pinned limit allocating {mib} MiB: {outcome['result']} ({verdict}); "
                f"context sees {outcome.get('context_total_mib', '?')} MiB total")
        say(f"MPS servers: {mps_control.query(settings, 'get_server_list') or 'none'}")
        show_processes(module)
        if torch_dir:
            weights = weight_mib(torch_dir)
            # Fits: the context, the weights and the warm-up's own copy. Refused: half the weights short.
            fits, short = max(1024, context + 2 * weights + UNDER_MIB), context + weights // 2
            for limit, should_work in ((fits, True), (short, False)):
                outcome = run_client(settings, limit, "--torch-load", torch_dir, str(limit))
                # On the GPU, and refused by the limit rather than by anything else.
                worked = outcome["ok"] if should_work else outcome.get("over_limit", False)
                expected = worked and outcome.get("device", "").startswith("cuda")
                failures += not expected
                say(f"torch backend, {torch_dir} under a {limit} MiB limit on {outcome.get('device', '?')}: "
                    f"{outcome['result']} ({'as expected' if expected else 'UNEXPECTED'})")
    except mps_control.MpsError as exc:
        say(f"MPS: UNEXPECTED: {exc}")
        failures += 1
    finally:
        daemon.stop()
    return failures


CHECK_CLIENT = "gpu-check"
CHECK_LIMIT_GB = 1.0


def write_check_config(work: Path, model_dir: str | None, use_torch: bool) -> tuple[Path, Path]:
    """One client: the generated model already in the store, plus a copy of `model_dir` when given."""
    models = ["check/generated"]
    if model_dir:
        shutil.copytree(model_dir, work / "store" / "check" / "snapshot")  # links followed: the store refuses escapes
        models.append("check/snapshot")
    model_map = work / "AGENT_MODEL_MAP.json"
    model_map.write_text(json.dumps({CHECK_CLIENT: models}))
    allocation = {"mps_memory_limit_gb": CHECK_LIMIT_GB, **({"backend": "torch", "warmup": True} if use_torch else {})}
    allocation_path = work / "mps_allocation_config.json"
    allocation_path.write_text(json.dumps({"mps_resource_allocation": {"agent_allocations": {CHECK_CLIENT: allocation}}}))
    return model_map, allocation_path


def loader_limits(pid: int) -> str | None:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    found = [item.split(b"=", 1)[1].decode() for item in items if item.startswith(b"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=")]
    return found[0] if found else None


def check_orchestrator(work: Path, model_dir: str | None, use_torch: bool, with_mps: bool, gpu_count: int) -> int:
    """The product on this GPU: its NVML sampler, its own MPS daemon, a loader under its limit, a clean stop."""
    say(f"orchestrator: serve with ENABLE_NVML=true, ENABLE_MPS={str(with_mps).lower()}, "
        f"backend {'torch' if use_torch else 'default'}")
    pipe, log = work / "serve-mps-pipe", work / "orchestrator.log"
    failures = 0

    def expect(ok: bool, what: str) -> None:
        nonlocal failures
        failures += not ok
        say(f"  {'ok' if ok else 'UNEXPECTED'}: {what}")

    try:
        model_map, allocation = write_check_config(work, model_dir, use_torch)
        env = {"ENABLE_NVML": "true", "ENABLE_MPS": str(with_mps).lower(), "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
               "CUDA_MPS_LOG_DIRECTORY": str(work / "serve-mps-log")}
        orch = Orchestrator(work / "store", model_map, "--allocation", str(allocation), "--telemetry-interval", "1",
                            env=env, log=log)
        try:
            report_orchestrator(orch, expect, use_torch, with_mps, gpu_count)
        finally:
            code = orch.stop()
        expect(code == 0, f"SIGTERM: exit status {code}")
        if with_mps:
            left = sorted(os.listdir(pipe)) if pipe.exists() else []
            expect(mps.CONTROL_PIPE not in left, f"the MPS control pipe is gone after shutdown (left there: {left})")
    except Exception as exc:  # whatever broke, say it and show the orchestrator's log
        expect(False, f"{type(exc).__name__}: {exc}")
        for line in (log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []):
            say(f"    | {line}")
    return failures


def report_orchestrator(orch: Orchestrator, expect, use_torch: bool, with_mps: bool, gpu_count: int) -> None:
    status = orch.settled(300)
    client = status["clients"][CHECK_CLIENT]
    for model in client["models"]:
        parts = [model["status"], f"{model.get('parameters')} parameters", f"device {model.get('device')}"]
        if model.get("device_memory_bytes") is not None:
            parts.append(f"{model['device_memory_bytes'] // 2**20} MiB there")
        if model.get("embedding_dim"):
            parts.append(f"embedding of {model['embedding_dim']}")
        if model.get("error"):
            parts.append(f"error: {model['error']}")
        say(f"  {model['model']}: {', '.join(parts)}")
    expect(status["all_ready"], f"all_ready after the warm-up ({status['summary']})")
    if use_torch:
        devices = {m["device"] for m in client["models"]}
        expect(all(d and d.startswith("cuda") for d in devices), f"the torch backend put the weights on {devices}")
    expected_limit = ",".join(f"{i}={int(CHECK_LIMIT_GB * 1024)}M" for i in range(max(gpu_count, 1)))
    limit = loader_limits(client["pid"])
    expect(limit == (expected_limit if with_mps else None), f"the loader's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT is {limit}")
    info = wait(lambda: (i := get_json(orch.url + "/gpu/info"))["sampled_at"] and i, 60, "the first NVML sample")
    expect(info["available"] and len(info["gpus"]) == gpu_count,
           f"/gpu/info: {len(info['gpus'])} GPU(s), driver {info['driver_version']}, CUDA {info['cuda_driver_version']}")
    # What an operator's `gpu-orchestrator status` shows, then what it leaves out.
    for line in statusview.render(orch.url, status, info).splitlines():
        say(f"  | {line}")
    for gpu in info["gpus"]:
        if gpu["unsupported"]:
            say(f"  GPU {gpu['index']} does not report: {'; '.join(gpu['unsupported'])}")
        for process in gpu["processes"]:
            say(f"  GPU {gpu['index']} process {process['pid']}: {statusview.size(process['used_memory_bytes'])}, "
                f"client {process['client'] or '-'}, role {process['role'] or '-'}")
    report = info["mps"]
    if with_mps:
        expect(report["enabled"] and report["managed"] and report["error"] is None,
               f"MPS: control daemon {report['control_pid']} (managed {report['managed']}), "
               f"servers {report['servers']}, error {report['error']}")
    summary = get_json(orch.url + "/mps/allocation")["mps_resource_allocation"]["system_summary"]
    expect(summary.get("gpu_memory_total_source") == "nvml" and not summary["overcommitted"],
           f"/mps/allocation judged on NVML: per GPU {summary.get('per_gpu')}")
    with urllib.request.urlopen(orch.url + "/metrics", timeout=10) as response:
        metrics = [line for line in response.read().decode().splitlines() if line.startswith("gpu_orchestrator_gpu_")]
    expect(len(metrics) > 0, f"/metrics: {len(metrics)} GPU sample lines, e.g. {metrics[:2]}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--allocate"]:
        print(json.dumps(allocate(int(sys.argv[2]))))
    elif sys.argv[1:2] == ["--torch-load"]:
        print(json.dumps(torch_load(sys.argv[2], int(sys.argv[3]))))
    else:
        sys.exit(check())
