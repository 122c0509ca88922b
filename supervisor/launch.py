"""How a loader and a client's service are launched: the loader's arguments (one LoaderArgs), and
the environment each carries (its client's name, GPUs and MPS limits)."""

import os
import re

from gpu_orchestrator.loaders.wire import LoaderArgs, encode_args
from gpu_orchestrator.supervisor.clients import Policy
from gpu_orchestrator.supervisor.config import TOKEN_VARIABLE, Config
from gpu_orchestrator.supervisor.mps_control import CLIENT_MPS, MpsSettings, mps_env
from gpu_orchestrator.supervisor.telemetry import CLIENT_VARIABLE


def count_gpus() -> int:
    """The GPUs our loaders can see: CUDA_VISIBLE_DEVICES when we run under one (a unit that
    hands us two GPUs of eight), else the NVIDIA device nodes present; no NVML or subprocess needed."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        return sum(1 for name in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", name))
    except OSError:
        return 0


# NOTIFY_SOCKET: only the supervisor talks to systemd. GPU_ORCHESTRATOR_TOKEN: a secret a loader
# never uses, which /proc/PID/environ would show to anyone allowed to read the loader's.
WITHHELD_FROM_LOADERS = {"NOTIFY_SOCKET", TOKEN_VARIABLE, *CLIENT_MPS}


def loader_env(config: Config, client: str, mps: MpsSettings | None, gpu_count: int) -> dict[str, str]:
    """The loader's environment: ours, less what is not its business, plus its client's."""
    env = {k: v for k, v in os.environ.items() if k not in WITHHELD_FROM_LOADERS}
    return env | client_env(config, client, mps, gpu_count)


def client_env(config: Config, client: str, mps: MpsSettings | None, gpu_count: int) -> dict[str, str]:
    """What a client's processes (its loader, and its service through `gpu-orchestrator env` or
    `exec`) must carry: the client's name, its GPUs and, with `mps` (the daemon answers), its MPS
    folders and limits; without, none, even if our own environment had some."""
    env = {CLIENT_VARIABLE: client}
    allocation = config.allocations.get(client)
    if allocation is not None and allocation.devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in allocation.devices)
        # `devices` are NVML's indices (PCI bus order), which telemetry and the over-commit check
        # judge by; CUDA's own default order (fastest first) can differ on a host of mixed GPUs.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    elif "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]  # unpinned: what we see
    if mps is None:
        return env
    env.update(mps_env(mps))
    if allocation is not None:
        # Ordinals as the client sees them: CUDA_VISIBLE_DEVICES renumbers from 0.
        ordinals = range(len(allocation.devices)) if allocation.devices else range(max(gpu_count, 1))
        env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(f"{o}={allocation.limit_mib}M" for o in ordinals)
        if allocation.active_thread_percentage is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(allocation.active_thread_percentage)
    return env


def loader_argv(config: Config, client: str, segment: str, slot: int, policy: Policy) -> list[str]:
    """The loader's command line: its LoaderArgs, as wire.encode_args writes them."""
    allocation = config.allocations.get(client)
    return encode_args(LoaderArgs(
        client=client, segment=segment, slot=slot, store_root=config.model_store_root,
        heartbeat_interval=policy.heartbeat_interval, models=list(config.clients[client]),
        base_model_dir=config.base_model_dir or None, strict=config.strict_model_store,
        hf_hub=None if config.strict_model_store else config.hf_hub or None,
        memory_limit_bytes=config.memory_limit_bytes(client), backend=config.backend_for(client),
        warmup_inference=allocation is not None and allocation.warmup))
