"""scripts/mps-diag, gpu-check, bench and preflight.sh find gpu-orchestrator (scripts/lib.sh) where
README's install puts it, which is on no PATH, and say what they tried when it is nowhere."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Each wrapper and the gpu-orchestrator arguments it runs with `--x y`.
WRAPPERS = {"mps-diag": ["mps-diag"], "gpu-check": ["gpu-check"], "bench": ["bench"],
            "preflight.sh": ["gate"]}
BARE_PATH = "/usr/bin:/bin"  # env -i PATH=/usr/bin:/bin: what a unit or a fresh root shell has, no venv


def fake(path: Path, name: str) -> Path:
    """An executable standing in for gpu-orchestrator that says which copy ran, with what."""
    path.mkdir(parents=True, exist_ok=True)
    binary = path / "gpu-orchestrator"
    binary.write_text(f'#!/bin/sh\necho "{name} $*"\n')
    binary.chmod(0o755)
    return binary


def copied_scripts(tmp_path: Path) -> Path:
    """The wrappers and lib.sh as an operator copies them: no checkout, no .venv beside them."""
    scripts = tmp_path / "copy" / "scripts"
    scripts.mkdir(parents=True)
    for name in [*WRAPPERS, "lib.sh"]:
        shutil.copy2(REPO / "scripts" / name, scripts / name)
    return scripts


def run(script: Path, env: dict, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    args = ["--gate-only", "x"] if script.name == "preflight.sh" else ["--x", "y"]
    return subprocess.run([*(prefix or []), str(script), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": BARE_PATH, **env})


def expected(name: str, which: str) -> str:
    # preflight.sh puts the summaries where the operations doc says: ~/.cache/justnews/preflight.
    args = ["--summary-dir", f"{home()}/.cache/justnews/preflight", "x"] if name == "preflight.sh" else ["--x", "y"]
    return " ".join([which, *WRAPPERS[name], *args]) + "\n"


def home() -> str:
    """The home the wrappers find without HOME (run() passes only PATH): the password database's."""
    import pwd
    return pwd.getpwuid(os.getuid()).pw_dir


@pytest.mark.parametrize("name", WRAPPERS)
def test_each_source_in_order(tmp_path, name):
    scripts = copied_scripts(tmp_path)
    chosen = fake(tmp_path / "chosen", "GPU_ORCHESTRATOR_BIN")
    on_path = fake(tmp_path / "path", "PATH")
    checkout = fake(scripts.parent / ".venv" / "bin", "checkout")
    script = scripts / name
    assert run(script, {"GPU_ORCHESTRATOR_BIN": str(chosen), "PATH": f"{on_path.parent}:{BARE_PATH}"}).stdout == \
        expected(name, "GPU_ORCHESTRATOR_BIN")
    assert run(script, {"PATH": f"{on_path.parent}:{BARE_PATH}"}).stdout == expected(name, "PATH")
    assert run(script, {}).stdout == expected(name, "checkout")
    # A command name on PATH is a value GPU_ORCHESTRATOR_BIN has always taken.
    assert run(script, {"GPU_ORCHESTRATOR_BIN": "gpu-orchestrator", "PATH": f"{on_path.parent}:{BARE_PATH}"}).stdout \
        == expected(name, "PATH")
    assert checkout.exists()
    # A link to a wrapper still finds lib.sh and the checkout beside the real file.
    link = tmp_path / "elsewhere" / name
    link.parent.mkdir()
    link.symlink_to(script)
    assert run(link, {}).stdout == expected(name, "checkout")


@pytest.mark.parametrize("name", WRAPPERS)
def test_nothing_found_says_what_was_tried_and_exits_127(tmp_path, name):
    scripts = copied_scripts(tmp_path)
    result = run(scripts / name, {})
    assert result.returncode == 127 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    for tried in ("GPU_ORCHESTRATOR_BIN is unset", f"PATH ({BARE_PATH})",
                  str(scripts.parent / ".venv/bin/gpu-orchestrator"), "/opt/gpu-orchestrator/bin/gpu-orchestrator",
                  "set GPU_ORCHESTRATOR_BIN"):
        assert tried in line, line
    assert line.startswith(f"{name}: ")


@pytest.mark.parametrize("name", WRAPPERS)
def test_a_wrong_gpu_orchestrator_bin_is_named_not_worked_around(tmp_path, name):
    scripts = copied_scripts(tmp_path)
    fake(scripts.parent / ".venv" / "bin", "checkout")  # there, but an explicit setting wins
    for wrong in (str(tmp_path / "missing"), "/etc/passwd", str(tmp_path)):
        result = run(scripts / name, {"GPU_ORCHESTRATOR_BIN": wrong})
        assert result.returncode == 127 and result.stdout == "", result.stdout
        assert result.stderr == (f"{name}: GPU_ORCHESTRATOR_BIN={wrong} is neither an executable file nor a "
                                 "command on PATH; point it at gpu-orchestrator, e.g. "
                                 "/opt/gpu-orchestrator/bin/gpu-orchestrator\n")


def test_a_wrapper_copied_without_lib_sh_says_so(tmp_path):
    scripts = copied_scripts(tmp_path)
    (scripts / "lib.sh").unlink()
    result = run(scripts / "preflight.sh", {"GPU_ORCHESTRATOR_BIN": str(fake(tmp_path / "b", "bin"))})
    assert result.returncode == 127
    assert result.stderr == (f"preflight.sh: {scripts}/lib.sh is missing; copy scripts/lib.sh beside this script "
                             "(it finds gpu-orchestrator)\n")


def private_opt_works() -> bool:
    """Whether this host lets an unprivileged mount namespace bind a folder over /opt."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--map-root-user", "mount", "--bind", "/usr", "/opt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not private_opt_works(), reason="needs `unshare --mount --map-root-user` and a /opt to bind over")
@pytest.mark.parametrize("name", WRAPPERS)
def test_readmes_install_is_found_off_path(tmp_path, name):
    """/opt/gpu-orchestrator/bin/gpu-orchestrator, README's install, with nothing else there: a
    private mount namespace shows a folder of ours as /opt to the wrapper alone."""
    scripts = copied_scripts(tmp_path)
    opt = tmp_path / "opt"
    fake(opt / "gpu-orchestrator" / "bin", "opt")
    args = ["--gate-only", "x"] if name == "preflight.sh" else ["--x", "y"]
    result = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", 'mount --bind "$0" /opt && exec "$@"',
         str(opt), str(scripts / name), *args],
        capture_output=True, text=True, timeout=60, env={"PATH": BARE_PATH})
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(name, "opt")


def test_the_real_command_runs_from_this_checkouts_venv():
    """env -i PATH=/usr/bin:/bin scripts/mps-diag: the checkout's own .venv (what `make` creates), or
    GPU_ORCHESTRATOR_BIN when set: the real gpu-orchestrator answers either way."""
    venv_binary = Path(sys.executable).parent / "gpu-orchestrator"
    in_checkout = REPO / ".venv" / "bin" / "gpu-orchestrator"
    env = {"PATH": BARE_PATH}
    if not in_checkout.exists():  # tests run from another venv: name it
        env["GPU_ORCHESTRATOR_BIN"] = str(venv_binary)
    result = subprocess.run([str(REPO / "scripts" / "mps-diag"), "--help"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gpu-orchestrator mps-diag")
    result = subprocess.run([str(REPO / "scripts" / "preflight.sh"), "--gate-only", "--help"], capture_output=True,
                            text=True, timeout=60, env={**env, "GPU_ORCHESTRATOR_BIN": str(venv_binary)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gpu-orchestrator gate")
