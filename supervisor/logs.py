"""One line per event: a short message, then key=value pairs (journald and grep friendly)."""

import logging
import os
import sys


def kv(message: str, **fields) -> str:
    """`kv("loader started", client="a b", pid=3)` -> 'loader started client="a b" pid=3'."""
    parts = [message]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def setup_logging() -> None:
    """Log to stderr; journald adds timestamps under systemd, so only add them on a terminal."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    stamp = "%(asctime)s " if sys.stderr.isatty() else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{stamp}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
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
