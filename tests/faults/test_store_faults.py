"""Model store faults during a warm-up: each hit model fails clearly, the rest is unaffected,
and a refresh after repair recovers.

The orchestrator runs without CAP_DAC_OVERRIDE (setpriv), so a file mode of 000 denies
even root, as it would deny the service's own user.
"""

import os
import shutil
import signal

from support import Orchestrator, add_model, wait_for, write_config, write_sparse_model

NO_DAC = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
BIG = 2 * 1024**3  # sparse


def write_big(directory, fill: bytes = b"") -> None:
    write_sparse_model(directory, BIG, fill)


def test_truncated_replaced_unreadable_and_removed(tmp_path, record):
    store = tmp_path / "store"
    for model in ("org/good", "org/truncated", "org/unreadable", "org/removed"):
        add_model(store, model)
    write_big(store / "org" / "swapped")
    clients = {"bystander": ["org/good"], "victims": ["org/truncated", "org/unreadable", "org/removed"],
               "swapper": ["org/swapped"]}
    model_map, _ = write_config(tmp_path, clients)
    truncated = store / "org" / "truncated" / "model.safetensors"
    intact = truncated.read_bytes()
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",), prefix=NO_DAC) as orch:
        truncated.write_bytes(intact[: len(intact) // 2])
        os.chmod(store / "org" / "unreadable" / "model.safetensors", 0)
        shutil.rmtree(store / "org" / "removed")
        assert orch.post("/models/preload", {"refresh": False})[0] == 202

        swapper = stopped_mid_read(orch, "swapper")  # held there while the file is replaced
        write_big(store / "org" / "swapped", fill=b"new")
        os.kill(swapper, signal.SIGCONT)

        status = orch.wait_settled(timeout=120)
        errors = {e["model"]: e["error"] for e in status["errors"]}
        assert set(errors) == {"org/truncated", "org/unreadable", "org/removed", "org/swapped"}
        assert "truncated or corrupt" in errors["org/truncated"]
        assert "Permission denied" in errors["org/unreadable"]
        assert "not found" in errors["org/removed"] and "tried:" in errors["org/removed"]
        assert "changed while it was being read" in errors["org/swapped"]
        assert status["clients"]["bystander"]["ready"]

        truncated.write_bytes(intact)
        os.chmod(store / "org" / "unreadable" / "model.safetensors", 0o644)
        add_model(store, "org/removed")
        assert orch.post("/models/preload", {"refresh": True})[0] == 202
        recovered = orch.wait_settled(timeout=120)
        assert recovered["all_ready"], recovered["errors"]
        record("model store faults", faults=4, failed_clearly=len(errors), bystander_ready=True,
               recovered_after_refresh=recovered["all_ready"])


def stopped_mid_read(orch, client: str) -> int:
    """The client's loader, SIGSTOPped once it has read part of its first model's BIG file."""
    def reading():
        model = orch.status()["clients"][client]["models"][0]
        return model["status"] == "loading" and 0 < model["bytes"] < BIG // 2

    wait_for(reading, interval=0.001, what="the big read under way")
    loader = orch.loader_pid(client)
    os.kill(loader, signal.SIGSTOP)
    return loader


def test_a_fifo_renamed_over_a_snapshot_file_mid_read_fails_the_model_not_the_loader(tmp_path):
    """A FIFO put where a checked file was, while an earlier file is read: the loader's open() of it
    blocked for good (SIGTERM could not interrupt it, and its heartbeat kept it looking alive). Now
    the model fails, naming the file, and the loader still stops when told."""
    store = tmp_path / "store"
    model = store / "org" / "piped"
    write_big(model)
    (model / "zz_notes.txt").write_text("read after model.safetensors")
    model_map, _ = write_config(tmp_path, {"victim": ["org/piped"]})
    with Orchestrator(tmp_path, store, model_map, extra_args=("--no-preload",)) as orch:
        assert orch.post("/models/preload", {"refresh": False})[0] == 202
        loader = stopped_mid_read(orch, "victim")  # held there while the FIFO takes the later file's place
        os.mkfifo(tmp_path / "fifo")
        os.rename(tmp_path / "fifo", model / "zz_notes.txt")
        os.kill(loader, signal.SIGCONT)
        status = orch.wait_settled(timeout=120)
        errors = {e["model"]: e["error"] for e in status["errors"]}
        assert "zz_notes.txt is not a regular file" in errors["org/piped"], errors
        assert orch.loader_pid("victim") == loader
        assert orch.stop(timeout=30) == 0
        assert "loader stopping client=victim" in orch.log_path.read_text(errors="replace")
