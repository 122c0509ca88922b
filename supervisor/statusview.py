"""`gpu-orchestrator status`: a running orchestrator at a glance, for people (or --json)."""

import json
import sys
import time

from gpu_orchestrator.supervisor.api import BadAnswer, GpuInfo, ModelsStatus, Unreachable, call, error_of

MiB = 1024**2
GiB = 1024**3


def size(value: int | None, unit: int = MiB, suffix: str = "MiB") -> str:
    return "-" if value is None else f"{value / unit:.0f} {suffix}" if unit == MiB else f"{value / unit:.1f}"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), *(line(r) for r in rows)]


def gpu_lines(info: dict) -> list[str]:
    if not info["nvml_supported"]:
        return [f"GPUs: no telemetry ({info['nvml_init_error']})"]
    rows = []
    for gpu in info["gpus"]:
        if gpu["error"]:
            rows.append([str(gpu["index"]), gpu["name"] or "?", f"error: {gpu['error']}", "", "", "", ""])
            continue
        used, total = gpu["memory_used_bytes"], gpu["memory_total_bytes"]
        power = "-" if gpu["power_draw_watts"] is None else f"{gpu['power_draw_watts']:.0f}/{gpu['power_limit_watts'] or 0:.0f} W"
        rows.append([str(gpu["index"]), gpu["name"] or "?",
                     f"{size(used, GiB, '')}/{size(total, GiB, '')} GiB" if used is not None else "-",
                     "-" if gpu["utilization_gpu_percent"] is None else f"{gpu['utilization_gpu_percent']}%",
                     "-" if gpu["temperature_celsius"] is None else f"{gpu['temperature_celsius']}C",
                     power, gpu["compute_mode"] or "-"])
    age = f" (sampled {info['age_s']:.1f} s ago, driver {info['driver_version']})" if info["age_s"] is not None else ""
    return [f"GPUs{age}:", *table(["GPU", "NAME", "MEMORY", "UTIL", "TEMP", "POWER", "MODE"], rows)]


def client_lines(status: dict, info: dict) -> list[str]:
    rows = []
    use = info.get("clients", {})
    for name, client in status["clients"].items():
        ready = sum(m["status"] == "ready" for m in client["models"])
        over = " OVER LIMIT" if use.get(name, {}).get("over_limit") else ""
        rows.append([name, client["state"], str(client["pid"] or "-"), str(client["restarts"]),
                     f"{ready}/{len(client['models'])}", "yes" if client["ready"] else "no",
                     size(client["gpu_memory_bytes"]) + over, size(client["rss_bytes"])])
    return table(["CLIENT", "STATE", "PID", "RESTARTS", "MODELS", "READY", "GPU MEM", "RSS"], rows)


def over_limit_lines(info: dict) -> list[str]:
    """MPS limits each CUDA process: say which clients' processes together pass their limit."""
    lines = []
    for name, client in sorted(info.get("clients", {}).items()):
        for gpu in client["over_limit_gpus"]:
            processes = [p for p in client["processes"] if p["gpu"] == gpu]
            roles = ", ".join(f"{p['role']} {p['pid']}" for p in processes)
            lines.append(f"  {name} on GPU {gpu}: {size(client['gpus'][str(gpu)])} of its "
                         f"{size(client['memory_limit_bytes'])} limit, in {len(processes)} processes ({roles})")
    return ["", "Over their MPS memory limit (each process is limited, not the client):", *lines] if lines else []


def headline(url: str, status: dict) -> str:
    summary = status["summary"]
    if status["all_ready"]:
        state = "ALL READY"
    elif status["in_progress"]:
        state = "WARMING UP"
    elif status["generation"] == 0:
        state = "NO WARM-UP YET"
    else:
        state = "NOT READY"
    return (f"gpu-orchestrator at {url}: {state} - {summary['done']}/{summary['total']} models ready, "
            f"{summary['failed']} failed (warm-up {status['generation']})")


def mps_line(info: dict) -> str:
    mps = info["mps"]
    if mps["enabled"]:
        servers = ", ".join(map(str, mps["servers"])) or "none"
        owner = "managed" if mps["managed"] else "adopted"
        return f"MPS: up ({owner}, control pid {mps['control_pid']}, servers: {servers}, pipe {mps['pipe_dir']})"
    return f"MPS: off ({mps['error']})"


def render(url: str, status: dict, info: dict) -> str:
    lines = [headline(url, status), mps_line(info), "", *gpu_lines(info), "", *client_lines(status, info),
             *over_limit_lines(info)]
    if status["errors"]:
        lines += ["", "Failures:"] + [f"  {e['agent']} {e['model']}: {e['error']}" for e in status["errors"]]
    return "\n".join(lines)


REQUEST_TIMEOUT = 10.0  # for both requests of one snapshot together


def snapshot(url: str) -> tuple[dict, dict]:
    deadline = time.monotonic() + REQUEST_TIMEOUT
    answers = []
    for path, shape in (("/models/status", ModelsStatus), ("/gpu/info", GpuInfo)):
        code, document = call(url + path, deadline, shape)
        if code != 200:
            raise BadAnswer(f"{url}{path} answered {error_of(code, document)}")
        answers.append(document)
    return answers[0], answers[1]


def run_status(url: str, as_json: bool, watch: float | None) -> int:
    try:
        while True:
            try:
                status, info = snapshot(url)
            except Unreachable as exc:
                print(f"gpu-orchestrator status: nothing answers at {url} ({exc}); is the service running? "
                      "Try: systemctl status gpu-orchestrator", file=sys.stderr)
                return 1
            except BadAnswer as exc:
                print(f"gpu-orchestrator status: {exc}; is {url} a gpu-orchestrator?", file=sys.stderr)
                return 1
            if as_json:
                print(json.dumps({"models_status": status, "gpu_info": info}, indent=2))
            else:
                if watch and sys.stdout.isatty():
                    print("\033[H\033[2J", end="")
                print(render(url, status, info), flush=True)
            if not watch:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
