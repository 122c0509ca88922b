"""BENCHMARKS.md's sections: `scripts/bench` rewrites the file from its own run, keeping the GPU
section that only `gpu-orchestrator bench-gpu --into BENCHMARKS.md` on a GPU host can write."""

from pathlib import Path

SECTION = "## On a GPU"


def gpu_section(text: str) -> str:
    """The GPU section of a BENCHMARKS.md text, from its heading to the next one; '' if none."""
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return text[start + 1:end + 1 if end >= 0 else len(text)]


def write_gpu_section(path: Path, body: str) -> None:
    """Put `body` in `path`'s GPU section, replacing the one there, else before its notes."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n\n"
    if old := gpu_section(text):
        text = text.replace(old, section)
    elif "\n## " in text:
        first = text.index("\n## ") + 1
        text = text[:first] + section + text[first:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
