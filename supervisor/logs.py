"""One line per event: a short message, then key=value pairs (journald and grep friendly)."""

import logging
import os
import sys
import threading


def kv(message: str, **fields) -> str:
    """`kv("loader started", client="a b", pid=3)` -> 'loader started client="a b" pid=3'."""
    parts = [message]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class OneLineFormatter(logging.Formatter):
    """A record with a traceback (or a message spanning lines) stays one line: a loader's stderr is
    relayed line by line, and journald greps line by line, so a second line would become a second,
    level-less event."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")


def log_uncaught(exc_type, exc, tb) -> None:
    logging.getLogger("uncaught").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def setup_logging() -> None:
    """Log to stderr; journald adds timestamps under systemd, so only add them on a terminal.
    Every event is one line at its level: uncaught exceptions and warnings go through logging too,
    instead of Python's multi-line printouts."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    stamp = "%(asctime)s " if sys.stderr.isatty() else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"{stamp}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
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
