"""The wire format: bad states fail when decoded, the start arguments survive their command line,
and the largest state the limits allow fits the slot sized for it."""

import typing
import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_orchestrator.loaders import wire
from gpu_orchestrator.loaders.channel import Segment, SlotReader, SlotWriter
from gpu_orchestrator.loaders.store import NAME_MAX, StoreError, check_model_id
from gpu_orchestrator.loaders.lines import visible
from gpu_orchestrator.loaders.wire import (
    MAX_ERROR,
    MAX_MODEL_ID,
    MAX_NOTE,
    MAX_PATH,
    ArgsError,
    LoadCommand,
    LoaderArgs,
    LoaderState,
    ModelProgress,
    cap_text,
    decode_args,
    decode_command,
    encode_args,
    encode_command,
    slot_size_for,
)

BIGGEST_INT = 2**64 - 1  # msgpack's largest integer


def test_every_status_and_phase_name_is_a_value_of_its_literal():
    assert {wire.PENDING, wire.LOADING, wire.READY, wire.FAILED} == set(typing.get_args(wire.ModelStatus))
    assert {wire.IDLE, wire.WARMING_UP} == set(typing.get_args(wire.LoaderPhase))


@pytest.mark.parametrize("field, value", [("phase", "working"), ("phase", "ready"), ("status", "loaded")])
def test_an_unknown_phase_or_status_fails_when_decoded(field, value):
    state = {"type": "loader", "client": "c", "pid": 1, "generation": 1, "phase": "idle", "heartbeat": 0.0,
             "models": [{"model": "m", "status": "ready"}]}
    if field == "phase":
        state["phase"] = value
    else:
        state["models"][0]["status"] = value
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=LoaderState)


def test_commands_round_trip_one_line_each_and_a_bad_one_fails():
    command = LoadCommand(3, refresh=True, failed={"m": "killed it"})
    line = encode_command(command)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_command(line) == command
    with pytest.raises(msgspec.ValidationError):
        decode_command(b'{"type": "load", "generation": -1}')


def full_args(**changes) -> LoaderArgs:
    fields = dict(client="agent one", segment="gpu-orchestrator-1-0123456789abcdef", slot=7,
                  store_root="/srv/models", heartbeat_interval=0.5, models=["org/a", "b"],
                  base_model_dir="base", strict=False, hf_hub="/hub", memory_limit_bytes=2**30,
                  backend="torch", warmup_inference=True)
    return LoaderArgs(**(fields | changes))


@settings(max_examples=60, deadline=None)
@given(client=st.text(min_size=1), models=st.lists(st.text(min_size=1), max_size=4))
def test_start_arguments_round_trip_and_name_the_client_for_ps(client, models):
    args = full_args(client=client, models=models)
    argv = encode_args(args)
    assert argv[:2] == ["--client", client]
    assert decode_args(argv) == args


@pytest.mark.parametrize("argv, said", [
    ([], "expected --client NAME --args JSON"),
    (["--client", "c", "--model", "m", "--args", "{}"], "expected --client NAME --args JSON"),
    (["--client", "c", "--args", "not json"], "--args: JSON is malformed"),
    (["--client", "c", "--args", '{"type": "load", "generation": 1}'], "--args"),
    (["--client", "c", "--args", msgspec.json.encode(full_args(client="c")).decode().replace('"torch"', '"tf"')],
     "backend"),
    (["--client", "c", "--args", msgspec.json.encode(full_args(client="c", slot=-1)).decode()], "slot"),
    (["--client", "c", "--args", msgspec.json.encode(full_args(client="c", heartbeat_interval=0)).decode()],
     "heartbeat_interval"),
    (["--client", "c", "--args", msgspec.json.encode(full_args(client="c", memory_limit_bytes=0)).decode()],
     "memory_limit_bytes"),
    (["--client", "c", "--args", msgspec.json.encode(full_args(client="c")).decode()[:-1] + ', "extra": 1}'],
     "extra"),
    (["--client", "other", *encode_args(full_args(client="c"))[2:]], "differ"),
])
def test_start_arguments_not_as_written_are_refused_saying_what_is_wrong(argv, said):
    with pytest.raises(ArgsError, match=said.replace("-", r"\-")):
        decode_args(argv)


@settings(max_examples=200, deadline=None)
@given(text=st.text(), limit=st.integers(32, 300), keep_end=st.booleans())
def test_capped_texts_never_pass_their_limit_and_encode(text, limit, keep_end):
    capped = cap_text(text, limit, keep_end)
    assert len(capped.encode("utf-8")) <= limit  # strict: no lone surrogate is left
    shown = visible(text)  # control characters escaped: what a loader publishes reaches terminals
    if len(shown.encode("utf-8", "replace")) <= limit and not any("\ud800" <= c <= "\udfff" for c in text):
        assert capped == shown
    assert not any((ord(c) < 0x20 and c != "\t") or 0x7f <= ord(c) < 0xa0 for c in capped)  # no control left


