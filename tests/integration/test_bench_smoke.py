"""The benchmark runs (its figures are not judged here: timing belongs in scripts/bench)."""

import shutil
import subprocess
import sys
from pathlib import Path

from gpu_orchestrator.supervisor.commands import loadgen

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_prints_every_row(tmp_path):
    bin_dir = Path(sys.executable).parent
    path = f"{bin_dir}:/usr/bin:/bin"
    result = subprocess.run([str(REPO / "scripts" / "bench"), "--smoke", "--output", str(tmp_path / "B.md")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"PATH": path})
    assert result.returncode == 0, result.stderr[-2000:]
    generators = ["python, 4 connections"] + (["wrk -t1 -c8"] if shutil.which("wrk", path=path) else [])
    for route in ("/models/status (", "/gpu/info (", "/ready ("):
        for generator in generators:
            line = next((line for line in result.stdout.splitlines() if route in line and generator in line), None)
            assert line is not None, (route, generator)
            assert line.count(" page faults a request") == 2 and "x CPU a request" in line, line  # ours, the ceiling's
    for row in ("channel: publish", "supervisor start -> all_ready", "idle", "boot to ready", "warm-up",
                "sha256 verified", "loader SIGKILL", "supervisor start -> HTTP listening"):
        assert row in result.stdout, row
    # The boot row names its floor beside cat, and the heartbeat row what it measures.
    boot = next(line for line in result.stdout.splitlines() if "start -> all_ready" in line and "boot to ready" in line)
    assert "bare interpreters started at once, the floor of a process per client:" in boot, boot
    assert "loader heartbeat -> its age in /models/status" in result.stdout
    assert not (tmp_path / "B.md").exists()  # smoke runs never overwrite published figures


def test_without_wrk_the_python_generator_alone_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no wrk on PATH
    assert loadgen.generators() == ["python"]
