"""`gpu-orchestrator bench-gpu`: how fast a warm-up puts weights on the GPU, against the hardware.

For each snapshot (a generated one, plus every --model-dir), side by side in one process:
- `cat`: the snapshot's files read in 8 MiB chunks, as cat does (the page cache's, or the disk's,
  read rate);
- the default backend: the loader's check and read of every file, as a warm-up does it;
- the torch backend: the same checks and read, the weights read onto cuda:0, as a loader with
  "backend": "torch" does it (`load_torch`);
- safetensors' own `load_file(device="cuda")` of the weights;
- the physical limit: torch's host-to-device copy of a pinned buffer of the weights' size.
Each is the median of --repeat runs, with a hot page cache and, where the cache can be emptied
(root: /proc/sys/vm/drop_caches; else posix_fadvise DONTNEED per file), a cold one. Rates are the
snapshot's bytes (weights' bytes for the device rows) over the time; each ratio is against the
pinned copy. Needs torch with CUDA; prints a Markdown table, and writes it to --output if given.
`--cpu` runs the same steps on the CPU, only to check that the benchmark itself works.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gpu_orchestrator.loaders.backends import list_files, plan, warm
from gpu_orchestrator.loaders.store import Snapshot
from gpu_orchestrator.supervisor.commands import helptext
from gpu_orchestrator.supervisor.commands.bench import drop_caches
from gpu_orchestrator.supervisor.commands.benchfile import write_gpu_section
from gpu_orchestrator.supervisor.commands.demo import write_snapshot

GENERATED_SHAPE = (4096, 2, 30000)  # hidden, layers, vocabulary: about 1 GiB of F16 weights
READ_CHUNK = 8 * 2**20


def evict(files: list[Path]) -> str:
    """Empty the page cache of `files`: how, in words (the row says which was used)."""
    if drop_caches():
        return "drop_caches"
    for path in files:
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return "fadvise DONTNEED"


def read_all(files: list[Path]) -> None:
    buffer = bytearray(READ_CHUNK)
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


class Bench:
    def __init__(self, torch, repeat: int, on_gpu: bool, cold: bool):
        self.torch, self.repeat, self.on_gpu, self.cold = torch, repeat, on_gpu, cold
        self.device = "cuda:0" if on_gpu else "cpu"
        self.synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
        if on_gpu:
            torch.cuda.init()
            torch.empty(1, device=self.device)  # the context exists before any timing starts

    def timed(self, step, before=None) -> float:
        """Median seconds of `step` over the repeats; `before` runs untimed ahead of each."""
        times = []
        for _ in range(self.repeat):
            if before:
                before()
            self.synchronize()
            start = time.perf_counter()
            step()
            self.synchronize()
            times.append(time.perf_counter() - start)
            if self.on_gpu:
                self.torch.cuda.empty_cache()
        return statistics.median(times)

    def pinned_copy(self, size: int) -> float:
        torch = self.torch
        host = torch.empty(size, dtype=torch.uint8, pin_memory=self.on_gpu)
        host.fill_(1)
        device = torch.empty(size, dtype=torch.uint8, device=self.device)
        device.copy_(host, non_blocking=self.on_gpu)  # the first copy maps the buffer; not timed
        return self.timed(lambda: device.copy_(host, non_blocking=self.on_gpu))  # both freed on return

    def default_backend(self, root: Path) -> None:
        snapshot = Snapshot(root, root, "bench")
        warm(snapshot, plan(snapshot), lambda done: None)

    def torch_backend(self, root: Path) -> None:
        from gpu_orchestrator.loaders.torch_backend import load_torch
        snapshot = Snapshot(root, root, "bench")
        load_torch(snapshot, plan(snapshot), 0, None, warmup=False)

    def library(self, weights: list[Path]) -> None:
        from safetensors.torch import load_file
        tensors = [load_file(str(path), device=self.device) for path in weights]
        self.synchronize()
        del tensors

    def measure(self, label: str, root: Path) -> list[tuple]:
        files = list_files(Snapshot(root, root, "bench"))  # the files a warm-up reads
        weights = [p for p in files if p.suffix == ".safetensors"]
        total = sum(p.stat().st_size for p in files)
        weight_bytes = sum(p.stat().st_size for p in weights)
        limit = self.pinned_copy(weight_bytes)
        rows = [(f"{label}: pinned host-to-device copy (the physical limit)", weight_bytes, limit, limit)]
        steps = [("`cat` of every file", total, lambda: read_all(files)),
                 ("default backend: check and read every file", total, lambda: self.default_backend(root)),
                 ("torch backend: check and read every file, weights onto the GPU", weight_bytes,
                  lambda: self.torch_backend(root)),
                 ('safetensors load_file(device="cuda")', weight_bytes, lambda: self.library(weights))]
        read_all(files)
        for what, size, step in steps:
            rows.append((f"{label}, hot cache: {what}", size, self.timed(step), limit))
        if not self.cold:
            return rows
        how = evict(files)
        for what, size, step in steps:
            rows.append((f"{label}, cold cache ({how}): {what}", size, self.timed(step, lambda: evict(files)), limit))
        return rows


SECTION_NOTES = """What bounds each figure: `cat` and the default backend, one thread copying the page cache
(hot) or reading the disk (cold); the torch backend, up to 8 threads copying the page cache into
pinned buffers while the copy engine moves the chunks before them; the pinned copy, the
host-to-device link. A small model's figures are mostly fixed costs (the context's first
allocations, starting the readers, a device buffer per file). The torch rows count the weights'
bytes, and their time includes reading the snapshot's small files too. `scripts/bench` keeps
this section when it rewrites the rest."""


def render(rows: list[tuple], repeat: int) -> str:
    lines = [f"| what | bytes | seconds (median of {repeat}) | GB/s | vs pinned copy |", "|---|---|---|---|---|"]
    for what, size, seconds, limit in rows:
        lines.append(f"| {what} | {size / 2**20:.1f} MiB | {seconds:.4g} | {size / seconds / 1e9:.3g} | "
                     f"{limit / seconds:.2f}x |")
    return "\n".join(lines)


def environment(torch, on_gpu: bool) -> str:
    props = torch.cuda.get_device_properties(0) if on_gpu else None
    device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB" if props else "none: --cpu, a check of the benchmark"
    return (f"- GPU: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}\n- host: {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-orchestrator bench-gpu")
    helptext.describe(parser, "bench-gpu")
    parser.add_argument("--model-dir", action="append", default=[], help="a safetensors snapshot (repeatable)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each step; the median is shown (default 3)")
    parser.add_argument("--output", help="also write the table here")
    parser.add_argument("--into", metavar="BENCHMARKS.md", help="also put it in this file's GPU section, "
                                                                 "keeping the rest of the file")
    parser.add_argument("--generated-shape", default=",".join(map(str, GENERATED_SHAPE)), metavar="H,L,V",
                        help="the generated snapshot's hidden size, layers and vocabulary (default: about 1 GiB)")
    parser.add_argument("--no-cold", action="store_true", help="hot page cache only (leave the page cache alone)")
    parser.add_argument("--cpu", action="store_true", help="the same steps on the CPU: checks the benchmark works")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(n) for n in args.generated_shape.split(","))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        parser.error(f"--generated-shape wants three positive integers H,L,V, not {args.generated_shape!r}")
    try:
        import torch
    except ImportError:
        print("bench-gpu needs torch: pip install 'gpu-orchestrator[torch]'", file=sys.stderr)
        return 69
    if not (args.cpu or torch.cuda.is_available()):
        print("no GPU: torch sees no CUDA device; nothing measured")
        return 0
    bench = Bench(torch, max(1, args.repeat), on_gpu=not args.cpu, cold=not args.no_cold)
    with tempfile.TemporaryDirectory(prefix="gpu-orchestrator-bench-gpu-") as work:
        generated = Path(work) / "generated"
        write_snapshot(generated, shape, seed=1, manifest=False)
        rows = bench.measure("generated F16 snapshot", generated)
        for directory in args.model_dir:
            rows += bench.measure(Path(directory).name, Path(directory).resolve())
    text = f"{environment(torch, bench.on_gpu)}\n\n{render(rows, bench.repeat)}\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.into:
        command = " ".join(["gpu-orchestrator bench-gpu", *(argv if argv is not None else sys.argv[1:])])
        write_gpu_section(Path(args.into), f"`{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:\n\n"
                                       f"{text}\n{SECTION_NOTES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
