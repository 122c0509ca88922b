"""The wire format between the supervisor and its loaders, and the only place it is encoded and
decoded: a loader's start arguments (LoaderArgs, on its command line), its commands (LoadCommand,
a JSON line on its stdin) and its state (LoaderState, in its shared-memory slot; channel.py moves
the bytes). Every state is a Literal, so a bad value fails when it is decoded, not later. The HTTP
API's answer shapes, which no loader reads, are in supervisor/commands/api.py.

No project imports and nothing but msgspec, so a loader can import it cheaply.
"""

import os
from typing import Annotated, Literal

import msgspec

from gpu_orchestrator.loaders.lines import visible

# A model's status, in the order a warm-up moves it through them (the values /models/status shows).
ModelStatus = Literal["pending", "loading", "ready", "failed"]
PENDING: ModelStatus = "pending"
LOADING: ModelStatus = "loading"
READY: ModelStatus = "ready"
FAILED: ModelStatus = "failed"

# A loader's phase: warming up a generation, or idle after it. WARMING_UP's value is "loading",
# as it always was on the wire; its name says it is a loader's phase, not a model's status.
LoaderPhase = Literal["idle", "loading"]
IDLE: LoaderPhase = "idle"
WARMING_UP: LoaderPhase = "loading"

Backend = Literal["default", "torch"]

# Exit status a loader uses when it cannot boot (bad arguments, no store, no
# channel): restarting cannot help, so the supervisor goes straight to FATAL.
EXIT_CANNOT_BOOT = os.EX_CONFIG  # 78

# What one model's entry may hold at most, in UTF-8 bytes: the loader caps the texts it writes
# (cap_text) and the configuration refuses longer model ids, so slot_size_for is always enough.
MAX_ERROR = 4096
MAX_MODEL_ID = 1024
MAX_PATH = 1024  # a longer snapshot path is shown by its end
MAX_NOTE = 512
MAX_CLIENT = 255  # a client name is a file name
SLOT_HEADER_ROOM = 16 * 1024  # the state's own fields, the slot header and slack
MODEL_ROOM = MAX_ERROR + MAX_MODEL_ID + MAX_PATH + MAX_NOTE + 512  # + numbers, format, device, keys


def slot_size_for(max_models: int) -> int:
    """Room for a client's largest legal state: every model at its longest texts (page-rounded)."""
    return (SLOT_HEADER_ROOM + max_models * MODEL_ROOM + 4095) // 4096 * 4096


def cap_text(text: str, limit: int, keep_end: bool = False) -> str:
    """`text` in at most `limit` UTF-8 bytes, cut between characters and marked where it was cut
    (its end kept with `keep_end`); a lone surrogate (an undecodable file name byte) becomes '?',
    which any encoder takes, and a control character its escape: what a loader publishes reaches
    terminals (`status`, the gate's lines) and logs."""
    data = visible(text).encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode("utf-8")
    if keep_end:
        return "..." + data[len(data) - (limit - 3):].decode("utf-8", "ignore")
    mark = " ...(truncated)"
    return data[: limit - len(mark)].decode("utf-8", "ignore") + mark


class ModelProgress(msgspec.Struct, omit_defaults=True):
    model: str
    status: ModelStatus = PENDING
    path: str | None = None
    format: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    weight_bytes: int = 0
    parameters: int | None = None
    seconds: float = 0.0
    verified: bool = False
    backend: Backend = "default"
    device: str | None = None  # torch backend: where the weights went
    device_memory_bytes: int | None = None  # torch backend: what they took there
    embedding_dim: int | None = None  # torch backend with warm-up inference
    note: str | None = None
    error: str | None = None

    def rate_and_eta(self) -> tuple[float | None, float | None]:
        """(bytes per second, seconds left) of a model being read, from its own bytes and seconds so
        far (its loader counts `seconds` from when it began this model, so a restarted loader's
        model is timed from its restart); None before anything has been read."""
        if self.status != LOADING or self.bytes_done <= 0 or self.seconds <= 0:
            return None, None
        rate = self.bytes_done / self.seconds
        return rate, max(0, self.bytes_total - self.bytes_done) / rate


class LoaderState(msgspec.Struct, tag="loader"):
    """What a loader publishes to its slot: who it is, which warm-up, how far."""

    client: str
    pid: int
    generation: int
    phase: LoaderPhase
    heartbeat: float  # time.monotonic(): CLOCK_MONOTONIC is shared by all processes
    models: list[ModelProgress]


class LoadCommand(msgspec.Struct, tag="load"):
    """Supervisor -> loader, one JSON line on the loader's stdin."""

    generation: Annotated[int, msgspec.Meta(ge=0)]
    refresh: bool = False
    failed: dict[str, str] = {}  # model -> why the supervisor failed it: report that, do not load it


class LoaderArgs(msgspec.Struct, tag="loader-args", kw_only=True, forbid_unknown_fields=True):
    """Everything a loader starts with, as one JSON argument (see encode_args)."""

    client: str
    segment: str  # the shared-memory segment's name under /dev/shm
    slot: Annotated[int, msgspec.Meta(ge=0)]
    store_root: str
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    models: list[str] = []
    base_model_dir: str | None = None
    strict: bool = False
    hf_hub: str | None = None
    memory_limit_bytes: Annotated[int, msgspec.Meta(gt=0)] | None = None
    backend: Backend = "default"
    warmup_inference: bool = False


# Linux caps one command-line argument at 128 KiB (MAX_ARG_STRLEN) and --args is one: the
# configuration refuses a client whose model ids take more than MODELS_ROOM of it, which leaves
# room for the three paths (PATH_MAX each) and the rest, rather than a loader exec failing later.
MAX_ARGUMENT = 128 * 1024
MODELS_ROOM = 96 * 1024


class ArgsError(ValueError):
    """A loader's command line is not what encode_args writes."""


def encode_args(args: LoaderArgs) -> list[str]:
    """The loader's command line: `--client NAME` first, so `ps` and pgrep find a client's
    loader, then `--args JSON`, which says everything (the client again: they must agree)."""
    return ["--client", args.client, "--args", msgspec.json.encode(args).decode()]


def decode_args(argv: list[str]) -> LoaderArgs:
    """The LoaderArgs that encode_args wrote into `argv`; ArgsError, saying what is wrong, if not."""
    if len(argv) != 4 or argv[0] != "--client" or argv[2] != "--args":
        raise ArgsError(f"expected --client NAME --args JSON (as the supervisor writes them), got {argv!r}")
    try:
        args = msgspec.json.decode(argv[3], type=LoaderArgs)
    except (msgspec.DecodeError, UnicodeError) as exc:  # a byte that is not UTF-8 arrives as a surrogate
        raise ArgsError(f"--args: {exc}") from None
    if args.client != argv[1]:
        raise ArgsError(f"--client {argv[1]!r} and --args' client {args.client!r} differ")
    return args


_COMMAND_DECODER = msgspec.json.Decoder(LoadCommand)


def encode_command(command: LoadCommand) -> bytes:
    """One line for the loader's stdin."""
    return msgspec.json.encode(command) + b"\n"


def decode_command(line: bytes) -> LoadCommand:
    """The command on one stdin line; msgspec.DecodeError when it is not one."""
    return _COMMAND_DECODER.decode(line)
