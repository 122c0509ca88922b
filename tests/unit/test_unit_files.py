"""What the shipped systemd units say, read as systemd reads them (systemd-analyze verify, which
checks only the syntax, is in tests/integration/test_systemd.py), and the Grafana dashboard's panels
that mix series."""

import json
import os
from pathlib import Path

from support import unit_sections

from gpu_orchestrator.supervisor.commands import clientenv, gate

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "scripts" / "systemd"
DASHBOARD = REPO / "scripts" / "grafana" / "gpu-orchestrator.json"
GPU_UNITS = ("gpu-orchestrator.service", "gpu-client@.service", "gpu-gate.conf")
TRUE = {"1", "yes", "y", "true", "t", "on"}  # systemd's parse_boolean()


def sections(name: str) -> dict[str, dict[str, list[str]]]:
    return unit_sections(UNITS / name)


def last(values: list[str] | None) -> str | None:
    return values[-1] if values else None


def test_no_unit_closes_the_device_policy():
    """Any DeviceAllow= makes the device list an allow-list; ProtectClock= adds one (char-rtc) on a
    systemd without the fix for issue #18142; PrivateDevices= and DevicePolicy=closed/strict close
    it outright: then /dev/nvidiactl, /dev/nvidia-uvm and /dev/nvidiaN fail with EPERM, and NVML,
    MPS and CUDA with them."""
    for name in GPU_UNITS:
        service = sections(name).get("Service", {})
        for option in ("ProtectClock", "PrivateDevices"):
            value = last(service.get(option)) or "no"
            assert value.lower() not in TRUE, f"{name}: {option}= closes the device policy"
        assert last(service.get("DevicePolicy")) in (None, "auto"), f"{name}: DevicePolicy= closes it"
        allowed = " ".join(service.get("DeviceAllow", []))
        if allowed:  # an allow-list is only safe when it names the NVIDIA devices itself
            for device in ("char-nvidia-frontend", "char-nvidia-uvm"):
                assert device in allowed, f"{name}: DeviceAllow= without {device}"


def test_the_gpu_services_run_as_the_orchestrators_user():
    """MPS servers are per user: a client of another uid waits until the running server's clients
    (the loaders) are done, so the GPU service must run as the user the orchestrator runs as."""
    orchestrator = sections("gpu-orchestrator.service")["Service"]
    client = sections("gpu-client@.service")["Service"]
    assert orchestrator["User"] == ["gpu-orchestrator"]
    for key in ("User", "Group", "SupplementaryGroups"):
        assert client.get(key) == orchestrator[key], key


def test_the_gpu_services_stop_and_restart_with_the_orchestrator():
    """A restart of the orchestrator quits the MPS daemon, which takes its clients with it."""
    for name in ("gpu-client@.service", "gpu-gate.conf"):
        unit = sections(name)["Unit"]
        assert unit.get("PartOf") == ["gpu-orchestrator.service"], name
        assert "gpu-orchestrator.service" in " ".join(unit.get("After", [])), name  # stop before it, start after


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return float(value[: -len(suffix)]) * factor
    return float(value)


def test_the_gpu_client_unit_retries_what_can_pass_and_only_that():
    """systemd's defaults (100 ms apart, 5 starts in 10 s) would spend the start limit within a
    second of exec's exit 75 (the MPS daemon briefly down): the unit sets its own, and never retries
    the statuses a retry cannot change."""
    unit = sections("gpu-client@.service")
    service = unit["Service"]
    assert last(service["Restart"]) == "on-failure"
    pause = seconds(last(service["RestartSec"]))
    interval, burst = seconds(last(unit["Unit"]["StartLimitIntervalSec"])), int(last(unit["Unit"]["StartLimitBurst"]))
    assert pause >= 5, "RestartSec= too short to let the MPS daemon or the orchestrator come back"
    assert burst * pause >= 60, "the start limit gives up within a minute of continuous failures"
    assert interval >= burst * pause, "a failing loop never reaches the start limit"
    never = {int(status) for value in service["RestartPreventExitStatus"] for status in value.split()}
    # exec's own statuses: an unknown client, a bad configuration, a command that cannot run.
    assert {gate.NO_SUCH_CLIENT, os.EX_NOUSER, os.EX_CONFIG, clientenv.EX_NOT_FOUND} <= never
    # ...and those that pass once the orchestrator or its MPS daemon is back must stay retried.
    assert never.isdisjoint({1, os.EX_UNAVAILABLE, os.EX_TEMPFAIL})


def test_the_gpu_services_do_not_read_the_orchestrators_environment_file():
    """It may hold GPU_ORCHESTRATOR_TOKEN, which would then be in every GPU service's environment;
    the host and port are set for them on their own, as each unit shows."""
    for name in ("gpu-client@.service", "gpu-gate.conf"):
        assert "EnvironmentFile" not in sections(name)["Service"], name
        text = (UNITS / name).read_text()
        assert "#   Environment=GPU_ORCHESTRATOR_HOST=127.0.0.1 GPU_ORCHESTRATOR_PORT=" in text, name


def panel(panel_id: int) -> dict:
    (found,) = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["id"] == panel_id]
    return found


def overrides_by_ref(found: dict) -> dict[str, dict]:
    return {o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
            for o in found["fieldConfig"]["overrides"] if o["matcher"]["id"] == "byFrameRefID"}


def test_dashboard_panels_with_two_queries_tell_them_apart():
    # "Orchestrator process": CPU in cores (~0.003) and RSS in bytes (~6e7), each its unit and axis.
    process = overrides_by_ref(panel(17))
    assert {ref: o["unit"] for ref, o in process.items()} == {"A": "percentunit", "B": "bytes"}
    assert process["A"]["custom.axisPlacement"] != process["B"]["custom.axisPlacement"]
    # "Hosts ready": two numbers, each with its name shown.
    hosts = panel(2)
    assert hosts["options"]["textMode"] == "value_and_name"
    assert {ref: o["displayName"] for ref, o in overrides_by_ref(hosts).items()} == {"A": "ready", "B": "reporting"}
    # "Models": the readiness and the size of a model on one row, joined on the labels both
    # queries keep (aggregated by them, so __name__, which differs, is not one of them).
    models = panel(11)
    assert [t["id"] for t in models["transformations"]][0] == "merge"
    for target in models["targets"]:
        assert target["expr"].startswith("max by (instance, client, model) ("), target["expr"]
    renamed = models["transformations"][1]["options"]["renameByName"]
    assert renamed == {"Value #A": "ready", "Value #B": "size"}
