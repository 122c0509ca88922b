"""A real headless Chromium (Debian's `chromium`), driven over the DevTools protocol on a pipe.

`--remote-debugging-pipe` speaks the protocol on descriptors 3 (commands in) and 4 (answers out),
NUL-separated JSON: no port to find, no WebSocket client needed. Everything the browser writes
(profile, caches, temporary and shared-memory files) goes under a temporary folder of its own,
removed when it closes.
"""

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    return path


class Browser:
    def __init__(self, tmp: Path, width: int = 1280, height: int = 900):
        # Short, under /tmp: Chromium's singleton socket lives in TMPDIR and a Unix socket path
        # is limited to 108 bytes, which pytest's folders can pass.
        self.home = home = Path(tempfile.mkdtemp(prefix="chromium-"))
        commands_r, self.commands = os.pipe()
        self.answers, answers_w = os.pipe()
        env = {**os.environ, "HOME": str(home), "TMPDIR": str(home), "XDG_CONFIG_HOME": str(home),
               "XDG_CACHE_HOME": str(home)}
        # bash (dash takes only one-digit descriptors) moves our pipe ends to 3 and 4, where the
        # protocol expects them.
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{commands_r} 4>&{answers_w}', chromium(), *FLAGS,
             f"--user-data-dir={home / 'profile'}", f"--window-size={width},{height}", "about:blank"],
            pass_fds=(commands_r, answers_w), env=env, stdout=subprocess.DEVNULL,
            stderr=open(tmp / "chromium.log", "wb"), start_new_session=True)
        os.close(commands_r)
        os.close(answers_w)
        self.buffer, self.next_id, self.session = b"", 0, None
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        try:
            os.write(self.commands, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise AssertionError(f"chromium exited ({self.proc.wait()}) before {method}; see chromium.log") from None
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self.next_id:
                    if "error" in answer:
                        raise AssertionError(f"{method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise AssertionError(f"chromium did not answer {method} within {timeout} s")
            chunk = os.read(self.answers, 1 << 20)
            if not chunk:
                raise AssertionError(f"chromium exited ({self.proc.wait()}) during {method}")
            self.buffer += chunk

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """The whole page, not only the window."""
        height = self.evaluate("document.documentElement.scrollHeight")
        width = self.evaluate("document.documentElement.clientWidth")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except AssertionError:
            pass  # already gone or hung: the process group is killed below either way
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # renderers and helpers share its process group
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self.commands)
        os.close(self.answers)
        shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
