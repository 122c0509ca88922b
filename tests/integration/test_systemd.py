"""sd_notify over real AF_UNIX datagram sockets, SIGHUP reloads, and the unit files."""

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from support import Orchestrator, add_model, unit_sections, wait_for, write_config

REPO = Path(__file__).resolve().parents[2]


class NotifyListener:
    """A datagram socket standing in for systemd; records each message with the moment it came."""

    def __init__(self, tmp_path: Path, abstract: bool, port: int | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"gpu-orchestrator-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(tmp_path / "notify.sock")
            self.sock.bind(self.address)
        self.sock.settimeout(0.2)
        self.port = port
        self.messages: list[tuple[float, str, bool | None]] = []
        self.running = True
        self.thread = threading.Thread(target=self.collect, daemon=True)
        self.thread.start()

    def port_accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            return True
        except OSError:
            return False

    def collect(self):
        while self.running:
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            # Probe the port the moment READY=1 arrives: it must already accept.
            accepts = self.port_accepts() if "READY=1" in data.splitlines() else None
            self.messages.append((time.monotonic(), data, accepts))

    def having(self, assignment: str) -> list:
        return [m for m in self.messages if assignment in m[1].splitlines()]

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def small_setup(tmp_path, store):
    model_map, allocation = write_config(tmp_path, {"alpha": ["org/a1"], "gamma": ["org/g1"]},
                                         {"alpha": {"mps_memory_limit_gb": 1.0}})
    return model_map, allocation


@pytest.mark.parametrize("abstract", [False, True], ids=["path-socket", "abstract-socket"])
def test_ready_status_watchdog_and_stopping(tmp_path, store, small_setup, abstract):
    model_map, allocation = small_setup
    orch = Orchestrator(tmp_path, store, model_map, allocation)
    listener = NotifyListener(tmp_path, abstract, orch.port)
    orch.env.update({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "600000"})
    try:
        orch.start()
        ready = wait_for(lambda: listener.having("READY=1"), what="READY=1")
        assert ready[0][2] is True, "READY=1 came before the port accepted connections"
        orch.wait_settled()
        wait_for(lambda: any("STATUS=2/2 clients ready" in m[1] for m in listener.messages), what="STATUS ready")
        start = time.monotonic()
        wait_for(lambda: time.monotonic() - start > 3, what="a 3 s window")
        pings = [m for m in listener.having("WATCHDOG=1") if m[0] >= start]
        assert 5 <= len(pings) <= 60, f"{len(pings)} WATCHDOG=1 in 3 s with WATCHDOG_USEC=600000"
        for client in ("alpha", "gamma"):
            environ = Path(f"/proc/{orch.loader_pid(client)}/environ").read_bytes().split(b"\0")
            assert not any(item.startswith(b"NOTIFY_SOCKET=") for item in environ)
            assert b"GPU_ORCHESTRATOR_CLIENT=" + client.encode() in environ
        assert orch.stop() == 0
        assert listener.having("STOPPING=1")
    finally:
        orch.kill_everything()
        listener.close()


def test_watchdog_meant_for_another_pid_is_not_pinged(tmp_path, store, small_setup):
    model_map, allocation = small_setup
    orch = Orchestrator(tmp_path, store, model_map, allocation)
    listener = NotifyListener(tmp_path, False, orch.port)
    orch.env.update({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "300000", "WATCHDOG_PID": "1"})
    try:
        orch.start()
        orch.wait_settled()
        wait_for(lambda: listener.having("READY=1"), what="READY=1")
        assert listener.having("WATCHDOG=1") == []
    finally:
        orch.kill_everything()
        listener.close()


def test_sighup_applies_added_removed_changed_and_keeps_unchanged(tmp_path, store):
    add_model(store, "org/d1", seed=7)
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1"], "beta": ["org/b1"], "gamma": ["org/g1"]})
    orch = Orchestrator(tmp_path, store, model_map)
    listener = NotifyListener(tmp_path, False, orch.port)
    orch.env["NOTIFY_SOCKET"] = listener.address
    try:
        orch.start()
        before = orch.wait_settled()["clients"]
        gamma_pid = before["gamma"]["pid"]
        model_map.write_text(json.dumps({"alpha": ["org/a1"], "beta": ["org/b1", "org/a2"], "delta": ["org/d1"]}))
        os.kill(orch.proc.pid, signal.SIGHUP)

        def applied():
            status = orch.status()
            done = set(status["clients"]) == {"alpha", "beta", "delta"} and status["all_ready"]
            return status if done else None

        after = wait_for(applied, what="reload applied")["clients"]
        assert after["alpha"]["pid"] == before["alpha"]["pid"] and after["alpha"]["restarts"] == 0
        assert after["beta"]["pid"] != before["beta"]["pid"]
        assert [m["model"] for m in after["beta"]["models"]] == ["org/b1", "org/a2"]
        assert after["delta"]["ready"]
        wait_for(lambda: not os.path.exists(f"/proc/{gamma_pid}"), what="gamma's loader gone")
        assert "reloaded added=delta removed=gamma changed=beta" in orch.output()
        reloading = listener.having("RELOADING=1")
        assert reloading and any(m[0] > reloading[0][0] for m in listener.having("READY=1"))
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading[0][1].splitlines())

        model_map.write_text('{"alpha": ["org/a1"], "broken": [')
        os.kill(orch.proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused; the running configuration stays" in orch.output(), what="refusal logged")
        kept = orch.status()
        assert set(kept["clients"]) == {"alpha", "beta", "delta"} and kept["all_ready"]
        assert {c: v["pid"] for c, v in kept["clients"].items()} == {c: v["pid"] for c, v in after.items()}
        assert orch.stop() == 0
    finally:
        orch.kill_everything()
        listener.close()


def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing; .ci/run installs the systemd package")
    binary = shutil.which("gpu-orchestrator") or str(Path(os.sys.executable).parent / "gpu-orchestrator")
    units = REPO / "scripts" / "systemd"
    service = tmp_path / "gpu-orchestrator.service"
    service.write_text((units / "gpu-orchestrator.service").read_text().replace("/opt/gpu-orchestrator/bin/gpu-orchestrator", binary))
    # The commented example that points the client units at another port is verified set, too.
    example = "#   Environment=GPU_ORCHESTRATOR_HOST="
    dropin = tmp_path / "demo-agent@.service.d"
    dropin.mkdir()
    gate_conf = (units / "gpu-gate.conf").read_text().replace("/opt/gpu-orchestrator/bin/gpu-orchestrator", binary)
    assert example in gate_conf
    (dropin / "gpu-gate.conf").write_text(gate_conf.replace(example, example.removeprefix("#   ")))
    (tmp_path / "demo-agent@.service").write_text("[Unit]\nDescription=a GPU service\n[Service]\nExecStart=/bin/true\n")
    client_unit = (units / "gpu-client@.service").read_text().replace("/opt/gpu-orchestrator/bin/gpu-orchestrator", binary)
    assert example in client_unit
    client_unit = client_unit.replace(example, example.removeprefix("#   "))
    (tmp_path / "gpu-client@.service").write_text(client_unit.replace("/usr/bin/env python3 -m your_service", "/bin/true"))
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    for unit in (str(service), str(tmp_path / "demo-agent@x.service"), str(tmp_path / "gpu-client@alpha.service")):
        result = subprocess.run([analyze, "verify", unit], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Unknown" not in result.stderr and "ignoring" not in result.stderr, result.stderr


def test_the_unit_provisions_the_mps_folders_before_its_sandbox(tmp_path):
    """ProtectSystem=strict leaves the service nothing to create the MPS folders in, and a '-' in
    ReadWritePaths= skips missing ones: each must exist, owned by the service's user, before it starts."""
    units = REPO / "scripts" / "systemd"
    unit = unit_sections(units / "gpu-orchestrator.service")["Service"]
    installed_as = "/etc/tmpfiles.d/gpu-orchestrator.conf"
    assert f"-+/usr/bin/systemd-tmpfiles --create {installed_as}" in unit["ExecStartPre"]
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("gpu-orchestrator:x:991:991::/nonexistent:/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text("gpu-orchestrator:x:991:\n")
    created = subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}",
                              str(units / "gpu-orchestrator.tmpfiles")], capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    made_by_tmpfiles = {"/" + str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()} - {"/etc"}
    made_by_systemd = {f"/var/log/{name}" for name in unit["LogsDirectory"]}
    assert unit["User"] == ["gpu-orchestrator"] and unit["LogsDirectoryMode"] == ["0755"]
    pipe = root / "tmp" / "nvidia-mps"
    assert (pipe.stat().st_uid, pipe.stat().st_mode & 0o7777) == (991, 0o755)
    provisioned = made_by_tmpfiles | made_by_systemd
    assert {"/tmp/nvidia-mps", "/var/log/nvidia-mps"} <= provisioned  # the MPS variables' defaults
    writable = {path.lstrip("-") for value in unit["ReadWritePaths"] for path in value.split()}
    assert writable <= provisioned, "a writable path nothing creates"
