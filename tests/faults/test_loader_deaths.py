"""SIGKILL a loader at random points of a warm-up, again and again: the status never lies."""

import os
import random
import signal
import time

from support import SOAK, Orchestrator, add_model, wait_for, write_config

from gpu_orchestrator.supervisor.mps import process_alive

MEDIUM = (384, 4, 30000)  # ~37 MB each: a warm-up long enough to be interrupted


def check_truthful(status: dict, killed: set[int]) -> None:
    models = [m for client in status["clients"].values() for m in client["models"]]
    counted = {s: sum(m["status"] == s for m in models) for s in ("ready", "failed", "loading", "pending")}
    summary = status["summary"]
    assert (summary["done"], summary["failed"], summary["loading"], summary["pending"]) == \
        (counted["ready"], counted["failed"], counted["loading"], counted["pending"])
    assert summary["total"] == len(models)
    for name, client in status["clients"].items():
        assert client["pid"] not in killed, f"{name} reported with a dead loader's pid"
        for model in client["models"]:
            if model["status"] == "ready":
                assert client["pid"] is not None, f"{name}: a model ready without a live loader"
                assert model["error"] is None and model["bytes"] == model["bytes_total"] > 0
        if client["ready"]:
            assert all(m["status"] == "ready" for m in client["models"])
    if status["all_ready"]:
        assert not status["in_progress"] and counted["ready"] == len(models)


def test_sigkill_during_warmups(tmp_path, record):
    store = tmp_path / "store"
    for index in range(3):
        add_model(store, f"org/m{index}", shape=MEDIUM, seed=index, manifest=True)
    add_model(store, "org/other")
    model_map, _ = write_config(tmp_path, {"victim": ["org/m0", "org/m1", "org/m2"], "bystander": ["org/other"]})
    kills = 100 if SOAK else 20
    rng = random.Random(20261127)
    killed: set[int] = set()
    responses = mid_warmup = 0
    with Orchestrator(tmp_path, store, model_map) as orch:
        orch.wait_settled()
        started = time.monotonic()
        for _ in range(kills):
            assert orch.post("/models/preload", {"refresh": True})[0] == 202
            time.sleep(rng.uniform(0, 0.1))  # the kill point, not synchronisation
            victim = orch.status()["clients"]["victim"]
            os.kill(victim["pid"], signal.SIGKILL)
            pid = victim["pid"]
            killed.add(pid)
            mid_warmup += any(m["status"] != "ready" for m in victim["models"])  # where the kill landed
            # Until the loop reaps it (its next tick) the status may still name the killed loader;
            # once it stops, the dead pid must never come back.
            wait_for(lambda: orch.status()["clients"]["victim"]["pid"] != pid, what="the killed loader noticed")
            assert not process_alive(pid)

            def back():
                nonlocal responses
                status = orch.status()
                responses += 1
                check_truthful(status, killed)
                return status["clients"]["victim"]["ready"] and status["all_ready"]

            wait_for(back, timeout=60, interval=0.01, what="victim ready again")
        restarts = orch.status()["clients"]["victim"]["restarts"]
        assert restarts == kills
        record("loader SIGKILL mid-warm-up", kills=kills, landed_mid_warmup=mid_warmup,
               status_reads_checked=responses, restarts=restarts, seconds=round(time.monotonic() - started, 1))
