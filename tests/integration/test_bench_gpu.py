"""`gpu-orchestrator bench-gpu`: without a GPU it says so; with --cpu its steps all run and every
row is measured (the figures themselves belong to a GPU host's BENCHMARKS.md, not to a test)."""

import re
import subprocess
import sys

import pytest
from support import add_model

pytest.importorskip("torch", reason="bench-gpu needs the [torch] extra")


def bench_gpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "bench-gpu", *args],
                          capture_output=True, text=True, timeout=120)


def test_without_a_gpu_it_measures_nothing_and_says_so():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    result = bench_gpu("--repeat", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no GPU: torch sees no CUDA device")


def test_every_step_runs_on_the_cpu_and_each_row_is_measured(tmp_path):
    snapshot = add_model(tmp_path / "store", "org/small")
    output = tmp_path / "table.md"
    result = bench_gpu("--cpu", "--no-cold", "--repeat", "1", "--generated-shape", "64,1,100",
                       "--model-dir", str(snapshot), "--output", str(output))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2 * 5, result.stdout  # two snapshots: the pinned copy and four steps each
    for row in rows:
        seconds, rate = re.fullmatch(r"\| .+ \| [\d.]+ MiB \| ([\d.e+-]+) \| ([\d.e+-]+) \| [\d.]+x \|", row).groups()
        assert float(seconds) > 0 and float(rate) > 0, row
    assert "small, hot cache: torch backend: check and read every file, weights onto the GPU" in result.stdout
    assert output.read_text() == result.stdout.rstrip("\n") + "\n"


def test_a_bad_shape_is_a_usage_error():
    result = bench_gpu("--cpu", "--generated-shape", "64,1")
    assert result.returncode == 2 and "--generated-shape wants three positive integers" in result.stderr
