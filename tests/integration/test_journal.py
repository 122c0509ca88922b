"""Under systemd, stderr is the journal: every line, a loader's relayed ones included, carries its priority."""

import os

from support import Orchestrator, add_model, write_config


def test_a_failed_model_is_an_error_to_journald(tmp_path):
    store = tmp_path / "store"
    add_model(store, "org/a1")
    model_map, _ = write_config(tmp_path, {"alpha": ["org/a1", "org/missing"]})
    orch = Orchestrator(tmp_path, store, model_map)
    orch.log_path.touch()  # start() reopens it for writing: same inode, which JOURNAL_STREAM names
    identity = os.stat(orch.log_path)
    orch.env["JOURNAL_STREAM"] = f"{identity.st_dev}:{identity.st_ino}"
    with orch:
        assert not orch.wait_settled()["all_ready"]
        orch.stop()
        lines = orch.log_path.read_text().splitlines()
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>") for line in lines), lines
    assert any(line.startswith("<3>ERROR loader: model failed client=alpha model=org/missing") for line in lines)
    assert any(line.startswith("<6>INFO supervisor: listening") for line in lines)
