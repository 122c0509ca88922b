"""Every refusal names the file, the field and the problem; the CLI exits 78 and starts nothing."""

import json
import os
import subprocess
import sys

import pytest

from gpu_orchestrator.supervisor import channel
from gpu_orchestrator.supervisor.config import ConfigError, load_config


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    return path


def write(path, document):
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def config_for(tmp_path, store, model_map, allocation=None, **env):
    map_path = write(tmp_path / "AGENT_MODEL_MAP.json", model_map)
    full_env = {"MODEL_STORE_ROOT": str(store), "AGENT_MODEL_MAP": str(map_path), **env}
    if allocation is not None:
        full_env["MPS_ALLOCATION_CONFIG"] = str(write(tmp_path / "alloc.json", allocation))
    return full_env


def allocation(**clients):
    return {"mps_resource_allocation": {"agent_allocations": clients}}


REFUSALS = [
    ("malformed map", '{"a": ["x/y",]', None, "AGENT_MODEL_MAP.json: not valid JSON"),
    ("map not an object", ["x"], None, "expected an object"),
    ("models not a list", {"a": "x/y"}, None, "Expected `array`, got `str` - at `$.a`"),
    ("model not a string", {"a": ["x/y", 3]}, None, "Expected `str`, got `int` - at `$.a[1]`"),
    ("empty client", {"": ["x/y"]}, None, "client name is empty"),
    ("client with slash", {"a/b": ["x/y"]}, None, "must be a plain name"),
    ("absolute model", {"a": ["/etc/passwd"]}, None, "$.a[0]: model id '/etc/passwd' is absolute"),
    ("climbing model", {"a": ["x/../../etc"]}, None, "$.a[0]: model id 'x/../../etc' has an empty, '.' or '..' component"),
    ("duplicate model", {"a": ["x/y", "x/y"]}, None, "listed twice"),
    ("malformed allocation", {"a": ["x/y"]}, "{nope", "alloc.json: not valid JSON"),
    ("allocation without section", {"a": ["x/y"]}, {"other": 1}, "$.mps_resource_allocation: missing or not an object"),
    ("zero limit", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 0}), "agent_allocations.a.mps_memory_limit_gb: must be > 0, got 0"),
    ("negative limit", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": -1.5}), "must be > 0, got -1.5"),
    ("limit wrong type", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": "2GB"}), "Expected `float`, got `str` - at `$.mps_resource_allocation.agent_allocations.a.mps_memory_limit_gb`"),
    ("limit missing", {"a": ["x/y"]}, allocation(a={"priority": "high"}), "missing required field `mps_memory_limit_gb`"),
    ("unknown client", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1}, ghost={"mps_memory_limit_gb": 1}), "client 'ghost' is not in the model map"),
    ("thread percentage", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "active_thread_percentage": 0}), "active_thread_percentage: must be 1-100"),
    ("unknown backend", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "backend": "jax"}), "backend: must be one of default, torch, got 'jax'"),
]


@pytest.mark.parametrize("name,model_map,alloc,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_file_field_and_problem(tmp_path, store, name, model_map, alloc, message):
    with pytest.raises(ConfigError) as caught:
        load_config(config_for(tmp_path, store, model_map, alloc))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_store_root_and_missing_map_file(tmp_path, store):
    with pytest.raises(ConfigError, match="MODEL_STORE_ROOT: not set"):
        load_config({"AGENT_MODEL_MAP": "x"})
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config({"MODEL_STORE_ROOT": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="cannot read the model map: No such file"):
        load_config({"MODEL_STORE_ROOT": str(store), "AGENT_MODEL_MAP": str(tmp_path / "missing.json")})


def test_bad_boolean_and_port(tmp_path, store):
    env = config_for(tmp_path, store, {"a": ["x/y"]})
    with pytest.raises(ConfigError, match="ENABLE_NVML: expected true or false, got 'maybe'"):
        load_config({**env, "ENABLE_NVML": "maybe"})
    with pytest.raises(ConfigError, match="GPU_ORCHESTRATOR_PORT: port 70000 is outside"):
        load_config({**env, "GPU_ORCHESTRATOR_PORT": "70000"})


def test_client_without_allocation_is_a_warning_not_an_error(tmp_path, store):
    env = config_for(tmp_path, store, {"a": ["x/y"], "b": ["x/z"]}, allocation(a={"mps_memory_limit_gb": 2.5}))
    config = load_config(env)
    assert config.memory_limit_bytes("a") == int(2.5 * 1024**3)
    assert config.memory_limit_bytes("b") is None
    assert any("client b has no allocation" in w for w in config.warnings)


def test_flags_override_environment(tmp_path, store):
    env = config_for(tmp_path, store, {"a": ["x/y"]}, GPU_ORCHESTRATOR_PORT="9000", GPU_ORCHESTRATOR_HOST="127.0.0.2")
    config = load_config(env, {"gpu_orchestrator_port": 9100, "no_preload": True})
    assert (config.host, config.port, config.preload) == ("127.0.0.2", 9100, False)


def test_unknown_allocation_keys_are_kept_for_the_api(tmp_path, store):
    env = config_for(tmp_path, store, {"a": ["x/y"]},
                     allocation(a={"mps_memory_limit_gb": 1, "gpu_device": "cuda:0"}))
    config = load_config(env)
    assert config.allocation_document["agent_allocations"]["a"]["gpu_device"] == "cuda:0"


def test_strict_mode_never_names_the_hf_cache(tmp_path, store):
    env = config_for(tmp_path, store, {"a": ["x/y"]}, STRICT_MODEL_STORE="1", HF_HOME=str(tmp_path))
    assert load_config(env).hf_hub is None
    env["STRICT_MODEL_STORE"] = "0"
    assert load_config(env).hf_hub == str(tmp_path / "hub")


@pytest.mark.parametrize("name,model_map,alloc,message", [REFUSALS[0], REFUSALS[6], REFUSALS[11], REFUSALS[15]],
                         ids=["malformed", "absolute", "zero-limit", "unknown-client"])
def test_cli_exits_78_with_one_line_and_starts_nothing(tmp_path, store, name, model_map, alloc, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORCHESTRATOR_", "MPS_", "ENABLE_"))}
    env.update(config_for(tmp_path, store, model_map, alloc))
    before = set(os.listdir(channel.SHM_DIR))
    proc = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.cli", "serve", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert set(os.listdir(channel.SHM_DIR)) == before
