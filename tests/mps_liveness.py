"""Is a process really gone? A zombie nobody reaped yet counts as gone."""

from gpu_orchestrator.supervisor.mps import process_alive


def gone(pid: int) -> bool:
    return not process_alive(pid)
