"""What a reloaded configuration changes, and the one read at a time."""

import threading

import pytest

from gpu_orchestrator.supervisor.config import Config, ConfigError
from gpu_orchestrator.supervisor.mps_control import MpsSettings
from gpu_orchestrator.supervisor.reload import Reloads, diff


def config(clients, allocations=None):
    return Config(model_store_root="/s", model_map_path="m", allocation_path="", clients=clients,
                  allocations=allocations or {})


def test_added_removed_and_changed_clients():
    changes = diff(config({"keep": ["a"], "gone": ["b"], "grow": ["c"]}),
                   config({"keep": ["a"], "grow": ["c", "d"], "new": ["e"]}))
    assert (changes.added, changes.removed, changes.changed) == (["new"], ["gone"], ["grow"])
    assert changes.as_fields() == {"added": "new", "removed": "gone", "changed": "grow"}


def test_a_sighup_during_a_read_is_served_by_one_more_read_and_a_failure_is_logged(caplog):
    release, woken = threading.Event(), threading.Event()

    def read(current):
        release.wait(30)
        raise ConfigError("m: broken")
    reloads = Reloads(woken.set, read=read)
    assert reloads.begin(config({"a": ["x"]}))
    assert not reloads.begin(config({"a": ["x"]}))  # queued behind the read under way
    assert reloads.finish(0.0, lambda new: None) is False
    release.set()
    assert woken.wait(30)
    assert reloads.finish(0.0, lambda new: None) is True
    assert "reload refused; the running configuration stays" in caplog.text and "m: broken" in caplog.text
    assert reloads.take_again() and not reloads.take_again()


def allocated(**fields):
    from gpu_orchestrator.supervisor.allocation import AgentAllocation
    return config({"a": ["org/x"], "b": ["org/y"]},
                  {"a": AgentAllocation(**{"mps_memory_limit_gb": 2.3, **fields}),
                   "b": AgentAllocation(mps_memory_limit_gb=1.0)})


@pytest.mark.parametrize("edit", [dict(priority="low"), dict(calculated_requirement_gb=1.5),
                                  dict(safety_margin_gb=0.8), dict(models=["org/x", "org/other"])])
def test_an_informational_allocation_field_restarts_no_loader(edit):
    # Every field once counted: editing a priority restarted the client's healthy loader.
    before = allocated(priority="high", calculated_requirement_gb=2.0, safety_margin_gb=0.3, models=["org/x"])
    after = allocated(**{"priority": "high", "calculated_requirement_gb": 2.0, "safety_margin_gb": 0.3,
                         "models": ["org/x"], **edit})
    assert diff(before, after).changed == []


@pytest.mark.parametrize("edit", [dict(mps_memory_limit_gb=4.0), dict(devices=[1]), dict(active_thread_percentage=50),
                                  dict(backend="torch"), dict(warmup=True)])
def test_what_reaches_the_loader_restarts_it(edit):
    assert diff(allocated(), allocated(**edit)).changed == ["a"]


MPS = MpsSettings("/tmp/nvidia-mps", "/var/log/nvidia-mps")


@pytest.mark.parametrize("edit, mps, variables", [
    (dict(mps_memory_limit_gb=4.0), MPS, ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]),
    (dict(active_thread_percentage=50), MPS, ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"]),
    (dict(devices=[1]), MPS, ["CUDA_VISIBLE_DEVICES"]),
    (dict(devices=[1]), None, ["CUDA_VISIBLE_DEVICES"]),
    (dict(mps_memory_limit_gb=4.0), None, []),  # without MPS no limit reaches a service
    (dict(backend="torch"), MPS, []),  # the loader's business only
])
def test_a_changed_client_whose_service_environment_changed_is_named_with_the_variables(edit, mps, variables):
    changes = diff(allocated(), allocated(**edit), mps, gpu_count=1)
    assert changes.changed == ["a"] and list(changes.services) == (["a"] if variables else [])
    assert set(variables) <= set(changes.services.get("a", []))  # pinning may set more (CUDA_DEVICE_ORDER)


def test_the_reload_log_says_to_restart_each_service_whose_limits_changed(caplog):
    # Its loader restarted under the new limits; its service, started with `exec`, silently kept the old ones.
    new, woken = allocated(mps_memory_limit_gb=4.0), threading.Event()
    reloads = Reloads(woken.set, read=lambda current: new)
    assert reloads.begin(allocated()) and woken.wait(30)
    assert reloads.finish(0.0, lambda config: diff(allocated(), config, MPS)) is True
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["client a's limits changed: restart its service for them to apply (systemctl restart "
                        "'*@a.service'); until then it runs under the old ones client=a "
                        "changed=CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]


def test_the_restart_hint_names_the_unit_as_systemd_writes_it_whatever_braces_the_pattern_holds(caplog):
    # str.format raised KeyError on a pattern with other braces, which the configuration accepts,
    # out of the loop after the reload was applied: the supervisor exited.
    import msgspec

    from gpu_orchestrator.supervisor.allocation import AgentAllocation

    def named(limit: float):
        return msgspec.structs.replace(config({"fact checker": ["org/x"]},
                                              {"fact checker": AgentAllocation(mps_memory_limit_gb=limit)}),
                                       service_pattern="inference-{client}-{role}.service")
    new, woken = named(4.0), threading.Event()
    reloads = Reloads(woken.set, read=lambda current: new)
    assert reloads.begin(named(2.0)) and woken.wait(30)
    assert reloads.finish(0.0, lambda config: diff(named(2.0), config, MPS)) is True
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "(systemctl restart 'inference-fact\\x20checker-{role}.service')" in warnings[0]
