"""Every command of the operations doc, as written there, against a live orchestrator.

Only the port differs (tests listen on a free one). `watch -n1 CMD` is run as CMD
once; the commands that pipe into jq run through jq when it is installed and
are checked in Python otherwise.
"""

import json
import shutil
import subprocess

import pytest

# Copied verbatim from the operations doc ("GPU Orchestrator Operations (Port 8014)").
OPERATIONS = {
    "start warmup": """curl -s -X POST -H 'Content-Type: application/json' \\
 -d '{"refresh": false}' http://127.0.0.1:8014/models/preload""",
    "force rebuild": """curl -s -X POST -H 'Content-Type: application/json' \\
 -d '{"refresh": true}' http://127.0.0.1:8014/models/preload""",
    "watch status": "watch -n1 curl -s http://127.0.0.1:8014/models/status",
    "readiness summary": "curl -s http://127.0.0.1:8014/models/status | jq '{in_progress, all_ready, summary}'",
    "mps status": "curl -s http://127.0.0.1:8014/gpu/info | jq '{mps_enabled, mps}'",
    "mps allocation": "curl -s http://127.0.0.1:8014/mps/allocation | jq '.mps_resource_allocation.system_summary'",
}


def run(command: str, port: int) -> dict:
    command = command.replace("127.0.0.1:8014", f"127.0.0.1:{port}").removeprefix("watch -n1 ")
    curl, _, jq_filter = command.partition(" | jq ")
    if jq_filter and shutil.which("jq"):
        output = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True, timeout=30)
        return json.loads(output.stdout)
    output = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True, timeout=30)
    document = json.loads(output.stdout)
    if not jq_filter:
        return document
    if jq_filter.startswith("'{"):
        return {key.strip(): document[key.strip()] for key in jq_filter.strip("'{}").split(",")}
    for key in jq_filter.strip("'.").split("."):
        document = document[key]
    return document


@pytest.fixture(scope="module", autouse=True)
def needs_curl():
    if not shutil.which("curl"):
        pytest.fail("curl is required for the operations-doc tests (.ci/run installs it)")


def test_every_operations_command_works(orchestrator):
    port = orchestrator.port
    orchestrator.wait_settled()
    assert set(run(OPERATIONS["start warmup"], port)) >= {"in_progress", "summary", "errors", "all_ready"}
    rebuilt = run(OPERATIONS["force rebuild"], port)
    assert rebuilt["started"] is True
    assert set(run(OPERATIONS["watch status"], port)["summary"]) >= {"total", "done", "failed"}
    summary = run(OPERATIONS["readiness summary"], port)
    assert set(summary) == {"in_progress", "all_ready", "summary"}
    assert isinstance(summary["in_progress"], bool) and isinstance(summary["all_ready"], bool)
    mps = run(OPERATIONS["mps status"], port)
    assert mps["mps_enabled"] is False and mps["mps"]["enabled"] is False
    allocation = run(OPERATIONS["mps allocation"], port)
    assert allocation["total_agents"] == 2 and allocation["total_allocated_memory_gb"] == 1.5
