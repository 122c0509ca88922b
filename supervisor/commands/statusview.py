"""`gpu-orchestrator status [CLIENT]`: a running orchestrator at a glance, for people (or --json).

Every line fits the terminal (80 columns at least): long names and errors are cut with an
ellipsis, never wrapped, so a table stays a table; `status CLIENT` shows that client's errors in
full, wrapped. States are coloured only on a terminal and never under NO_COLOR (no-color.org).
"""

import json
import os
import shutil
import sys
import textwrap
import time

from gpu_orchestrator.supervisor.commands.api import BadAnswer, GpuInfo, ModelsStatus, Unreachable, call, error_of

MiB = 1024**2
GiB = 1024**3
MIN_WIDTH = 80
COLOURS = {"green": "32", "yellow": "33", "red": "31"}
STATE_COLOUR = {"RUNNING": "green", "ready": "green", "ALL READY": "green", "STARTING": "yellow",
                "BACKOFF": "yellow", "STOPPING": "yellow", "loading": "yellow", "WARMING UP": "yellow",
                "FATAL": "red", "failed": "red", "NOT READY": "red", "OVER LIMIT": "red"}


class Style:
    """How wide lines may be and whether states are coloured, decided once per command."""

    def __init__(self, width: int, colour: bool, ellipsis: str = "…"):
        self.width, self.colour, self.ellipsis = width, colour, ellipsis

    @classmethod
    def for_stdout(cls) -> "Style":
        width = max(MIN_WIDTH, shutil.get_terminal_size((MIN_WIDTH, 24)).columns)
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        try:
            "…".encode(sys.stdout.encoding or "ascii")
            ellipsis = "…"
        except UnicodeEncodeError:
            ellipsis = "..."
        return cls(width, colour, ellipsis)

    def cut(self, text: str, width: int | None = None) -> str:
        width = self.width if width is None else width
        return text if len(text) <= width else text[: max(0, width - len(self.ellipsis))] + self.ellipsis

    def fit(self, text: str, *states: str) -> str:
        """A whole line, cut to the width, then its `states` coloured where they survived the cut."""
        text = self.cut(text)
        for state in states:
            text = text.replace(state, self.paint(state), 1)
        return text

    def paint(self, text: str, word: str | None = None) -> str:
        """`text` in the colour of its state `word` (default: the text itself), on a terminal only."""
        colour = STATE_COLOUR.get(text.strip() if word is None else word)
        if not self.colour or colour is None:
            return text
        return f"\033[{COLOURS[colour]}m{text}\033[0m"


def size(value: int | None, unit: int = MiB, suffix: str = "MiB") -> str:
    return "-" if value is None else f"{value / unit:.0f} {suffix}" if unit == MiB else f"{value / unit:.1f}"


def human_bytes(value: float) -> str:
    """Decimal units, as a transfer is counted: 5.30 GB, 366 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            break
        value /= 1000
    else:
        unit = "TB"
    return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.{1 if value >= 10 else 2}f} {unit}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def progress_text(done: int, total: int, rate: float | None, eta: float | None) -> str:
    """'41% 5.30 GB of 12.9 GB, 366 MB/s, ETA 21 s'; rate and ETA once the loader has timed a read."""
    percent = f"{100 * done // total}% " if total else ""
    parts = [f"{percent}{human_bytes(done)} of {human_bytes(total)}"]
    if rate:
        parts.append(f"{human_bytes(rate)}/s")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return ", ".join(parts)


def table(style: Style, headers: list[str], rows: list[list[str]], narrow: tuple[int, ...] = (0, -1)) -> list[str]:
    """Columns as wide as their widest cell; while the line is too wide, the `narrow` columns are
    narrowed in turn (the least needed first), their cells cut with an ellipsis."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    for column in narrow:
        excess = sum(widths) + 2 * (len(widths) - 1) - style.width
        if excess > 0:
            widths[column] = max(min(len(headers[column]), widths[column]), widths[column] - excess)

    def line(cells: list[str], paint: bool) -> str:
        cut = [style.cut(c, w) for c, w in zip(cells, widths)]
        padded = [c.ljust(w) for c, w in zip(cut, widths)]
        if paint:
            padded = [style.paint(p, state_word(c)) for p, c in zip(padded, cells)]
        return "  ".join(padded).rstrip()

    return [line(headers, False), *(line(r, True) for r in rows)]


def state_word(cell: str) -> str:
    """The state a cell shows, for its colour: 'RUNNING', '1 failed', '9216 MiB!' (over its limit)."""
    if cell.endswith("!"):
        return "OVER LIMIT"
    return "failed" if cell.endswith(" failed") else cell


