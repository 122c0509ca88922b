"""loaders/files.py: the one way the configuration, MPS, mps-diag and the loaders open a file that must be a regular one."""

import os

import pytest

from gpu_orchestrator.loaders.files import NotAFile, read_pid, read_regular, read_tail


def test_a_head_read_is_bounded_and_says_whether_it_is_the_whole_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    assert read_regular(path, 10) == (b"0123456789", True)
    assert read_regular(path, 11) == (b"0123456789", True)
    assert read_regular(path, 4) == (b"0123", False)


def test_a_tail_read_starts_at_the_first_whole_line(tmp_path):
    path = tmp_path / "log"
    path.write_text("first line\nsecond\nthird\n")
    assert read_tail(path, 1000) == "first line\nsecond\nthird\n"
    assert read_tail(path, 10) == "third\n"  # "second\nthird\n" cut inside "second"


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_anything_but_a_regular_file_is_refused_without_blocking(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)  # opening it to read would wait for a writer forever
    elif kind == "directory":
        path = tmp_path
    else:
        path = "/dev/zero"  # endless
    with pytest.raises(NotAFile) as caught:
        read_regular(path, 100)
    assert caught.value.kind == {"fifo": "a FIFO", "directory": "a directory", "device": "a character device"}[kind]
    assert str(caught.value).endswith(f"is {caught.value.kind}, not a regular file")


# '\u0661' (Arabic one) read as pid 1, "ok, running"; '\u00b2' raised int()'s message without the file.
@pytest.mark.parametrize("content", ["", "abc", "0", "-1", "12x", "\u0661", "\u00b2", "4194305", "9" * 30])
def test_a_pid_file_that_names_no_process_is_refused(tmp_path, content):
    path = tmp_path / "pid"
    path.write_text(content)
    with pytest.raises(ValueError, match="not a process id"):
        read_pid(path)


def test_a_pid_file_is_read(tmp_path):
    path = tmp_path / "pid"
    path.write_text("4242\n")
    assert read_pid(path) == 4242
