"""The benchmark runs (its figures are not judged here: timing belongs in scripts/bench)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_smoke_prints_every_row(tmp_path):
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(REPO / "scripts" / "bench"), "--smoke", "--output", str(tmp_path / "B.md")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    for row in ("channel: publish", "GET /models/status", "GET /gpu/info", "warm-up", "sha256 verified",
                "idle", "loader SIGKILL", "supervisor start"):
        assert row in result.stdout, row
    assert not (tmp_path / "B.md").exists()  # smoke runs never overwrite published figures
