"""`gpu-orchestrator bench [--quick]`: the orchestrator measured against the limits it cannot beat.

Every comparison runs side by side in the same run and is reported as a ratio. Prints a
table and writes BENCHMARKS.md. Not a test: CI runs `--smoke` only to see it works.
"""

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import psutil

from gpu_orchestrator.loaders.backends import plan, warm
from gpu_orchestrator.loaders.channel import Segment, SlotReader, SlotWriter
from gpu_orchestrator.loaders.store import Snapshot
from gpu_orchestrator.loaders.wire import LoaderState, ModelProgress
from gpu_orchestrator.supervisor.commands import helptext
from gpu_orchestrator.supervisor.commands.demo import write_snapshot
from gpu_orchestrator.supervisor.commands.harness import Orchestrator, free_port, wait
from gpu_orchestrator.supervisor.daemon import HTTP_THREADS

CLIENTS = 48  # as the issue asks; --smoke uses 6 to stay a few seconds long


# ---- helpers -------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def make_store(root: Path, clients: int, models_per_client: int, shape: tuple, manifests: bool) -> Path:
    models = {}
    for client in range(clients):
        ids = [f"bench/c{client:02d}-m{m}" for m in range(models_per_client)]
        for m, model in enumerate(ids):
            write_snapshot(root / "store" / model, shape, client * models_per_client + m, manifest=manifests)
        models[f"client{client:02d}"] = ids
    model_map = root / "AGENT_MODEL_MAP.json"
    model_map.write_text(json.dumps(models))
    return model_map


def files_of(store: Path) -> list[str]:
    return sorted(str(p) for p in store.rglob("*") if p.is_file() and p.name != "manifest.json")


def timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


# ---- load generation --------------------------------------------------------------------

def load_worker(url: str, paths: list[str], seconds: float) -> None:
    """One keep-alive connection cycling through `paths` as fast as it goes; prints latencies
    in ms (sampled) and counts as an error every answer that is not 200 or that fails."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    latencies, errors = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            conn.request("GET", paths[len(latencies) % len(paths)])
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        latencies.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"count": len(latencies), "errors": errors, "latencies": latencies[:: max(1, len(latencies) // 20000)]}))


def start_load(url: str, paths: list[str], seconds: float, connections: int) -> list[subprocess.Popen]:
    """Loopback load from `connections` processes (not threads: the generator must not share a GIL)."""
    return [subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.bench", "--load-worker", url,
                              str(seconds), *paths], stdout=subprocess.PIPE, text=True) for _ in range(connections)]


def finish_load(workers: list[subprocess.Popen], seconds: float) -> dict:
    results = [json.loads(w.communicate(timeout=seconds + 120)[0]) for w in workers]
    latencies = [v for r in results for v in r["latencies"]]
    count = sum(r["count"] for r in results)
    return {"requests": count, "rps": count / seconds, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99), "errors": sum(r["errors"] for r in results)}


def load(url: str, path: str, seconds: float, connections: int) -> dict:
    return finish_load(start_load(url, [path], seconds, connections), seconds)


def ceiling_server(port: int, size: int) -> None:
    """The framework's ceiling: a bare Falcon route with a same-size JSON body, same threads."""
    import falcon
    import waitress
    body = json.dumps({"pad": "x" * max(0, size - 11)}).encode()

    class Fixed:
        def on_get(self, req, resp):
            resp.content_type = falcon.MEDIA_JSON
            resp.data = body

    app = falcon.App()
    app.add_route("/fixed", Fixed())
    waitress.serve(app, host="127.0.0.1", port=port, threads=HTTP_THREADS, _quiet=True)


# ---- the measurements -----------------------------------------------------------------------

