"""Every refusal names the file, the field and the problem; the CLI exits 78 and starts nothing."""

import json
import os
import subprocess
import sys

import pytest

from gpu_orchestrator.loaders import channel
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
    ("overflowing limit", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1e308}), "a.mps_memory_limit_gb: must be at most 4096 GB (no GPU has more), got 1e+308"),
    ("limit of 0 MiB", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1e-9}), "a.mps_memory_limit_gb: 1e-09 GB is less than 1 MiB and rounds to 0 MiB"),
    ("negative margin", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "safety_margin_gb": -0.1}), "a.safety_margin_gb: must be >= 0, got -0.1"),
    ("negative device", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "devices": [0, -1]}), "a.devices[1]: must be a GPU index 0-63, got -1"),
    ("huge device", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "devices": [10**9]}), "a.devices[0]: must be a GPU index 0-63, got 1000000000"),
    ("repeated device", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "devices": [1, 1]}), "a.devices[1]: GPU 1 is listed twice"),
    ("empty devices", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "devices": []}), "a.devices: is empty"),
    ("fractional device", {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1, "devices": [0.5]}), "Expected `int`, got `float` - at `$.mps_resource_allocation.agent_allocations.a.devices[0]`"),
    ("zero total", {"a": ["x/y"]}, {"mps_resource_allocation": {"total_gpu_memory_gb": 0}}, "$.mps_resource_allocation.total_gpu_memory_gb: must be > 0, got 0"),
    ("text available", {"a": ["x/y"]}, {"mps_resource_allocation": {"available_memory_gb": "23.5"}}, "$.mps_resource_allocation.available_memory_gb: must be a number, got \"23.5\""),
    ("overhead eats the total", {"a": ["x/y"]}, {"mps_resource_allocation": {"total_gpu_memory_gb": 1, "mps_overhead_gb": 2}}, "mps_overhead_gb: 2 leaves nothing of the 1 GB"),
    ("configured total", {"a": ["x/y"]}, {"mps_resource_allocation": {"mps_configuration": {"total_gpu_memory_gb": -24}}}, "mps_configuration.total_gpu_memory_gb: must be > 0, got -24"),
    ("client with a next-line character", {"\x85": ["x/y"]}, None, '$["\\u0085"]: client name'),
    ("client like an option", {"--help": ["x/y"]}, None, "$.--help: client name '--help' starts with '-'"),
    ("the orchestrator's own name", {"gpu-orchestrator": ["x/y"]}, None, "$.gpu-orchestrator: client name 'gpu-orchestrator' is the orchestrator's own unit's"),
    ("systemd's escape character", {"a\\x20b": ["x/y"]}, None, "holds '\\', systemd's escape character in unit names"),
    ("model like an option", {"a": ["-x"]}, None, "$.a[0]: model id '-x' starts with '-'"),
    ("more model ids than one argument holds", {"a": [f"org/m{i:04d}-" + "x" * 90 for i in range(1100)]}, None,
     "$.a: 1100 model ids take 113301 bytes; a loader gets its client's list in one command-line argument"),
    ("client key twice", '{"a": ["x/y"], "a": ["x/z"]}', None, 'AGENT_MODEL_MAP.json: key "a" is given twice in one object'),
    ("allocation key twice", {"a": ["x/y"]}, '{"mps_resource_allocation": {"agent_allocations": {"a": {"mps_memory_limit_gb": 1, "mps_memory_limit_gb": 90}}}}', 'alloc.json: key "mps_memory_limit_gb" is given twice'),
    ("NaN", {"a": ["x/y"]}, '{"mps_resource_allocation": {"agent_allocations": {"a": {"mps_memory_limit_gb": NaN}}}}', "alloc.json: not valid JSON: NaN is not a JSON number"),
    ("a number too big for a float", {"a": ["x/y"]}, '{"mps_resource_allocation": {"available_memory_gb": 1' + "0" * 400 + '}}', "$.mps_resource_allocation.available_memory_gb: 1000000000000000000000000000000000000... is larger than any number"),
]


