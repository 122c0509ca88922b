"""Load for `gpu-orchestrator bench`: wrk when it is installed, the project's own Python generator
always (the fallback, and a second opinion), and the bare Falcon+waitress ceiling they are both
pointed at beside the orchestrator, returning the same bytes.

wrk runs `-t1 -c8` (one thread, eight keep-alive connections): on a small machine one wrk thread
already keeps the server's worker threads busy, and more would take CPU from the server measured.
The Python generator is 4 processes of one keep-alive connection each (processes, not threads:
the generator must not share a GIL); they start, connect and then wait for one common instant, so
that starting interpreters never falls inside the measured window.

On a small machine shared with other work, a single turn can be twice as fast or as slow as the
next for reasons of its own. So the two servers take many short turns, in the order A B, then
B A, and the ratio is the median of the ratios of each such pair (whatever else runs falls on both
sides of a pair alike); its spread across pairs is printed with it. Each turn also counts the
server process's CPU time and page faults a request: where a gap in the rates comes from.
"""

import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from gpu_orchestrator.supervisor.commands.harness import free_port, wait

WRK_THREADS, WRK_CONNECTIONS = 1, 8
PYTHON_CONNECTIONS = 4
ROUND_S = 1.0  # seconds of one turn of load; the two servers take turns, many short ones
START_AFTER_S = 0.5  # the Python generator's processes start, connect, then all begin together
TARGET = ">= 0.9x, p99 <= 1.5x"

# wrk's own summary rounds and picks units; this prints the exact figures as one JSON line.
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def generators() -> list[str]:
    """The load generators this machine has: wrk when it is on PATH, then always Python's."""
    return (["wrk"] if shutil.which("wrk") else []) + ["python"]


def describe(generator: str) -> str:
    if generator == "wrk":
        return f"wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS}"
    return f"python, {PYTHON_CONNECTIONS} connections"


# ---- wrk ----------------------------------------------------------------------------------

def wrk_load(url: str, seconds: float) -> dict:
    """requests/s, p50 and p99 in ms and errors (failed or not 2xx/3xx) from one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_DONE)
        script.flush()
        result = subprocess.run(["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{max(1, round(seconds))}s",
                                 "--latency", "-s", script.name, url], capture_output=True, text=True,
                                timeout=seconds + 60)
    line = next((line for line in result.stdout.splitlines() if line.startswith("WRK_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed against {url} (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    figures = json.loads(line.removeprefix("WRK_JSON "))
    return {"requests": figures["requests"], "rps": figures["requests"] / (figures["duration_us"] / 1e6),
            "p50": figures["p50_us"] / 1000, "p99": figures["p99_us"] / 1000, "errors": figures["errors"]}


# ---- the Python generator --------------------------------------------------------------------

def load_worker(url: str, paths: list[str], seconds: float, start_at: float) -> None:
    """One keep-alive connection cycling through `paths` as fast as it goes from `start_at` (a
    time.time(); at once if already past) for `seconds`; prints latencies in ms (sampled) and
    counts as an error every answer that is not 200 or that fails."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.connect()
    except OSError:
        pass  # counted as an error by the first request, which connects again
    time.sleep(max(0.0, start_at - time.time()))
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
    start_at = time.time() + START_AFTER_S
    return [subprocess.Popen([sys.executable, "-m", __spec__.name, "--load-worker", url, str(seconds), str(start_at),
                              *paths], stdout=subprocess.PIPE, text=True) for _ in range(connections)]


def finish_load(workers: list[subprocess.Popen], seconds: float) -> dict:
    results = [json.loads(w.communicate(timeout=seconds + 120)[0]) for w in workers]
    latencies = [v for r in results for v in r["latencies"]]
    count = sum(r["count"] for r in results)
    return {"requests": count, "rps": count / seconds, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99), "errors": sum(r["errors"] for r in results)}


