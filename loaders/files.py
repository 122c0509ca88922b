"""Opening a file that must be a regular one, without ever blocking: an operator's configuration
and pid files (the supervisor), a model snapshot's files (the loaders). Reads are bounded.

Opening a FIFO to read waits for a writer, for good (a signal interrupts nothing there: PEP 475
retries the call), a character device may never end, and a folder cannot be read: anything but a
regular file is refused (NotAFile) before it is opened, and again through the descriptor, which
is opened with O_NONBLOCK, in case the path was swapped meanwhile. A 1 GiB log costs one read of
the bytes asked for.
"""

import errno
import os
import stat

KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


class NotAFile(OSError):
    """Something other than a regular file (a FIFO, a socket, a folder) where a file belongs."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(f"{os.fspath(path)} is {kind}, not a regular file")
        self.kind = kind


def refuse_unless_regular(path: str | os.PathLike, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise NotAFile(path, KINDS.get(stat.S_IFMT(mode), "a special file"))


def open_regular(path: str | os.PathLike) -> int:
    """A descriptor of the regular file `path`, open for reading (blocking again: a regular file
    ignores it either way). OSError when it cannot be opened, NotAFile when it is not a regular file."""
    refuse_unless_regular(path, os.stat(path).st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # swapped for a socket, or a device without a driver, since the stat
            raise NotAFile(path, "a socket or a device") from None
        raise
    try:
        refuse_unless_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, limit: int, from_end: bool = False) -> tuple[bytes, bool]:
    """At most `limit` bytes of a regular file, its first or (from_end) its last, and whether
    that is all of it. OSError when it cannot be read, NotAFile when it is not a regular file."""
    fd = open_regular(path)
    try:
        info = os.fstat(fd)
        start = max(0, info.st_size - limit) if from_end else 0
        data = os.pread(fd, limit, start)
        whole = start == 0 and (from_end or len(data) < limit or not os.pread(fd, 1, limit))
    finally:
        os.close(fd)
    return data, whole


def read_tail(path: str | os.PathLike, limit: int) -> str:
    """The last `limit` bytes of a regular file as text, from its first whole line."""
    data, whole = read_regular(path, limit, from_end=True)
    text = data.decode(errors="replace")
    return text if whole else text.partition("\n")[2]


PID_MAX_LIMIT = 2**22  # the kernel's limit on /proc/sys/kernel/pid_max


def read_pid(path: str | os.PathLike) -> int:
    """The pid a daemon's pid file names; OSError when it cannot be read, ValueError when it names
    no process (garbage, 0, -1: psutil and kill() give -1 a meaning of their own)."""
    text = read_tail(path, 64).strip()
    # ASCII digits only ('١' and '²' are digits to str.isdigit), and no more than Linux's largest
    # pid_max (2**22): a bigger number overflows psutil's and kill()'s C int.
    pid = int(text) if text.isascii() and text.isdigit() and len(text) <= 7 else 0
    if not 0 < pid <= PID_MAX_LIMIT:
        raise ValueError(f"{os.fspath(path)} holds {text[:40]!r}, not a process id")
    return pid
