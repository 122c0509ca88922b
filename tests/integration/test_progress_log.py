"""A model's warm-up progress: in /models/status while it is read, and once per tenth in the log."""

import re

from support import Orchestrator, add_model, write_config

BIG = (1024, 2, 24000)  # hidden, layers, vocabulary: a ~100 MB model, a dozen 8 MiB progress steps


def test_each_tenth_of_a_model_is_logged_once_with_its_own_seconds(tmp_path):
    store = tmp_path / "store"
    add_model(store, "org/big", shape=BIG)
    model_map, _ = write_config(tmp_path, {"alpha": ["org/big"]})
    with Orchestrator(tmp_path, store, model_map) as orch:
        assert orch.wait_settled()["all_ready"]
        orch.stop()
        log = orch.log_path.read_text()
    lines = [line for line in log.splitlines() if "model progress client=alpha model=org/big" in line]
    assert [int(re.search(r"percent=(\d+)", line)[1]) for line in lines] == list(range(10, 100, 10)), log
    seconds = [float(re.search(r" seconds=([\d.]+)", line)[1]) for line in lines]
    ready = float(re.search(r"model ready client=alpha model=org/big .*seconds=([\d.]+)", log)[1])
    assert seconds == sorted(seconds) and seconds[-1] <= ready
    assert all(re.search(r"rate_bytes_per_s=\d+ eta_s=[\d.]+", line) for line in lines)
