"""The shipped fleet files: alert rules through promtool, the dashboard's shape, and the Kubernetes
manifests against the Kubernetes schemas (kubernetes-validate) and against each other.
tests/integration/test_fleet.py runs them against live processes."""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "scripts" / "prometheus"
DASHBOARD = REPO / "scripts" / "grafana" / "gpu-orchestrator.json"
KUBERNETES = REPO / "scripts" / "kubernetes"
# internalTrafficPolicy (the Service) is GA from 1.26: every release from there that the package knows.
OLDEST_KUBERNETES = (1, 26)


def promtool(*args) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus package)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


def test_alert_rules_are_valid_and_pass_their_tests():
    checked = promtool("check", "rules", "gpu-orchestrator.rules.yml")
    assert checked.returncode == 0 and "SUCCESS: 12 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "gpu-orchestrator.rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_says_what_to_do_and_has_a_test():
    rules = (PROMETHEUS / "gpu-orchestrator.rules.yml").read_text()
    blocks = re.split(r"\n      - alert: ", rules)[1:]
    names = [block.split("\n", 1)[0] for block in blocks]
    assert len(names) == 12
    for name, block in zip(names, blocks):
        assert "summary:" in block and "description:" in block, name
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "gpu-orchestrator.rules.test.yml").read_text()))
    assert tested == set(names)


def test_dashboard_shape():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert [p["title"] for p in panels if p["type"] == "row"] == ["Fleet overview", "Per host", "Per GPU"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "client"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["description"] and panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Every query follows the Host variable, so one dashboard serves the fleet and each host.
            assert '"$instance"' in target["expr"], (panel["title"], target["expr"])


def manifests() -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (.ci/run installs it)")
    return [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def test_kubernetes_manifests_match_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate.utils",
                             reason="kubernetes-validate is not installed (.ci/run installs it)")
    versions = sorted({v.rsplit(".", 1)[0] for v in kv.all_versions()
                       if tuple(map(int, v.split(".")[:2])) >= OLDEST_KUBERNETES})
    docs = manifests()
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == ["ConfigMap", "DaemonSet", "Deployment", "Namespace", "Service", "ServiceMonitor"]
    for doc in docs:
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: the package has no schema for it; checked against the Service below
        for version in versions:
            kv.validate(doc, version, strict=True)  # strict: a misspelt field is an error
    # The validator does catch a misspelt field (it is not silently passing everything).
    daemonset = copy.deepcopy(next(d for d in docs if d["kind"] == "DaemonSet"))
    daemonset["spec"]["template"]["spec"]["nodeSelectr"] = daemonset["spec"]["template"]["spec"].pop("nodeSelector")
    with pytest.raises(kv.ValidationError, match="nodeSelectr"):
        kv.validate(daemonset, versions[-1], strict=True)
    assert versions[0] == "1.26" and len(versions) >= 12


def test_kubernetes_manifests_agree_with_each_other():
    docs = {doc["kind"]: doc for doc in manifests()}
    daemonset, service, monitor, config = docs["DaemonSet"], docs["Service"], docs["ServiceMonitor"], docs["ConfigMap"]
    pod = daemonset["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The Service selects the DaemonSet's pods and names their ports; the ServiceMonitor (whose CRD
    # schema kubernetes-validate lacks) selects the Service and scrapes its metrics port.
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "gpu-orchestrator"  # job the rules expect
    assert env["GPU_ORCHESTRATOR_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}"
    assert env.get("GPU_ORCHESTRATOR_PORT", "8014") == str(ports["api"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    # The configuration files the environment names are the ConfigMap's keys, mounted where it says.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["config"]["readOnly"] and mounts["model-store"]["readOnly"]
    for variable in ("AGENT_MODEL_MAP", "MPS_ALLOCATION_CONFIG"):
        folder, name = env[variable].rsplit("/", 1)
        assert folder == mounts["config"]["mountPath"] and name in config["data"]
    assert env["MODEL_STORE_ROOT"] == mounts["model-store"]["mountPath"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for name, variable in (("mps-pipe", "CUDA_MPS_PIPE_DIRECTORY"), ("mps-log", "CUDA_MPS_LOG_DIRECTORY")):
        assert mounts[name]["mountPath"] == env[variable] == volumes[name]["hostPath"]["path"]
    assert volumes["shm"]["hostPath"]["path"] == mounts["shm"]["mountPath"] == "/dev/shm"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
