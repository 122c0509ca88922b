import logging
import os
import subprocess
import sys

import pytest

from gpu_orchestrator.loaders.logs import kv, relay_line, setup_logging


def test_a_log_line_escapes_every_control_character(capsys):
    """The supervisor's lines and a loader's: ESC and BEL from a file name never reach a terminal raw."""
    from gpu_orchestrator.loaders.lines import LineLog
    from gpu_orchestrator.loaders.logs import OneLineFormatter
    record = logging.LogRecord("supervisor", logging.WARNING, __file__, 1, "left x\x1b[31m\x07 alone\n", (), None)
    assert OneLineFormatter("%(message)s").format(record) == "left x\\x1b[31m\\x07 alone\\n"
    LineLog("loader").write("ERROR", "bad \x1b]0;T\x07\r")
    assert capsys.readouterr().err == "ERROR loader: bad \\x1b]0;T\\x07\\r\n"


def test_kv_quotes_only_what_needs_it():
    assert kv("loader started", client="a", pid=3) == "loader started client=a pid=3"
    assert kv("failed", error='no "x" here\nnext') == 'failed error="no \\"x\\" here\\nnext"'
    assert kv("empty", reason="") == 'empty reason=""'


def test_waitress_queue_depth_warnings_are_silenced():
    setup_logging()
    assert not logging.getLogger("waitress.queue").isEnabledFor(logging.WARNING)
    assert logging.getLogger("waitress").isEnabledFor(logging.WARNING)


def test_relayed_lines_keep_their_level(caplog):
    logger = logging.getLogger("loader")
    with caplog.at_level(logging.INFO, logger="loader"):
        relay_line(logger, "ERROR loader: model failed client=a")
        relay_line(logger, "a traceback line")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "model failed client=a"), (logging.INFO, "a traceback line")]


def test_log_level_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LOG_LEVEL", "warning")
    setup_logging()
    assert logging.getLogger().level == logging.WARNING
    monkeypatch.setenv("LOG_LEVEL", "")  # set but empty, as an EnvironmentFile line `LOG_LEVEL=` leaves it
    setup_logging()
    assert logging.getLogger().level == logging.INFO


@pytest.mark.parametrize("command", [["serve", "--model-store", "/nonexistent"], ["status"], ["gate"]])
def test_an_invalid_log_level_is_refused_at_start_with_exit_78(command):
    refused = subprocess.run([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.cli", *command],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LOG_LEVEL": "verbose", "GPU_ORCHESTRATOR_PORT": "1"})
    assert refused.returncode == 78 and refused.stdout == ""
    assert refused.stderr == ("gpu-orchestrator: configuration error: LOG_LEVEL: expected one of DEBUG, INFO, "
                              "WARNING, ERROR, CRITICAL, got 'verbose'\n")


JOURNALED = """
import logging, sys
from gpu_orchestrator.loaders.logs import setup_logging
setup_logging()
log = logging.getLogger("supervisor")
log.debug("d"); log.info("i"); log.warning("w"); log.error("e"); log.critical("c")
"""


@pytest.mark.parametrize("same_file", [True, False])
def test_journald_gets_each_lines_priority_only_when_stderr_is_the_journal(tmp_path, same_file):
    """systemd's JOURNAL_STREAM names stderr's device and inode; a pipe or file elsewhere (as a
    loader's stderr is) gets plain lines even though it inherits the variable."""
    journal, elsewhere = tmp_path / "journal", tmp_path / "elsewhere"
    journal.touch()
    identity = os.stat(journal)
    with open(journal if same_file else elsewhere, "wb") as stderr:
        subprocess.run([sys.executable, "-c", JOURNALED], stderr=stderr, timeout=60, check=True,
                       env={**os.environ, "LOG_LEVEL": "DEBUG",
                            "JOURNAL_STREAM": f"{identity.st_dev}:{identity.st_ino}"})
    lines = (journal if same_file else elsewhere).read_text().splitlines()
    plain = ["DEBUG supervisor: d", "INFO supervisor: i", "WARNING supervisor: w", "ERROR supervisor: e",
             "CRITICAL supervisor: c"]
    if same_file:
        assert lines == [f"<{p}>{line}" for p, line in zip((7, 6, 4, 3, 2), plain)]
    else:
        assert lines == plain


CHILD = """
import json, logging, warnings
from gpu_orchestrator.loaders.logs import setup_logging
setup_logging()
log = logging.getLogger("loader")
try:
    json.loads('{"shape": [' + "9" * 5000 + ']}')
except ValueError:
    log.exception("unexpected error loading a model client=a")
warnings.warn("a framework complains\\nover two lines")
log.info("model ready client=a")
raise RecursionError("maximum recursion depth exceeded\\nwhile decoding")
"""


def test_a_childs_tracebacks_are_one_event_each_at_their_level(caplog):
    """What a loader writes: an exception with its traceback, a warning, an uncaught exception."""
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "LOG_LEVEL": "INFO"})
    assert child.returncode == 1
    logger = logging.getLogger("relayed")
    with caplog.at_level(logging.DEBUG, logger="relayed"):
        for line in child.stderr.splitlines():
            relay_line(logger, line)
    events = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in events] == ["ERROR", "WARNING", "INFO", "CRITICAL"], child.stderr
    assert events[0][1].startswith("unexpected error loading a model client=a\\nTraceback (most recent call last):")
    assert "Exceeds the limit (4300 digits)" in events[0][1]
    assert "a framework complains\\nover two lines" in events[1][1]
    assert events[3][1].startswith("uncaught exception\\nTraceback") and "RecursionError" in events[3][1]


LOADER_CHILD = """
import _thread, json, sys, warnings
from gpu_orchestrator.loaders.lines import LineLog, kv
log = LineLog("loader")
log.take_over_uncaught()
log.info("below the level")
try:
    json.loads('{"shape": [' + "9" * 5000 + ']}')
except ValueError:
    log.exception(kv("unexpected error loading a model", client="a b"))
warnings.warn("a framework complains\\nover two lines")
reported = _thread.allocate_lock()
reported.acquire()
hook = sys.unraisablehook
def report_then_tell(args):
    hook(args)
    reported.release()
sys.unraisablehook = report_then_tell
def beat():
    raise ValueError("in the heartbeat thread")
_thread.start_new_thread(beat, ())
reported.acquire()  # the thread's exception has been written
log.error("model failed client=a")
raise RecursionError("maximum recursion depth exceeded\\nwhile decoding")
"""


def test_a_loaders_lines_are_what_the_logging_handler_writes_one_event_each(caplog):
    """A loader writes its lines without the logging package; the supervisor must read them the same."""
    child = subprocess.run([sys.executable, "-c", LOADER_CHILD], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "LOG_LEVEL": "warning"})
    assert child.returncode == 1
    assert all(line.split(" ", 1)[0] in ("ERROR", "WARNING", "CRITICAL") for line in child.stderr.splitlines())
    logger = logging.getLogger("relayed")
    with caplog.at_level(logging.DEBUG, logger="relayed"):
        for line in child.stderr.splitlines():
            relay_line(logger, line)
    events = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in events] == ["ERROR", "WARNING", "CRITICAL", "ERROR", "CRITICAL"], child.stderr
    assert events[0][1].startswith('unexpected error loading a model client="a b"\\nTraceback (most recent call last):')
    assert "a framework complains\\nover two lines" in events[1][1]
    assert "ValueError: in the heartbeat thread" in events[2][1]
    assert events[4][1].startswith("uncaught exception\\nTraceback") and "RecursionError" in events[4][1]