def test_a_published_text_never_carries_a_terminal_control():
    """A file named x<ESC>[31mRED<ESC>]0;TITLE<BEL>.safetensors reached `status` and the gate's lines raw."""
    name = "x\x1b[31mRED\x1b]0;TITLE\x07.safetensors: bad\nline"
    assert cap_text(name, 200) == "x\\x1b[31mRED\\x1b]0;TITLE\\x07.safetensors: bad\\nline"
    assert cap_text("model\u202efdp.exe\u2028next, caf\u00e9", 200) == "model\\u202efdp.exe\\u2028next, caf\u00e9"


def test_a_cut_text_says_so_and_a_cut_path_keeps_its_end():
    assert cap_text("x" * 100, 40).endswith(" ...(truncated)")
    assert cap_text("/" + "d/" * 100 + "model", 40, keep_end=True).endswith("d/model")


def test_the_stores_name_limits_are_the_slots():
    assert wire.MAX_CLIENT == NAME_MAX
    longest = ("m" * 240 + "/") * 4 + "x" * (MAX_MODEL_ID - 964)
    check_model_id(longest)
    with pytest.raises(StoreError, match=f"longer than {MAX_MODEL_ID} bytes"):
        check_model_id(longest + "x")


def largest_state(models: int) -> LoaderState:
    """Every field at the most the limits allow, every text in 4-byte characters where it may be."""
    wide = "\U0001F600"
    entries = [ModelProgress(
        model=("m" * 240 + "/") * 4 + "x" * (MAX_MODEL_ID - 964),  # the longest id check_model_id takes
        status="failed", path=cap_text(wide * MAX_PATH, MAX_PATH, keep_end=True),
        format="bin+gguf+onnx+pt+pth+safetensors", bytes_done=BIGGEST_INT, bytes_total=BIGGEST_INT,
        weight_bytes=BIGGEST_INT, parameters=BIGGEST_INT, seconds=1e308, verified=True, backend="torch",
        device="cuda:0", device_memory_bytes=BIGGEST_INT, embedding_dim=BIGGEST_INT,
        note=cap_text(wide * MAX_NOTE, MAX_NOTE), error=cap_text(wide * MAX_ERROR, MAX_ERROR))
        for _ in range(models)]
    return LoaderState(client="c" * wire.MAX_CLIENT, pid=2**22, generation=BIGGEST_INT, phase="loading",
                       heartbeat=1e308, models=entries)


@pytest.mark.parametrize("models", [0, 1, 2, 10, 100])
def test_the_largest_legal_state_fits_the_slot_sized_for_it(models):
    state = largest_state(models)
    assert all(len(m.model.encode()) == MAX_MODEL_ID for m in state.models)
    segment = Segment.create(f"gpu-orchestrator-test-{uuid.uuid4().hex[:8]}", 1, slot_size_for(models))
    try:
        SlotWriter(segment, 0).publish(state)  # raises if it does not fit
        assert SlotReader(segment, LoaderState).read(0) == state
    finally:
        segment.close()


def test_the_largest_arguments_the_configuration_accepts_fit_one_command_line_argument():
    # The configuration refuses a client whose model ids pass MODELS_ROOM (tests/unit/test_config.py);
    # everything else is bounded too: paths by PATH_MAX, names by NAME_MAX.
    models, size = [], 2
    while size + 103 <= wire.MODELS_ROOM:
        models.append(f"org/m{len(models):06d}-" + "x" * 88)
        size += len(models[-1]) + 3
    path = "/" + "p" * 4095
    args = wire.LoaderArgs(client="c" * NAME_MAX, segment="gpu-orchestrator-4194304-" + "f" * 16, slot=10**6,
                           store_root=path, models=models, base_model_dir=path, hf_hub=path,
                           memory_limit_bytes=2**63 - 1, heartbeat_interval=1e-300, warmup_inference=True)
    longest = max(map(len, (a.encode() for a in wire.encode_args(args))))
    assert wire.MODELS_ROOM - 103 < len(msgspec.json.encode(models)) <= wire.MODELS_ROOM
    assert longest < wire.MAX_ARGUMENT


def test_arguments_with_a_byte_that_is_not_utf8_are_refused_as_arguments():
    argv = ["--client", "a", "--args", '{"type": "loader-args", "client": "a", "store_root": "/s\udcff"}']
    with pytest.raises(wire.ArgsError, match="--args: "):
        wire.decode_args(argv)
