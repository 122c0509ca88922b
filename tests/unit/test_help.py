"""--version, and every command's --help ending with its environment and exit codes."""

import os
import subprocess
import sys
from importlib import metadata

import pytest

from gpu_orchestrator.supervisor.commands import cli, clientenv, helptext


def run(*args):
    return subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", *args],
                          capture_output=True, text=True, timeout=60)


def test_version():
    shown = run("--version")
    assert (shown.returncode, shown.stdout) == (0, f"gpu-orchestrator {metadata.version('gpu-orchestrator')}\n")


def test_every_command_has_its_help_text():
    assert set(helptext.COMMANDS) == set(cli.build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", sorted(helptext.COMMANDS))
def test_help_lists_environment_and_exit_codes(command):
    shown = run(command, "--help")
    assert shown.returncode == 0, shown.stderr
    environment, exits = helptext.COMMANDS[command]
    assert shown.stdout.endswith(helptext.epilog(command) + "\n")
    assert all(name in shown.stdout for name in environment)
    assert all(f"  {code:<3}  " in shown.stdout for code in exits)


def test_the_exit_codes_listed_are_the_ones_the_code_returns():
    serve_exits, client_exits = helptext.COMMANDS["serve"][1], helptext.COMMANDS["exec"][1]
    assert {cli.EX_USAGE, os.EX_UNAVAILABLE, os.EX_OSERR, os.EX_CONFIG} <= set(serve_exits)
    assert {os.EX_NOUSER, os.EX_UNAVAILABLE, os.EX_TEMPFAIL, clientenv.EX_NOT_FOUND} <= set(client_exits)
    assert {os.EX_NOUSER, cli.EX_BROKEN_PIPE} <= set(helptext.COMMANDS["status"][1])
