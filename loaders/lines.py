"""One line per event without the logging package, which a loader need not load: kv() formats an
event, LineLog writes it as 'LEVEL name: message', the line logs.py's handler writes and
logs.relay_line reads back from a loader's stderr. No project imports."""

import os
import sys
import warnings

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}  # logging's numbers

# Every C0 and C1 control but tab, and DEL, as a visible escape: a line stays one line, and a file
# name holding ESC[31m or a BEL never recolours or retitles the terminal that shows a log or a status.
# The Unicode line separators and bidi overrides too: a log viewer breaks lines at the first, and
# the second show a name reversed ("model\u202efdp.exe").
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if c != 0x09} | {0x0a: "\\n", 0x0d: "\\r"} | {
    c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202a, 0x202f), *range(0x2066, 0x206a))}


def visible(text: str) -> str:
    """`text` with its control characters escaped (newline as \\n)."""
    return text if text.isprintable() else text.translate(_CONTROLS)


def kv(message: str, **fields) -> str:
    """`kv("loader started", client="a b", pid=3)` -> 'loader started client="a b" pid=3'."""
    parts = [message]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def formatted_exception(exc_type, exc, tb) -> str:
    import traceback  # only when there is one to write

    return "".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n")


class LineLog:
    """A loader's log: each event one line on stderr (its newlines escaped, so a traceback stays
    one event), at or above LOG_LEVEL (the supervisor refused a bad one before starting us)."""

    def __init__(self, name: str):
        self.name = name
        self.threshold = LEVELS.get((os.environ.get("LOG_LEVEL") or "INFO").upper(), LEVELS["INFO"])

    def write(self, level: str, message: str) -> None:
        if LEVELS[level] >= self.threshold:
            line = visible(f"{level} {self.name}: {message}")
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def info(self, message: str) -> None:
        self.write("INFO", message)

    def error(self, message: str) -> None:
        self.write("ERROR", message)

    def exception(self, message: str) -> None:
        """An error with the traceback of the exception being handled."""
        self.write("ERROR", message + "\n" + formatted_exception(*sys.exc_info()))

    def take_over_uncaught(self) -> None:
        """Uncaught exceptions (the main thread's; a _thread thread's, which Python hands to the
        unraisable hook) and warnings become one line each as well."""
        def uncaught(exc_type, exc, tb):
            self.write("CRITICAL", "uncaught exception\n" + formatted_exception(exc_type, exc, tb))

        def warning(message, category, filename, lineno, file=None, line=None):
            self.write("WARNING", warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))

        sys.excepthook = uncaught
        sys.unraisablehook = lambda args: uncaught(args.exc_type, args.exc_value, args.exc_traceback)
        warnings.showwarning = warning