@pytest.mark.parametrize("name,model_map,alloc,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_file_field_and_problem(tmp_path, store, name, model_map, alloc, message):
    with pytest.raises(ConfigError) as caught:
        load_config(config_for(tmp_path, store, model_map, alloc))
    assert message in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1  # splitlines also breaks at \x85, \u2028 ...


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
    # Empty would bind every interface: refused, never taken for 0.0.0.0.
    with pytest.raises(ConfigError, match="GPU_ORCHESTRATOR_HOST/--host: empty; leave it unset for 127.0.0.1"):
        load_config({**env, "GPU_ORCHESTRATOR_HOST": ""})


@pytest.mark.parametrize("token", ["s3cret\n", " s3cret", "s3 cret", "s3cr\x00t", "s3crét"])
def test_a_token_no_header_could_carry_is_refused_at_start_without_being_shown(tmp_path, store, token):
    """HTTP drops a header value's outer whitespace and forbids control characters: such a token
    (a secret file's trailing newline) would have refused every POST of a running orchestrator."""
    env = config_for(tmp_path, store, {"a": ["x/y"]})
    with pytest.raises(ConfigError, match="GPU_ORCHESTRATOR_TOKEN: only visible ASCII") as caught:
        load_config({**env, "GPU_ORCHESTRATOR_TOKEN": token})
    assert "s3" not in str(caught.value)
    assert load_config({**env, "GPU_ORCHESTRATOR_TOKEN": "s3cret-+/=~._"}).token == "s3cret-+/=~._"


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
    assert config.allocation_document["mps_resource_allocation"]["agent_allocations"]["a"]["gpu_device"] == "cuda:0"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_config_path_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, store, kind):
    env = config_for(tmp_path, store, {"a": ["x/y"]})
    if kind == "fifo":
        os.mkfifo(tmp_path / "map.fifo")  # no writer: a blocking open or read would hang here
        env["AGENT_MODEL_MAP"] = str(tmp_path / "map.fifo")
    elif kind == "directory":
        env["AGENT_MODEL_MAP"] = str(tmp_path)
    else:
        env["AGENT_MODEL_MAP"] = "/dev/zero"  # endless: an unbounded read would never return
    names = {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}
    with pytest.raises(ConfigError, match=f"cannot read the model map: it is {names[kind]}, not a regular file"):
        load_config(env)


