"""Property tests: whatever number or string any field of the two files holds, the configuration
is either accepted with a value that is safe to use (it cannot overflow, and every name survives
the loader's command line and the file system), or refused in one line naming the file and field."""

import json
import tempfile
from pathlib import Path

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_orchestrator.loaders.wire import decode_args
from gpu_orchestrator.supervisor.allocation import MAX_GPU_MEMORY_GB
from gpu_orchestrator.supervisor.clients import Policy
from gpu_orchestrator.supervisor.config import ConfigError, load_files
from gpu_orchestrator.supervisor.launch import loader_argv
from gpu_orchestrator.supervisor.status import mps_allocation

EXAMPLES = settings(max_examples=120, deadline=None)
NUMBERS = st.one_of(
    st.integers(-10**6, 10**6), st.integers(min_value=10**15, max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -0.0, 1e-9, 1 / 1024, 0.000976, 4096, 4096.000001, 1e308, 5e-324, 2**63]))
ANYTHING = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=6), st.lists(st.integers(-2, 70), max_size=3))
NAMES = st.one_of(st.text(max_size=12), st.text(alphabet="-/.\\\0\n a", max_size=6),
                  st.sampled_from(["--help", "-x", "-", ".", "..", "a" * 256, "é" * 128, "ok"]))


def load(model_map, allocation: dict | None):
    """load_files on the documents written out; (config fields, None) or (None, refusal)."""
    with tempfile.TemporaryDirectory() as tmp:
        map_path, allocation_path = Path(tmp, "map.json"), Path(tmp, "alloc.json")
        map_path.write_text(model_map if isinstance(model_map, str) else json.dumps(model_map))
        if allocation is not None:
            allocation_path.write_text(json.dumps(allocation))
        try:
            return load_files(str(map_path), str(allocation_path) if allocation is not None else "", True), None
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(tmp), message
            return None, message


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_of(files: dict):
    from gpu_orchestrator.supervisor.config import Config
    return Config(model_store_root="/store", model_map_path="map.json", allocation_path="alloc.json", **files)


# (where in mps_resource_allocation, key, accepted?) for every memory figure of the format.
GB_FIELDS = [
    ("agent", "mps_memory_limit_gb", lambda v: is_number(v) and 1 / 1024 <= v <= MAX_GPU_MEMORY_GB),
    ("agent", "calculated_requirement_gb", lambda v: v is None or is_number(v) and 0 <= v <= MAX_GPU_MEMORY_GB),
    ("agent", "safety_margin_gb", lambda v: v is None or is_number(v) and 0 <= v <= MAX_GPU_MEMORY_GB),
    ("top", "total_gpu_memory_gb", lambda v: v is None or is_number(v) and 0 < v <= MAX_GPU_MEMORY_GB),
    ("top", "available_memory_gb", lambda v: v is None or is_number(v) and 0 < v <= MAX_GPU_MEMORY_GB),
    ("top", "mps_overhead_gb", lambda v: v is None or is_number(v) and 0 <= v <= MAX_GPU_MEMORY_GB),
    ("mps_configuration", "total_gpu_memory_gb", lambda v: v is None or is_number(v) and 0 < v <= MAX_GPU_MEMORY_GB),
]


@EXAMPLES
@given(field=st.sampled_from(GB_FIELDS), value=ANYTHING)
def test_every_memory_figure_is_accepted_within_bounds_or_refused_naming_it(field, value):
    where, key, acceptable = field
    agent = {"mps_memory_limit_gb": 1.0}
    section = {"agent_allocations": {"a": agent}}
    {"agent": agent, "top": section}.get(where, section.setdefault("mps_configuration", {}))[key] = value
    files, refusal = load({"a": ["org/m"]}, {"mps_resource_allocation": section})
    if acceptable(value) and not (key == "mps_memory_limit_gb" and int(value * 1024) == 0):
        assert refusal is None
        config = config_of(files)
        limit = config.memory_limit_bytes("a")
        assert isinstance(limit, int) and 2**20 <= limit <= MAX_GPU_MEMORY_GB * 2**30
        msgspec.json.encode(mps_allocation(config))  # finite all the way to the answer
    else:
        assert refusal is not None and key in refusal


