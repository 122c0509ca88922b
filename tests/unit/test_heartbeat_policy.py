"""The heartbeat timeout an operator gives, and the interval loaders publish at that it implies."""

import argparse

import pytest

from gpu_orchestrator.loaders.wire import decode_args
from gpu_orchestrator.supervisor.clients import MIN_HEARTBEAT_TIMEOUT, Policy
from gpu_orchestrator.supervisor.commands.cli import policy_from
from gpu_orchestrator.supervisor.config import Config, ConfigError
from gpu_orchestrator.supervisor.launch import loader_argv


def serve_flags(heartbeat_timeout: float) -> argparse.Namespace:
    return argparse.Namespace(heartbeat_timeout=heartbeat_timeout, mps_probe_interval=5.0, mps_timeout=5.0,
                              mps_start_timeout=15.0, telemetry_interval=2.0)


@pytest.mark.parametrize("timeout, interval", [(30.0, 1.0), (4.0, 1.0), (2.0, 0.5), (MIN_HEARTBEAT_TIMEOUT, 0.125)])
def test_loaders_publish_a_quarter_of_the_timeout_apart_at_most_once_a_second(timeout, interval):
    # With the interval fixed at 1 s, a timeout under ~1.5 s killed healthy idle loaders forever.
    policy = policy_from(serve_flags(timeout))
    assert policy.heartbeat_interval == interval
    config = Config(model_store_root="/s", model_map_path="m", allocation_path="", clients={"a": ["org/x"]})
    argv = loader_argv(config, "a", "gpu-orchestrator-1-x", 0, policy)
    assert decode_args(argv).heartbeat_interval == interval


@pytest.mark.parametrize("timeout", [0.3, 0.01, MIN_HEARTBEAT_TIMEOUT - 1e-9])
def test_a_timeout_below_the_minimum_is_refused_saying_the_minimum_and_why(timeout):
    with pytest.raises(ConfigError, match=rf"--heartbeat-timeout: must be at least {MIN_HEARTBEAT_TIMEOUT} s, "
                                          rf"got {timeout} \(.*scheduling delays.*killed\)"):
        policy_from(serve_flags(timeout))


def test_the_default_policy_is_unchanged():
    assert Policy().heartbeat_timeout == 30.0 and Policy().heartbeat_interval == 1.0