def test_a_config_file_is_read_only_up_to_a_bound(tmp_path, store):
    from gpu_orchestrator.supervisor.jsonfile import MAX_CONFIG_BYTES
    env = config_for(tmp_path, store, {"a": ["x/y"]})
    with open(env["AGENT_MODEL_MAP"], "a") as handle:
        handle.write(" " * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(env)


def test_strict_mode_never_names_the_hf_cache(tmp_path, store):
    env = config_for(tmp_path, store, {"a": ["x/y"]}, STRICT_MODEL_STORE="1", HF_HOME=str(tmp_path))
    assert load_config(env).hf_hub is None
    env["STRICT_MODEL_STORE"] = "0"
    assert load_config(env).hf_hub == str(tmp_path / "hub")


def test_a_relative_hf_home_becomes_an_absolute_loader_argument(tmp_path, store, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "-cache/hub" as given would reach the loader as an option
    env = config_for(tmp_path, store, {"a": ["x/y"]}, HF_HOME="-cache")
    assert load_config(env).hf_hub == str(tmp_path / "-cache" / "hub")


CLI_REFUSALS = {r[0]: r for r in REFUSALS}


@pytest.mark.parametrize("name,model_map,alloc,message", [
    CLI_REFUSALS[name] for name in ("malformed map", "absolute model", "zero limit", "unknown client",
                                    "overflowing limit", "client like an option", "client key twice")])
def test_cli_exits_78_with_one_line_and_starts_nothing(tmp_path, store, name, model_map, alloc, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORCHESTRATOR_", "MPS_", "ENABLE_"))}
    env.update(config_for(tmp_path, store, model_map, alloc))
    with subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port", "0"],
                          env=env, stderr=subprocess.PIPE, text=True) as proc:
        stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 78, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in stderr
    # Only this run's segments: other orchestrators on the host may own theirs meanwhile.
    assert channel.segments_of(proc.pid) == []


def test_the_service_pattern_names_a_unit_with_the_client_in_it(tmp_path, store):
    assert load_config(config_for(tmp_path, store, {"a": ["x/y"]})).service_pattern == "*@{client}.service"
    custom = config_for(tmp_path, store, {"a": ["x/y"]}, GPU_ORCHESTRATOR_SERVICE_PATTERN="inference-{client}.service")
    assert load_config(custom).service_pattern == "inference-{client}.service"
    for bad in ("justnews@analyst.service", "a/{client}.service"):
        with pytest.raises(ConfigError, match="GPU_ORCHESTRATOR_SERVICE_PATTERN"):
            load_config(config_for(tmp_path, store, {"a": ["x/y"]}, GPU_ORCHESTRATOR_SERVICE_PATTERN=bad))


def test_a_store_path_that_is_not_utf8_is_refused_at_start(tmp_path, store):
    # A loader gets its paths as JSON text: such a path once passed and then failed every exec.
    odd = tmp_path / os.fsdecode(b"store-\xff")
    odd.mkdir()
    env = {**config_for(tmp_path, store, {"a": ["x/y"]}), "MODEL_STORE_ROOT": str(odd)}
    with pytest.raises(ConfigError, match=r"MODEL_STORE_ROOT: .* is not valid UTF-8, and a loader gets it as JSON text"):
        load_config(env)
    env = {**config_for(tmp_path, store, {"a": ["x/y"]}), "HF_HOME": str(odd)}
    with pytest.raises(ConfigError, match=r"HF_HUB_CACHE / HF_HOME: .* is not valid UTF-8"):
        load_config(env)


def test_an_empty_allocation_variable_is_refused_not_taken_for_no_limits(tmp_path, store):
    # An env file's `MPS_ALLOCATION_CONFIG=` once dropped every client's limit with one log warning.
    env = config_for(tmp_path, store, {"a": ["x/y"]})
    for empty in ("", " "):
        with pytest.raises(ConfigError, match="MPS_ALLOCATION_CONFIG/--allocation: empty; name the allocation file"):
            load_config({**env, "MPS_ALLOCATION_CONFIG": empty})


def test_relative_mps_folders_become_absolute(tmp_path, store, monkeypatch):
    # A service resolves a relative pipe folder against its own working directory, where no daemon is.
    monkeypatch.chdir(tmp_path)
    config = load_config(config_for(tmp_path, store, {"a": ["x/y"]}, CUDA_MPS_PIPE_DIRECTORY="pipe",
                                    CUDA_MPS_LOG_DIRECTORY="log"))
    assert (config.mps_pipe_dir, config.mps_log_dir) == (str(tmp_path / "pipe"), str(tmp_path / "log"))


def test_limits_without_mps_are_warned_about_at_start_and_on_reload(tmp_path, store):
    from gpu_orchestrator.supervisor.config import reload_config
    env = config_for(tmp_path, store, {"a": ["x/y"]}, allocation(a={"mps_memory_limit_gb": 1}))
    off = load_config(env)
    assert off.warnings[0].startswith("ENABLE_MPS is off: nothing enforces the limits of")
    assert reload_config(off).warnings == off.warnings
    assert load_config({**env, "ENABLE_MPS": "true"}).warnings == []
    assert not any("ENABLE_MPS" in w for w in load_config(config_for(tmp_path, store, {"a": ["x/y"]})).warnings)


def test_a_configuration_error_quoting_a_newline_stays_one_line(tmp_path, store):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_ORCHESTRATOR_", "MPS_", "ENABLE_"))}
    env.update(config_for(tmp_path, store, {"a": ["x/y"]}), MPS_ALLOCATION_CONFIG=str(tmp_path / "alloc.json\n"))
    done = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", "serve", "--port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 78 and done.stderr.count("\n") == 1
    assert "alloc.json\\n: cannot read the MPS allocation file" in done.stderr
