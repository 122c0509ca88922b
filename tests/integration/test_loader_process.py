"""The loader as a real process: commands on stdin, state in its slot, prompt exits."""

import os
import signal
import subprocess
import sys
import uuid

import msgspec
import pytest
from support import add_model, wait_for, write_sparse_model

from gpu_orchestrator.loaders.channel import Segment, SlotReader
from gpu_orchestrator.loaders.wire import LoadCommand, LoaderArgs, LoaderState, encode_args, encode_command

BIG = 4 * 1024**3  # sparse: costs no disk, takes a while to read


@pytest.fixture
def segment():
    seg = Segment.create(f"gpu-orchestrator-test-{uuid.uuid4().hex[:8]}", slots=2, slot_size=32768)
    yield seg
    seg.close()


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    add_model(root, "org/small", manifest=True)
    write_sparse_model(root / "org" / "big", BIG)
    return root


def start_loader(segment, store, models, **extra):
    args = LoaderArgs(client="c", segment=segment.name, slot=1, store_root=str(store), strict=True,
                      models=models, **extra)
    return start_loader_with([sys.executable, "-m", "gpu_orchestrator.loaders", *encode_args(args)])


def start_loader_with(argv):
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def send(proc, generation, refresh=False):
    proc.stdin.write(encode_command(LoadCommand(generation, refresh)))
    proc.stdin.flush()


def slot_state(segment):
    return SlotReader(segment, LoaderState).read(1)


def settled(segment, generation):
    state = slot_state(segment)
    return state if state and state.generation == generation and state.phase == "idle" else None


@pytest.fixture
def cleanup():
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_cannot_boot_exits_78_with_the_reason(segment, tmp_path):
    proc = start_loader(segment, tmp_path / "missing", ["org/small"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 78
    assert b"cannot boot" in err and b"is not a directory" in err


@pytest.mark.parametrize("args, said", [
    (["--client", "c"], b"expected --client NAME --args JSON"),
    (["--client", "c", "--args", '{"type": "loader-args", "client": "c"}'], b"missing required field"),
    (["--client", "c", "--args", '{"type": "loader-args", "client": "c", "segment": "s", "slot": -1, '
      '"store_root": "/"}'], b"Expected `int` >= 0"),
    (["--client", "d", "--args", msgspec.json.encode(LoaderArgs(client="c", segment="s", slot=0, store_root="/"))],
     b"differ"),
    (["--client", "c", "--args", '{"type": "loader-args", "client": "c", "segment": "s\\u0000x", "slot": 0, '
      '"store_root": "/"}'], b"null byte"),
    (["--client", "c", "--args", '{"type": "loader-args", "client": "c", "segment": "s", "slot": 0, '
      '"store_root": "/\udcff"}'], b"--args: "),
])
def test_arguments_not_as_the_supervisor_writes_them_exit_78_saying_what_is_wrong(args, said):
    proc = start_loader_with([sys.executable, "-m", "gpu_orchestrator.loaders", *args])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 78
    assert b"cannot boot" in err and said in err, err


def test_its_command_line_names_its_client_for_ps(segment, store, cleanup):
    proc = start_loader(segment, store, ["org/small"])
    cleanup.append(proc)
    wait_for(lambda: slot_state(segment), what="first publish")
    with open(f"/proc/{proc.pid}/cmdline", "rb") as handle:
        cmdline = handle.read().split(b"\0")
    assert cmdline[cmdline.index(b"--client") + 1] == b"c"


def test_loads_on_command_and_reports_each_model(segment, store, cleanup):
    proc = start_loader(segment, store, ["org/small", "org/missing"])
    cleanup.append(proc)
    first = wait_for(lambda: slot_state(segment), what="first publish")
    assert first.pid == proc.pid and [m.status for m in first.models] == ["pending", "pending"]
    send(proc, 1)
    state = wait_for(lambda: settled(segment, 1), what="generation 1")
    small, missing = state.models
    assert small.status == "ready" and small.verified and small.bytes_done == small.bytes_total > 0
    assert small.parameters > 0 and small.format == "safetensors"
    assert missing.status == "failed" and "tried:" in missing.error and "org/missing" in missing.error


def test_with_its_lines_held_back_a_finished_warm_up_still_wakes_the_supervisor(segment, store, cleanup):
    """The supervisor's loop wakes on a loader's stderr; at LOG_LEVEL=WARNING the 'warm-up
    finished' line is held back, so an empty line (which the supervisor drops) must come instead."""
    args = LoaderArgs(client="c", segment=segment.name, slot=1, store_root=str(store), strict=True,
                      models=["org/small"])
    proc = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.loaders", *encode_args(args)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "LOG_LEVEL": "WARNING"})
    cleanup.append(proc)
    send(proc, 1)
    wait_for(lambda: settled(segment, 1), what="generation 1")
    proc.stdin.close()  # EOF: the loader exits, and its stderr ends
    said = proc.stderr.read()
    assert proc.wait(10) == 0
    assert b"warm-up finished" not in said and said.split(b"\n").count(b"") >= 2, said  # an empty line


def test_refresh_reloads_ready_models_and_plain_load_does_not(segment, store, cleanup):
    proc = start_loader(segment, store, ["org/small"])
    cleanup.append(proc)
    send(proc, 1)
    assert wait_for(lambda: settled(segment, 1), what="generation 1").models[0].status == "ready"
    (store / "org" / "small" / "vocab.txt").write_text("changed")
    send(proc, 2)
    assert wait_for(lambda: settled(segment, 2)).models[0].status == "ready"  # not re-read
    send(proc, 3, refresh=True)
    refreshed = wait_for(lambda: settled(segment, 3)).models[0]
    assert refreshed.status == "failed" and "checksum mismatch" in refreshed.error


def test_model_over_the_memory_limit_is_refused_before_reading(segment, store, cleanup):
    proc = start_loader(segment, store, ["org/big"], memory_limit_bytes=1024**3)
    cleanup.append(proc)
    send(proc, 1)
    big = wait_for(lambda: settled(segment, 1)).models[0]
    assert big.status == "failed" and big.bytes_done == 0
    assert "limit is 1.00 GiB" in big.error


@pytest.mark.parametrize("how", ["sigterm", "stdin-eof"])
def test_exits_promptly_in_the_middle_of_a_read(segment, store, cleanup, how):
    proc = start_loader(segment, store, ["org/big"])
    cleanup.append(proc)
    send(proc, 1)
    wait_for(lambda: (s := slot_state(segment)) and 0 < s.models[0].bytes_done < BIG // 2,
             interval=0.001, what="the big read to be under way")
    os.kill(proc.pid, signal.SIGSTOP)  # freeze it mid-read, so the test cannot race the read
    if how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        proc.stdin.close()
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=10) == 0
    state = slot_state(segment)
    assert state.models[0].status == "loading" and state.models[0].bytes_done < BIG
    reason = b"signal SIGTERM" if how == "sigterm" else b"stdin closed"
    assert reason in proc.stderr.read()


# What a loader must not import: it keeps it for its whole life, one copy per client. The
# supervisor's and HTTP's packages, psutil, logging; OpenSSL (hashlib) and zipfile unless a model
# needs them; typing_extensions, which msgspec would take and which brings inspect, ast, dis and
# tokenize (1.3 MiB a loader).
UNWANTED = {"psutil", "hashlib", "_hashlib", "zipfile", "logging", "threading", "argparse", "secrets",
            "dataclasses", "falcon", "waitress", "prometheus_client", "pynvml",
            "typing_extensions", "inspect", "ast", "dis", "tokenize"}


def unwanted_in(loaded: set[str]) -> set[str]:
    return loaded & UNWANTED | {m for m in loaded if m.startswith(("gpu_orchestrator.supervisor",
                                                                   "gpu_orchestrator.http"))}


def test_a_loader_imports_only_what_it_needs():
    code = ("import sys, gpu_orchestrator.loaders.__main__; print(' '.join(sys.modules));"
            "assert sys.modules.get('typing_extensions', 1) is not None, 'typing_extensions left hidden'")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=60).stdout.split())
    assert not unwanted_in(loaded)


