"""One line per event: a short message, then key=value pairs (journald and grep friendly), through
the logging package (the supervisor's; a loader writes the same lines with lines.LineLog)."""

import logging
import os
import sys
import threading

from gpu_orchestrator.loaders import lines

LEVELS = lines.LEVELS
kv = lines.kv  # its home is lines.py, where a loader takes it from without the logging package


class LogLevelError(ValueError):
    """LOG_LEVEL names no level: refused at start rather than silently logging at INFO."""


def syslog_priority(level: int) -> int:
    """journald's priority for a logging level: crit 2, err 3, warning 4, info 6, debug 7."""
    for threshold, priority in ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6)):
        if level >= threshold:
            return priority
    return 7


def stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM=DEVICE:INODE when it connects stderr to the journal; a child
    that inherits the variable but writes to a pipe (a loader) must not take it for itself."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (stat.st_dev, stat.st_ino)
    except (ValueError, OSError, AttributeError):  # unset or malformed, or no stderr at all
        return False


def for_stderr(line: str, level: int = logging.ERROR) -> str:
    """A line printed to stderr without logging (a usage or configuration error), with its
    priority prefix when stderr is the journal, so `journalctl -p err` finds it too. One line even
    when it quotes a value with a newline in it (a path from an env file)."""
    line = lines.visible(line)
    return f"<{syslog_priority(level)}>{line}" if stderr_is_journal() else line


class OneLineFormatter(logging.Formatter):
    """A record with a traceback (or a message spanning lines) stays one line: a loader's stderr is
    relayed line by line, and journald greps line by line, so a second line would become a second,
    level-less event. Written to the journal, each line starts with its syslog priority (`<3>`),
    which journald takes as the entry's priority and removes."""

    def __init__(self, fmt: str, journal: bool = False):
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = lines.visible(super().format(record))
        return f"<{syslog_priority(record.levelno)}>{line}" if self.journal else line


def log_uncaught(exc_type, exc, tb) -> None:
    logging.getLogger("uncaught").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def setup_logging() -> None:
    """Log to stderr; journald adds timestamps under systemd, so only add them on a terminal.
    Every event is one line at its level: uncaught exceptions and warnings go through logging too,
    instead of Python's multi-line printouts. Raises LogLevelError for a LOG_LEVEL that names no level."""
    level = (os.environ.get("LOG_LEVEL") or "INFO").upper()
    if level not in LEVELS:
        raise LogLevelError(f"LOG_LEVEL: expected one of {', '.join(LEVELS)}, got {os.environ['LOG_LEVEL']!r}")
    stamp = "%(asctime)s " if sys.stderr.isatty() else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"{stamp}%(levelname)s %(name)s: %(message)s", journal=stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = log_uncaught
    threading.excepthook = lambda args: log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)
    # waitress warns "Task queue depth is N" on every burst; that is load, not a fault.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def relay_line(logger: logging.Logger, line: str) -> None:
    """Re-log a child's 'LEVEL name: message' line at its level, through our handler."""
    level_name, _, rest = line.partition(" ")
    level = logging.getLevelNamesMapping().get(level_name)
    if level is None:
        logger.info(line)
    else:
        logger.log(level, rest.partition(": ")[2] or rest)