@EXAMPLES
@given(percentage=ANYTHING, devices=st.one_of(ANYTHING, st.lists(ANYTHING, max_size=3)))
def test_thread_percentage_and_devices_are_small_integers_or_refused(percentage, devices):
    allocation = {"mps_memory_limit_gb": 1, "active_thread_percentage": percentage, "devices": devices}
    files, refusal = load({"a": ["org/m"]}, {"mps_resource_allocation": {"agent_allocations": {"a": allocation}}})
    good_percentage = percentage is None or is_whole(percentage) and 1 <= percentage <= 100
    good_devices = devices is None or (isinstance(devices, list) and len(devices) > 0
                                       and len(set(map(str, devices))) == len(devices)
                                       and all(is_whole(d) and 0 <= d <= 63 for d in devices))
    assert (refusal is None) == (good_percentage and good_devices), refusal
    if refusal is not None:
        assert "active_thread_percentage" in refusal or "devices" in refusal


def argv_round_trip(files: dict, client: str) -> tuple[str, list[str]]:
    argv = loader_argv(config_of(files), client, "segment", 0, Policy())
    parsed = decode_args(argv)
    return parsed.client, parsed.models


def is_file_name(part: str) -> bool:
    return part not in ("", ".", "..") and "/" not in part and "\0" not in part and len(part.encode()) <= 255


@EXAMPLES
@given(client=NAMES, model=NAMES, organisation=st.sampled_from(["", "org/", "-org/", "a/../"]))
def test_accepted_names_survive_the_loaders_command_line_and_the_file_system(client, model, organisation):
    model_id = organisation + model
    files, refusal = load({client: [model_id]}, None)
    if refusal is not None:
        return
    assert not client.startswith("-") and not model_id.startswith("-")
    assert is_file_name(client) and all(map(is_file_name, model_id.split("/")))
    assert argv_round_trip(files, client) == (client, [model_id])


@EXAMPLES
@given(text=st.text(max_size=10), value=ANYTHING)
def test_free_text_and_unknown_keys_come_back_exactly_as_given(text, value):
    agent = {"mps_memory_limit_gb": 1, "priority": text, "description": text, "x-" + text: value}
    section = {"version": text, "description": text, "generated": text, "agent_allocations": {"a": agent},
               "monitoring": {text: value}, "mps_configuration": {"pipe_directory": text, "unknown": value}}
    document = {"mps_resource_allocation": section, "elsewhere": value}
    files, refusal = load({"a": ["org/m"]}, document)
    if is_whole(value) and not -2**63 <= value < 2**64:
        assert "is larger than any number this file can mean" in refusal  # wherever it is
        return
    assert refusal is None
    answer = mps_allocation(config_of(files))
    del answer["source"], answer["mps_resource_allocation"]["system_summary"]
    assert json.loads(json.dumps(answer)) == json.loads(json.dumps(document))


@EXAMPLES
@given(backend=ANYTHING | st.sampled_from(["default", "torch", "Torch", ""]))
def test_backend_is_one_of_the_two_or_refused(backend):
    allocation = {"mps_memory_limit_gb": 1, "backend": backend}
    files, refusal = load({"a": ["org/m"]}, {"mps_resource_allocation": {"agent_allocations": {"a": allocation}}})
    assert (refusal is None) == (backend in (None, "default", "torch")), refusal


@EXAMPLES
@given(keys=st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4))
def test_a_client_given_twice_in_the_model_map_is_refused(keys):
    text = "{" + ", ".join(f'"{key}": ["org/m"]' for key in keys) + "}"
    files, refusal = load(text, None)
    if len(set(keys)) == len(keys):
        assert refusal is None and list(files["clients"]) == keys
    else:
        assert "is given twice in one object" in refusal
