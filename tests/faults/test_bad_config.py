"""Malformed model maps and allocation files: always one line and exit 78, never a traceback."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SOAK, Orchestrator, wait_for, write_config

from gpu_orchestrator.loaders import channel
from gpu_orchestrator.supervisor.config import ConfigError, load_config

JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                       max_leaves=12)
FILES = st.one_of(st.binary(max_size=200), JSONISH.map(lambda v: json.dumps(v).encode()))
BAD_MODEL = st.one_of(st.integers(), st.none(), st.just(""), st.just("/abs/path"), st.just("a/../b"),
                      st.just("a//b"), st.lists(st.text(max_size=3), max_size=2))
BAD_LIMIT = st.one_of(st.floats(max_value=0), st.integers(max_value=0), st.text(max_size=5), st.none())


def attempt(tmp: Path, model_map: bytes, allocation: bytes | None):
    (tmp / "store").mkdir(exist_ok=True)
    (tmp / "map.json").write_bytes(model_map)
    env = {"MODEL_STORE_ROOT": str(tmp / "store"), "AGENT_MODEL_MAP": str(tmp / "map.json")}
    if allocation is not None:
        (tmp / "alloc.json").write_bytes(allocation)
        env["MPS_ALLOCATION_CONFIG"] = str(tmp / "alloc.json")
    return load_config(env)


def refused(tmp: Path, model_map: bytes, allocation: bytes | None) -> str | None:
    try:
        attempt(tmp, model_map, allocation)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message
        return message
    return None


@settings(max_examples=1000 if SOAK else 250, deadline=None)
@given(model_map=FILES, allocation=st.none() | FILES)
def test_anything_is_accepted_or_refused_in_one_line(model_map, allocation):
    with tempfile.TemporaryDirectory() as tmp:
        refused(Path(tmp), model_map, allocation)  # any other exception fails the test


@settings(max_examples=500 if SOAK else 150, deadline=None)
@given(client=st.text(min_size=1, max_size=8).filter(lambda c: "/" not in c and c not in (".", "..") and c.isprintable()),
       bad_model=BAD_MODEL, bad_limit=BAD_LIMIT, which=st.sampled_from(["model", "limit", "unknown-client"]))
def test_known_bad_documents_are_always_refused(client, bad_model, bad_limit, which):
    model_map = {client: ["org/good"]}
    allocations = {client: {"mps_memory_limit_gb": 1.0}}
    if which == "model":
        model_map[client] = ["org/good", bad_model]
    elif which == "limit":
        allocations[client] = {"mps_memory_limit_gb": bad_limit}
    else:
        allocations[client + "-ghost"] = {"mps_memory_limit_gb": 1.0}
    document = {"mps_resource_allocation": {"agent_allocations": allocations}}
    with tempfile.TemporaryDirectory() as tmp:
        assert refused(Path(tmp), json.dumps(model_map).encode(), json.dumps(document).encode()) is not None


@settings(max_examples=40 if SOAK else 12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_map=FILES)
def test_cli_exits_78_with_one_line_and_starts_nothing(tmp_path, model_map):
    if refused(tmp_path, model_map, None) is None:
        return  # hypothesis found a valid map; only refusals are under test here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORCHESTRATOR_", "MPS_", "ENABLE_"))}
    proc = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port", "0",
                             "--model-store", str(tmp_path / "store"), "--model-map", str(tmp_path / "map.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 78
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    # Only what this run would have made: another orchestrator may be running on the host.
    assert "loader" not in stderr and channel.segments_of(proc.pid) == []


def test_files_that_overflow_mislead_or_block_are_refused_on_sighup_and_the_running_state_kept(tmp_path, store):
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"]}, {"alpha": {"mps_memory_limit_gb": 1.0}})
    good_allocation = allocation.read_text()
    def fifo_for_map():  # no writer will ever come: a blocking open or read would hang the loop
        model_map.unlink()
        os.mkfifo(model_map)

    breakages = [  # (the files written, what the refusal names)
        ({allocation: json.dumps({"mps_resource_allocation": {"agent_allocations": {"alpha": {"mps_memory_limit_gb": 1e308}}}})},
         "mps_memory_limit_gb: must be at most 4096 GB (no GPU has more), got 1e+308"),
        ({allocation: good_allocation, model_map: '{"alpha": ["org/a1"], "--help": ["org/a1"]}'},
         "client name '--help' starts with '-'"),
        ({model_map: '{"alpha": ["org/a1"], "alpha": ["org/a2"]}'}, 'key \\"alpha\\" is given twice'),
        (fifo_for_map, "it is a FIFO, not a regular file"),
    ]
    with Orchestrator(tmp_path, store, model_map, allocation) as orch:
        before = orch.wait_settled()
        assert before["all_ready"]
        for count, (breakage, refusal) in enumerate(breakages, 1):
            if callable(breakage):
                breakage()
            else:
                for path, text in breakage.items():
                    path.write_text(text)
            os.kill(orch.proc.pid, signal.SIGHUP)
            wait_for(lambda: orch.output().count("reload refused; the running configuration stays") == count,
                     what=f"refusal {count} logged")
            assert refusal in [line for line in orch.output().splitlines() if "reload refused" in line][-1]
            kept = orch.status()
            assert kept["all_ready"] and kept["clients"]["alpha"]["pid"] == before["clients"]["alpha"]["pid"]
            assert kept["clients"]["alpha"]["memory_limit_bytes"] == 2**30
        assert orch.stop() == 0