def gpu_lines(style: Style, info: dict) -> list[str]:
    if not info["nvml_supported"]:
        return [style.cut(f"GPUs: no telemetry ({info['nvml_init_error']})")]
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
    return [f"GPUs{age}:", *table(style, ["GPU", "NAME", "MEMORY", "UTIL", "TEMP", "POWER", "MODE"], rows,
                                            narrow=(6, 2, 1))]


def warmup_text(client: dict) -> tuple[str, str | None]:
    """The client's part of the warm-up: (in a word, its progress while it reads)."""
    failed = sum(m["status"] == "failed" for m in client["models"])
    progress = client.get("progress")
    if client["in_progress"] and progress and progress["bytes_total"]:
        return (f"{100 * progress['bytes'] // progress['bytes_total']}%",
                progress_text(progress["bytes"], progress["bytes_total"], progress["rate_bytes_per_s"], progress["eta_s"]))
    if client["in_progress"]:
        return "pending", None
    if failed:
        return f"{failed} failed", None
    return "ready" if client["ready"] else "-", None


def model_text(model: dict) -> str:
    if model["status"] == "loading":
        return progress_text(model["bytes"], model["bytes_total"], model.get("rate_bytes_per_s"), model.get("eta_s"))
    if model["status"] == "ready":
        return f"{human_bytes(model['bytes'])} in {duration(model['seconds'])}"
    return model.get("error") or ""


def client_lines(style: Style, status: dict, info: dict, verbose: bool = False) -> list[str]:
    """One row per client; under a client warming up, its progress; with `verbose`, each model."""
    rows, details = [], []
    use = info.get("clients", {})
    for name, client in status["clients"].items():
        ready = sum(m["status"] == "ready" for m in client["models"])
        state = use[name].get("over_limit", False) if name in use else False
        over = "!" if state else "?" if state is None else ""  # ?: memory unknown, over its limit or not
        word, progress = warmup_text(client)
        rows.append([name, client["state"], str(client["pid"] or "-"), str(client["restarts"]),
                     f"{ready}/{len(client['models'])}", size(client["gpu_memory_bytes"]) + over,
                     size(client["rss_bytes"]), word])
        detail = [style.cut(f"  warm-up: {progress}")] if progress else []
        details.append(detail + (model_lines(style, client["models"]) if verbose else []))
    head, *body = table(style, ["CLIENT", "STATE", "PID", "RESTARTS", "MODELS", "GPU MEM", "RSS", "WARM-UP"], rows)
    lines = [head]
    for line, detail in zip(body, details):
        lines += [line, *detail]
    return lines


