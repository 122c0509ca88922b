"""sd_notify with the standard library: one datagram per message to $NOTIFY_SOCKET; and a client
name read back from a unit's instance.

Without NOTIFY_SOCKET (not under systemd, or Type=simple) every call does nothing.
"""

import logging
import os
import re
import socket
import time

from gpu_orchestrator.loaders.logs import kv

log = logging.getLogger("supervisor")


def unit_instance(name: str) -> str:
    """A client name from a systemd unit's instance (%i): systemd writes a byte it does not keep
    in unit names (a space, a non-ASCII letter) as \\xNN; the name is what those bytes spell."""
    if "\\x" not in name:
        return name
    try:
        return re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), name.encode()).decode()
    except UnicodeError:  # not UTF-8 either way: left for the name's own check to refuse
        return name


def unit_form(name: str) -> str:
    """`name` as it stands in a unit's name: each byte systemd does not keep there (anything but
    ASCII letters, digits, ':', '_', '.' and '-') written as \\xNN, which unit_instance reads back."""
    return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in ":_.-") else f"\\x{b:02x}"
                   for b in name.encode())


def watchdog_interval(env) -> float | None:
    """Half-way safe ping period: a third of WATCHDOG_USEC, if the watchdog is meant for us."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 3 / 1_000_000


class Notifier:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # A leading '@' names a Linux abstract socket, which starts with a NUL byte.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_interval(env) if self.address else None
        self.next_watchdog = time.monotonic()
        self.last_status = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if self.address else None
        self.failed = False

    def send(self, *assignments: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self.failed:  # say it once; systemd may simply be gone
                log.warning(kv("sd_notify failed", socket=self.address.replace("\0", "@"), error=exc))
                self.failed = True

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.last_status = status
            self.send(f"STATUS={status}")

    def reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) wants the monotonic time with RELOADING=1.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def watchdog_due(self, now: float) -> bool:
        return self.watchdog_interval is not None and now >= self.next_watchdog

    def ping_watchdog(self, now: float) -> None:
        self.send("WATCHDOG=1")
        self.next_watchdog = now + self.watchdog_interval

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