def minor_faults(pid: int) -> int:
    """Page faults the process took without reading a disk: /proc/PID/stat's tenth field."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def load(generator: str, base: str, path: str, seconds: float, pid: int) -> dict:
    """One turn against the server process `pid` at `base`; with its CPU time (us) and page
    faults a request."""
    times, faults = psutil.Process(pid).cpu_times(), minor_faults(pid)
    if generator == "wrk":
        result = wrk_load(base + path, seconds)
    else:
        result = finish_load(start_load(base, [path], seconds, PYTHON_CONNECTIONS), seconds)
    after, requests = psutil.Process(pid).cpu_times(), max(1, result["requests"])
    result["cpu_us"] = (after.user + after.system - times.user - times.system) / requests * 1e6
    result["faults"] = (minor_faults(pid) - faults) / requests
    return result


# ---- the ceiling ------------------------------------------------------------------------------

def ceiling_server(port: int, path: str, body_file: str) -> None:
    """The framework's ceiling: a bare Falcon route answering the same bytes, same threads, no middleware."""
    import falcon
    import waitress

    from gpu_orchestrator.supervisor.daemon import HTTP_THREADS  # here: the load workers need not import it
    body = Path(body_file).read_bytes()

    class Fixed:
        def on_get(self, req, resp):
            resp.content_type = falcon.MEDIA_JSON
            resp.cache_control = ["no-store"]
            resp.data = body

    app = falcon.App()
    app.add_route(path, Fixed())
    waitress.serve(app, host="127.0.0.1", port=port, threads=HTTP_THREADS, _quiet=True)


def alternate(generator: str, bases: tuple[str, str], path: str, seconds: float,
              pids: tuple[int, int]) -> tuple[dict, dict, dict]:
    """Both servers (`pids`, at `bases`) in pairs of turns of ROUND_S, `seconds` each in all, A B
    then B A: each side's rate, latency and CPU a request the median of its turns (requests and
    errors summed), and per pair the ratio of the first side's rate, p99 and CPU to the second's."""
    turns: tuple[list, list] = ([], [])
    for pair in range(max(1, round(seconds / ROUND_S))):
        order = (0, 1) if pair % 2 == 0 else (1, 0)
        for side in order:
            turns[side].append(load(generator, bases[side], path, min(seconds, ROUND_S), pids[side]))
    ratios = {key: [a[key] / b[key] for a, b in zip(*turns)] for key in ("rps", "p99", "cpu_us")}
    return (*({key: (sum if key in ("requests", "errors") else statistics.median)([r[key] for r in results])
               for key in results[0]} for results in turns), ratios)


def ratio_text(ratios: dict) -> str:
    """The median of the pairs' ratios, and their spread (one pair: no spread to show)."""
    rps, p99, cpu = ratios["rps"], ratios["p99"], ratios["cpu_us"]
    spread = f" ({min(rps):.2f}-{max(rps):.2f} over {len(rps)} pairs)" if len(rps) > 1 else ""
    return (f"{statistics.median(rps):.2f}x throughput{spread}, {statistics.median(p99):.2f}x p99, "
            f"{statistics.median(cpu):.2f}x CPU a request")


def against_ceiling(base: str, pid: int, path: str, seconds: float, label: str) -> list[tuple]:
    """One row per generator: `path` on the orchestrator (process `pid`) at `base`, then the
    ceiling with its bytes."""
    body = urllib.request.urlopen(base + path, timeout=10).read()
    port = free_port()
    with tempfile.NamedTemporaryFile(suffix=".json") as saved:
        saved.write(body)
        saved.flush()
        ceiling = subprocess.Popen([sys.executable, "-m", __spec__.name, "--ceiling", str(port), path, saved.name],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10), 30, "the ceiling server")
            rows = []
            for generator in generators():
                ours, bare, ratios = alternate(generator, (base, f"http://127.0.0.1:{port}"), path, seconds,
                                               (pid, ceiling.pid))
                rows.append((f"GET {path} ({len(body)} B body, {label}), {describe(generator)}",
                             (f"{ours['rps']:.0f} req/s, p50 {ours['p50']:.2f} ms, p99 {ours['p99']:.2f} ms, "
                              f"{ours['errors']:.0f} errors, {ours['cpu_us']:.0f} us CPU and {ours['faults']:.1f} "
                              "page faults a request"),
                             (f"bare Falcon+waitress, same bytes: {bare['rps']:.0f} req/s, p99 {bare['p99']:.2f} ms, "
                              f"{bare['cpu_us']:.0f} us CPU and {bare['faults']:.1f} page faults a request"),
                             ratio_text(ratios),
                             TARGET))
            return rows
        finally:
            ceiling.terminate()
            ceiling.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load-worker"]:
        load_worker(sys.argv[2], sys.argv[5:], float(sys.argv[3]), float(sys.argv[4]))
    elif sys.argv[1:2] == ["--ceiling"]:
        ceiling_server(int(sys.argv[2]), sys.argv[3], sys.argv[4])
