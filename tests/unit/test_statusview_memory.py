"""The `status` view of GPU memory NVML cannot report: "-" and an unknown over-limit state, never 0."""

from gpu_orchestrator.supervisor.commands.statusview import Style, client_lines, render_client

CLIENT = {"state": "RUNNING", "ready": False, "heartbeat_age_s": None, "pid": 10, "restarts": 0, "models": [], "gpu_memory_bytes": None, "rss_bytes": None,
          "memory_limit_bytes": 1024**3, "in_progress": False, "progress": None, "error": None, "last_exit": None}
STATUS = {"all_ready": False, "in_progress": False, "generation": 1, "errors": [],
          "summary": {"total": 0, "done": 0, "failed": 0}, "clients": {"alpha": CLIENT}}
INFO = {"mps": {"enabled": True}, "clients": {"alpha": {
    "gpu_memory_bytes": None, "gpus": {"0": None}, "memory_limit_bytes": 1024**3, "over_limit": None,
    "over_limit_gpus": [], "processes": [{"pid": 10, "gpu": 0, "role": "loader", "used_memory_bytes": None}]}}}


def test_unknown_gpu_memory_is_a_dash_and_its_over_limit_state_unknown():
    style = Style(120, False)
    row = client_lines(style, STATUS, INFO)[1]
    assert row.split()[:6] == ["alpha", "RUNNING", "10", "0", "0/0", "-?"]
    detail = render_client("http://x", "alpha", STATUS, INFO, style)
    assert "GPU memory - (GPU 0: -)" in detail and "Over its limit: unknown" in detail and "0 MiB" not in detail