def model_lines(style: Style, models: list[dict], indent: str = "    ") -> list[str]:
    width = style.width - len(indent)
    name_width = min(max((len(m["model"]) for m in models), default=0), width // 2)
    lines = []
    for model in models:
        head = f"{indent}{style.cut(model['model'], name_width).ljust(name_width)}  "
        status = model["status"].ljust(7)
        rest = style.cut(model_text(model), style.width - len(head) - len(status) - 2)
        lines.append(f"{head}{style.paint(status, model['status'])}  {rest}".rstrip())
    return lines


def over_limit_lines(style: Style, info: dict) -> list[str]:
    """MPS limits each CUDA process: say which clients' processes together pass their limit."""
    lines = []
    for name, client in sorted(info.get("clients", {}).items()):
        for gpu in client["over_limit_gpus"]:
            processes = [p for p in client["processes"] if p["gpu"] == gpu]
            roles = ", ".join(f"{p['role']} {p['pid']}" for p in processes)
            lines.append(style.cut(f"  {name} on GPU {gpu}: {size(client['gpus'][str(gpu)])} of its "
                                   f"{size(client['memory_limit_bytes'])} limit, in {len(processes)} processes ({roles})"))
    heading = style.fit("OVER LIMIT (GPU MEM marked !): processes past their MPS memory limit:", "OVER LIMIT")
    return ["", heading, *lines] if lines else []


def verdict(status: dict) -> str:
    if status["all_ready"]:
        return "ALL READY"
    if status["in_progress"]:
        return "WARMING UP"
    return "NO WARM-UP YET" if status["generation"] == 0 else "NOT READY"


def headline(style: Style, url: str, status: dict) -> str:
    summary = status["summary"]
    state = verdict(status)
    return "\n".join([style.cut(f"gpu-orchestrator at {url}, warm-up {status['generation']}:"), style.fit(
        f"{state} - {summary['done']}/{summary['total']} models ready, {summary['failed']} failed", state)])


def mps_line(style: Style, info: dict) -> str:
    mps = info["mps"]
    if mps["enabled"]:
        servers = ", ".join(map(str, mps["servers"])) or "none"
        owner = "managed" if mps["managed"] else "adopted"
        return style.cut(f"MPS: up ({owner}, control pid {mps['control_pid']}, servers: {servers}, pipe {mps['pipe_dir']})")
    return style.cut(f"MPS: off ({mps['error']})")


def render(url: str, status: dict, info: dict, style: Style | None = None, verbose: bool = False) -> str:
    style = style or Style(MIN_WIDTH, False)
    lines = [headline(style, url, status), mps_line(style, info), "", *gpu_lines(style, info), "",
             *client_lines(style, status, info, verbose), *over_limit_lines(style, info)]
    if status["errors"]:
        lines += ["", "Failures (gpu-orchestrator status CLIENT shows them in full):"]
        lines += [style.cut(f"  {e['agent']} {e['model']}: {e['error']}") for e in status["errors"]]
    return "\n".join(lines)


def render_client(url: str, name: str, status: dict, info: dict, style: Style) -> str:
    """One client in detail: its loader, memory against its limit, each model, errors in full."""
    client = status["clients"][name]
    use = info.get("clients", {}).get(name)
    loader = (f"loader {client['state']}, pid {client['pid'] or '-'}, restarts {client['restarts']}, "
              f"last exit {client.get('last_exit') or '-'}")
    if client.get("heartbeat_age_s") is not None:
        loader += f", heard from {client['heartbeat_age_s']:.1f} s ago"
    memory = f"GPU memory {size(client['gpu_memory_bytes'])}"
    if use and use["gpus"]:
        memory += " (" + ", ".join(f"GPU {gpu}: {size(used)}" for gpu, used in use["gpus"].items()) + ")"
    if client.get("memory_limit_bytes"):
        memory += f", MPS limit {size(client['memory_limit_bytes'])} per process"
        if not info.get("mps", {}).get("enabled"):  # the figure stands, but no daemon holds anyone to it
            memory += " (not enforced: MPS down)" if info.get("mps_configured") else \
                " (not enforced: MPS off)"
    lines = [headline(style, url, status), "", style.fit(f"Client {name}: {loader}", client["state"]),
             style.cut(f"{memory}; RSS {size(client['rss_bytes'])}")]
    if use and use["over_limit"]:
        lines.append(style.fit(f"OVER LIMIT on GPU {', '.join(map(str, use['over_limit_gpus']))}", "OVER LIMIT"))
    elif use and use["over_limit"] is None:
        lines.append(style.cut("Over its limit: unknown (NVML gives no memory figure for some of its processes, "
                               "or a GPU they were on is lost)"))
    word, progress = warmup_text(client)
    lines += [style.cut(f"Warm-up: {progress or word}"), "", "Models:", *model_lines(style, client["models"], "  ")]
    wrap = textwrap.TextWrapper(width=style.width, initial_indent="  ", subsequent_indent="    ",
                                break_long_words=True, break_on_hyphens=False)
    failures = [(m["model"], m["error"]) for m in client["models"] if m.get("error")]
    if client.get("error"):
        failures.insert(0, ("loader", client["error"]))
    if failures:
        lines += ["", "Errors:"]
        for what, error in failures:
            lines += wrap.wrap(f"{what}: {error}")
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


def run_status(url: str, as_json: bool, watch: float | None, client: str | None = None, verbose: bool = False) -> int:
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
            if client is not None and client not in status["clients"]:
                print(f"gpu-orchestrator status: no client {client!r}; the model map has: "
                      f"{', '.join(status['clients']) or 'none'}", file=sys.stderr)
                return os.EX_NOUSER
            if as_json:
                document = {"models_status": status, "gpu_info": info}
                if client is not None:
                    document = {"client": client, "models_status": status["clients"][client],
                                "gpu_info": info.get("clients", {}).get(client)}
                print(json.dumps(document, indent=2))
            else:
                style = Style.for_stdout()
                if watch and sys.stdout.isatty():
                    print("\033[H\033[2J", end="")
                text = render_client(url, client, status, info, style) if client is not None else \
                    render(url, status, info, style, verbose)
                print(text, flush=True)
            if not watch:
                return 0
            time.sleep(watch)
    except KeyboardInterrupt:
        return 0
