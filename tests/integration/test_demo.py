"""`gpu-orchestrator demo`: it serves its own store to all_ready, and Ctrl-C leaves nothing behind."""

import os
import re
import signal
import subprocess
import sys

from support import children_of, free_port, request, wait_for

from gpu_orchestrator.loaders import channel


def test_demo_reaches_all_ready_and_cleans_up_on_ctrl_c(tmp_path):
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "demo", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return request(url + "/models/status")[1]["all_ready"]
            except OSError:
                return False

        wait_for(ready, timeout=60, what="demo all_ready")
        status = request(url + "/models/status")[1]
        assert status["summary"]["total"] == 5 and status["summary"]["failed"] == 0
        verified = [m["verified"] for c in status["clients"].values() for m in c["models"]]
        assert any(verified) and not all(verified)  # some snapshots carry manifests, some do not
        directory = re.search(r"Demo model store written to (\S+)", log.read_text()).group(1)
        assert os.path.isdir(directory)
        assert f"curl -s {url}/models/status" in log.read_text()
        loaders = children_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert not os.path.exists(directory)
        assert not channel.segments_of(proc.pid)
        assert not any(os.path.exists(f"/proc/{pid}") for pid in loaders)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
