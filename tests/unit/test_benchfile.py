"""BENCHMARKS.md's GPU section: written by bench-gpu on a GPU host, kept when scripts/bench
rewrites the rest of the file on a machine without one."""

from gpu_orchestrator.supervisor.commands.benchfile import gpu_section, write_gpu_section

CPU_RUN = "# Benchmarks\n\n| what | figure |\n|---|---|\n| a | 1 |\n\n## How to reproduce\n\nscripts/bench\n"


def test_the_section_goes_before_the_notes_then_replaces_itself(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(CPU_RUN)
    write_gpu_section(path, "first GPU table")
    text = path.read_text()
    assert text.index("| a | 1 |") < text.index("## On a GPU\n\nfirst GPU table\n") < text.index("## How to")
    write_gpu_section(path, "second GPU table\n")
    text = path.read_text()
    assert "first GPU table" not in text and text.count("## On a GPU") == 1
    assert text == CPU_RUN.replace("## How to", "## On a GPU\n\nsecond GPU table\n\n## How to")


def test_the_section_is_found_whole_wherever_it_sits(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_gpu_section(path, "only this")  # no file yet: one is started
    assert gpu_section(path.read_text()) == "## On a GPU\n\nonly this\n\n"
    assert gpu_section(CPU_RUN) == ""
    # What scripts/bench writes around it keeps it byte for byte.
    kept = gpu_section(CPU_RUN.replace("## How to", "## On a GPU\n\ntable\n\n## How to"))
    assert kept == "## On a GPU\n\ntable\n\n"
