"""The field's allocation file served for real: every key back as given, the summary
recomputed under the field's names, and its over-commit warned about in the log."""

import json
from pathlib import Path

from support import Orchestrator, wait_for

FIELD_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "mps_allocation_config.field.json"


def test_the_fields_file_is_served_key_for_key_and_its_overcommit_is_warned(tmp_path, store):
    given = json.loads(FIELD_FILE.read_text())
    model_map = tmp_path / "AGENT_MODEL_MAP.json"
    model_map.write_text(json.dumps({agent: [] for agent in given["mps_resource_allocation"]["agent_allocations"]}))
    allocation = tmp_path / "mps_allocation_config.json"
    allocation.write_text(FIELD_FILE.read_text())
    with Orchestrator(tmp_path, store, model_map, allocation, extra_args=("--no-preload",)) as orch:
        code, body = orch.get("/mps/allocation")
        assert code == 200 and body["source"] == str(allocation)
        served, stored = body["mps_resource_allocation"], given["mps_resource_allocation"]
        assert list(served) == list(stored)
        assert {k: v for k, v in served.items() if k != "system_summary"} == \
            {k: v for k, v in stored.items() if k != "system_summary"}
        summary = served["system_summary"]
        assert list(summary)[:8] == list(stored["system_summary"])  # the field's keys, in the field's order
        assert summary["total_calculated_memory_gb"] == 18.0 != stored["system_summary"]["total_calculated_memory_gb"]
        assert (summary["overcommitted"], summary["overcommit_gb"], summary["gpu_memory_total_source"]) == \
            (True, 0.8, "available_memory_gb")
        warning = wait_for(lambda: [line for line in orch.output().splitlines() if "over-commit" in line],
                           what="the over-commit warning")
        assert "limits_gb=24.3" in warning[0] and "gpu_gb=23.5" in warning[0] and "over_gb=0.8" in warning[0]
        assert orch.get("/gpu/info")[1]["mps"]["allocation_overcommitted"] is True
        assert orch.stop() == 0