def bench_api(work: Path, seconds: float, connections: int, clients: int) -> list[tuple]:
    model_map = make_store(work / "api", clients, 2, (32, 1, 256), manifests=False)
    orch = Orchestrator(work / "api" / "store", model_map, "--heartbeat-timeout", "600")
    rows = []
    try:
        orch.settled()
        for path in ("/models/status", "/gpu/info"):
            size = len(urllib.request.urlopen(orch.url + path).read())
            port = free_port()
            ceiling = subprocess.Popen([sys.executable, "-m", "gpu_orchestrator.supervisor.commands.bench", "--ceiling",
                                        str(port), str(size)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/fixed"), 30, "the ceiling server")
                ours = load(orch.url, path, seconds, connections)
                bare = load(f"http://127.0.0.1:{port}", "/fixed", seconds, connections)
            finally:
                ceiling.terminate()
                ceiling.wait()
            rows.append((f"GET {path} ({size} B body, {clients} clients)",
                         f"{ours['rps']:.0f} req/s, p50 {ours['p50']:.2f} ms, p99 {ours['p99']:.2f} ms, {ours['errors']} errors",
                         f"bare Falcon+waitress: {bare['rps']:.0f} req/s, p99 {bare['p99']:.2f} ms",
                         f"{ours['rps'] / bare['rps']:.2f}x throughput, {ours['p99'] / bare['p99']:.2f}x p99",
                         ">= 0.8x, <= 2x"))
        rows += bench_propagation(orch, seconds)
    finally:
        orch.stop()
    return rows


def bench_propagation(orch: Orchestrator, seconds: float) -> list[tuple]:
    """A publish is visible once an answer carries it: its heartbeat age when first seen."""
    ages, last = [], {}
    deadline = time.monotonic() + max(seconds, 5)
    while time.monotonic() < deadline:
        for name, client in orch.status()["clients"].items():
            age = client["heartbeat_age_s"]
            if age is not None and name in last and age < last[name]:
                ages.append(age * 1000)
            last[name] = age
    return [("loader publish -> visible in /models/status", f"p50 {percentile(ages, 0.5):.1f} ms, "
             f"p99 {percentile(ages, 0.99):.1f} ms ({len(ages)} publishes)",
             "includes the client's own polling gap", "-", "-")]


def bench_channel(clients: int) -> list[tuple]:
    segment = Segment.create(f"gpu-orchestrator-bench-{os.getpid()}", slots=clients + 1, slot_size=212992)
    try:
        state = LoaderState("client00", os.getpid(), 1, "idle", time.monotonic(),
                            [ModelProgress(f"org/model-{i}", status="ready", path=f"/srv/models/org/model-{i}",
                                           bytes_done=10**8, bytes_total=10**8, weight_bytes=10**8,
                                           parameters=10**7, seconds=1.5, format="safetensors") for i in range(10)])
        writers = [SlotWriter(segment, slot) for slot in range(1, clients + 1)]
        rounds = 2000
        started = time.perf_counter()
        for n in range(rounds):
            state.heartbeat = n
            writers[n % clients].publish(state)
        publish_us = (time.perf_counter() - started) / rounds * 1e6
        for writer in writers:
            writer.publish(state)
        started = time.perf_counter()
        for _ in range(200):
            reader = SlotReader(segment, LoaderState)  # a fresh reader decodes every slot, as after publishes
            for slot in range(1, clients + 1):
                reader.read(slot)
        read_us = (time.perf_counter() - started) / 200 * 1e6
    finally:
        segment.close()
    return [("channel: publish one loader state (10 models)", f"{publish_us:.1f} us", "-", "-", "-"),
            (f"channel: read and decode all {clients} slots", f"{read_us:.0f} us", "-", "-", "-")]


def bench_warmup(work: Path, total_mb: int, clients: int) -> list[tuple]:
    rows = []
    per_model_mb = max(1, total_mb // (clients * 2))
    vocabulary = per_model_mb * 1024 * 1024 // (2 * 256)
    for manifests in (False, True):
        root = work / ("warm-verified" if manifests else "warm")
        model_map = make_store(root, clients, 2, (256, 1, vocabulary), manifests)
        store = root / "store"
        files = files_of(store)
        total = sum(os.path.getsize(f) for f in files)
        timed(["cat", *files])  # make the page cache hot for everyone
        cat = min(timed(["cat", *files]) for _ in range(3))
        sequential = min(sequential_load(store, model_map) for _ in range(2))
        orch = Orchestrator(store, model_map)
        try:
            orch.settled()
            makespans = []
            for _ in range(3):
                started = time.monotonic()
                with urllib.request.urlopen(urllib.request.Request(
                        orch.url + "/models/preload", data=b'{"refresh": true}', method="POST",
                        headers={"Content-Type": "application/json"})) as response:
                    response.read()
                orch.settled()
                makespans.append(time.monotonic() - started)
        finally:
            orch.stop()
        ours = min(makespans)
        label = f"warm-up {clients}x2 models, {total / 2**30:.2f} GiB, hot cache" + (", sha256 verified" if manifests else "")
        if manifests:
            parallel = min(timed(["bash", "-c", f"printf '%s\\0' {' '.join(files)} | xargs -0 -P {os.cpu_count()} -n 8 sha256sum"])
                           for _ in range(2))
            rows.append((label, f"{ours:.2f} s", f"sha256sum in parallel {parallel:.2f} s; one process {sequential:.2f} s",
                         f"{ours / parallel:.2f}x sha256sum", "report"))
        else:
            rows.append((label, f"{ours:.2f} s ({total / ours / 2**30:.2f} GiB/s)",
                         f"cat {cat:.2f} s; one process {sequential:.2f} s",
                         f"{ours / cat:.2f}x cat, {ours / sequential:.2f}x sequential", "<= 1.5x cat"))
    return rows


def sequential_load(store: Path, model_map: Path) -> float:
    """What a single-process orchestrator does: every model, one after the other."""
    started = time.monotonic()
    for models in json.loads(model_map.read_text()).values():
        for model in models:
            path = (store / model).resolve()
            snapshot = Snapshot(path, store.resolve(), "shared")
            warm(snapshot, plan(snapshot), lambda n: None)
    return time.monotonic() - started


def bench_idle(work: Path, seconds: float, clients: int) -> list[tuple]:
    model_map = make_store(work / "idle", clients, 2, (32, 1, 256), manifests=False)
    orch = Orchestrator(work / "idle" / "store", model_map)
    try:
        status = orch.settled()
        time.sleep(2)  # let start-up work finish before measuring
        supervisor = psutil.Process(orch.proc.pid)
        loaders = [psutil.Process(c["pid"]) for c in status["clients"].values()]
        before = [p.cpu_times() for p in [supervisor, *loaders]]
        time.sleep(seconds)
        after = [p.cpu_times() for p in [supervisor, *loaders]]
        shares = [((a.user + a.system) - (b.user + b.system)) / seconds * 100 for a, b in zip(after, before)]
        rss = supervisor.memory_info().rss
        loader_rss = statistics.mean(p.memory_info().rss for p in loaders)
    finally:
        orch.stop()
    return [(f"idle {seconds:.0f} s, {clients} ready loaders: supervisor",
             f"{shares[0]:.2f} % of a core, RSS {rss / 2**20:.0f} MiB", "-", "-", "< 1 %, < 80 MB"),
            (f"idle {seconds:.0f} s: each loader (mean / max)",
             f"{statistics.mean(shares[1:]):.3f} % / {max(shares[1:]):.3f} % of a core, RSS {loader_rss / 2**20:.0f} MiB",
             "-", "-", "< 0.2 %")]


def bench_recovery(work: Path, tries: int) -> list[tuple]:
    model_map = make_store(work / "recovery", 4, 1, (32, 1, 256), manifests=False)
    store = work / "recovery" / "store"
    starts, recoveries = [], []
    for _ in range(tries):
        orch = Orchestrator(store, model_map)
        starts.append(orch.listening_after)
        orch.stop()
    orch = Orchestrator(store, model_map)
    try:
        orch.settled()
        for _ in range(tries):
            victim = orch.status()["clients"]["client00"]["pid"]
            wait(lambda: orch.status()["clients"]["client00"]["ready"], 60, "ready")
            started = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait(lambda: (c := orch.status()["clients"]["client00"])["pid"] != victim and c["ready"], 120, "recovery")
            recoveries.append(time.monotonic() - started)
    finally:
        orch.stop()
    return [(f"loader SIGKILL -> client ready again ({tries} tries)",
             f"p50 {percentile(recoveries, 0.5):.2f} s, p99 {percentile(recoveries, 0.99):.2f} s",
             "restart delay 0.5 s after a healthy run", "-", "-"),
            (f"supervisor start -> HTTP listening ({tries} tries)",
             f"p50 {percentile(starts, 0.5):.2f} s, p99 {percentile(starts, 0.99):.2f} s", "-", "-", "-")]


# ---- report ---------------------------------------------------------------------------------

HEADERS = ("what", "gpu-orchestrator", "compared with", "ratio", "target")


def render(rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> str:
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("falcon", "waitress", "msgspec", "psutil"))
    return (f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
            f"- machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}\n"
            f"- Python {platform.python_version()}; {versions}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-orchestrator bench")
    helptext.describe(parser, "bench")
    parser.add_argument("--quick", action="store_true", help="short runs, a 200 MB store")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run that only checks everything works")
    parser.add_argument("--output", default="BENCHMARKS.md")
    args = parser.parse_args(argv)
    scale = "smoke" if args.smoke else "quick" if args.quick else "full"
    seconds = {"smoke": 1, "quick": 5, "full": 15}[scale]
    idle = {"smoke": 2, "quick": 10, "full": 30}[scale]
    warm_mb = {"smoke": 24, "quick": 200, "full": 2100}[scale]
    tries = {"smoke": 2, "quick": 5, "full": 20}[scale]
    clients = 6 if args.smoke else CLIENTS
    work = Path(tempfile.mkdtemp(prefix="gpu-orchestrator-bench-"))
    try:
        rows = bench_channel(clients)
        rows += bench_api(work, seconds, 4, clients)
        rows += bench_warmup(work, warm_mb, clients)
        rows += bench_idle(work, idle, clients)
        rows += bench_recovery(work, tries)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = render(rows)
    print(table)
    if not args.smoke:
        command = "scripts/bench" + (" --quick" if args.quick else "")
        Path(args.output).write_text(f"# Benchmarks\n\n{environment()}\n- run: `{command}` ({scale})\n\n{table}\n\n"
                                     f"{NOTES}\n")
        print(f"\nwritten to {args.output}")
    return 0


NOTES = """## How to reproduce

`make test` installs the package; then `scripts/bench` (or `.venv/bin/gpu-orchestrator
bench`; `--quick` for a short run) prints this table and rewrites this file. Every
comparison is measured side by side in the same run on the same machine, with the same
load generator (one keep-alive connection per process, 4 processes); compare ratios,
not absolute figures, across machines.

## What bounds each figure

- Status API: waitress's own per-request work (parsing, the send path in a worker
  thread) under the GIL. Composing `/models/status` for 48 clients costs about
  0.3 ms, which held it at 0.36x of the ceiling until the composed answer was
  reused, already encoded, until a slot is written, a loader record changes, or
  100 ms pass.
- Warm-up: memory bandwidth of copying the page cache; the loaders read in
  parallel, so with two cores they beat a single `cat`. With verification, sha256
  throughput (OpenSSL's, through hashlib) split across the loaders; coreutils'
  `sha256sum` is slower per byte on this machine.
- Idle: the supervisor's one-second tick (a seqlock check per slot, each loader's
  RSS, the status composition when something changed) and each loader's
  once-a-second heartbeat publish. Nothing polls faster than that.
- Recovery: the 0.5 s restart delay after a healthy run, plus a fresh interpreter
  (exec, never fork) importing the loader.
- Start to listening: importing falcon, waitress, msgspec and psutil."""


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load-worker"]:
        load_worker(sys.argv[2], sys.argv[4:], float(sys.argv[3]))
    elif sys.argv[1:2] == ["--ceiling"]:
        ceiling_server(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