def test_a_loader_after_a_warm_up_has_imported_only_what_it_needs(segment, tmp_path, cleanup):
    """The loader as the supervisor runs it (`-m`, through runpy), a warm-up done, then orphaned:
    what its sys.modules held as it exited."""
    root = tmp_path / "store"
    add_model(root, "org/one")  # no manifest: hashlib stays out
    modules = tmp_path / "modules"
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: open({str(modules)!r}, 'w').write(' '.join(sys.modules)))\n"
            "runpy.run_module('gpu_orchestrator.loaders', run_name='__main__', alter_sys=True)\n")
    args = LoaderArgs(client="c", segment=segment.name, slot=1, store_root=str(root), strict=True, models=["org/one"])
    proc = start_loader_with([sys.executable, "-c", code, *encode_args(args)])
    cleanup.append(proc)
    send(proc, 1)
    assert [m.status for m in wait_for(lambda: settled(segment, 1)).models] == ["ready"]
    proc.stdin.close()  # orphaned: it exits 0, and its atexit writes what it imported
    assert proc.wait(30) == 0
    loaded = set(modules.read_text().split())
    assert "gpu_orchestrator.loaders.backends" in loaded  # the list is the loader's
    assert not unwanted_in(loaded)


def test_after_a_warm_up_nothing_of_the_models_stays_open_or_loaded(segment, tmp_path, cleanup):
    root = tmp_path / "store"
    for name in ("org/one", "org/two"):
        add_model(root, name)  # no manifest: nothing to verify, so no OpenSSL
    proc = start_loader(segment, root, ["org/one", "org/two"])
    cleanup.append(proc)
    send(proc, 1)
    assert [m.status for m in wait_for(lambda: settled(segment, 1)).models] == ["ready", "ready"]
    open_files = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
    assert not [f for f in open_files if f.startswith(str(root))]
    with open(f"/proc/{proc.pid}/maps") as maps:
        mapped = maps.read()
    assert "libcrypto" not in mapped and "_hashlib" not in mapped


def test_sighup_is_ignored_so_pkill_hup_meant_for_the_supervisor_spares_loaders(segment, store, cleanup):
    # `pkill -HUP -f gpu-orchestrator` matches every loader's command line; SIGHUP once killed them all.
    proc = start_loader(segment, store, ["org/small"])
    cleanup.append(proc)
    wait_for(lambda: slot_state(segment), what="the loader's first heartbeat")
    os.kill(proc.pid, signal.SIGHUP)  # idle
    send(proc, 1)
    assert wait_for(lambda: settled(segment, 1)).models[0].status == "ready"
    os.kill(proc.pid, signal.SIGHUP)
    send(proc, 2)
    wait_for(lambda: settled(segment, 2), what="a second warm-up after SIGHUP")
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
