"""`jupyter lab` opens the course: every notebook is listed by the server's contents API, and
notebook 01's explorer renders as a live widget in a real browser (headless Chromium)."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the GPU machine has none)")

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, token: str | None = None):
    headers = {"Authorization": f"token {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def _wait_for(condition, seconds: float, what: str, alive=lambda: True):
    """Poll ``condition`` until it returns something true; fail after ``seconds``."""
    deadline, value = time.monotonic() + seconds, None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (urllib.error.URLError, ConnectionError, FileNotFoundError):
            pass
        assert alive(), f"{what}: the process died"
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s (last: {value})"
        time.sleep(0.5)


@contextlib.contextmanager
def jupyter_lab(tmp_path: Path, *options: str) -> Iterator[tuple[str, str]]:
    """A `jupyter lab` server on 127.0.0.1 serving the repository: (base URL, token). It is shut
    down by its own process id (and its process group: the kernels it started)."""
    port, token = _free_port(), secrets.token_hex(16)
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={ROOT}",
        *options,
    ]
    log_path = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)},
            start_new_session=True,
        )
        try:
            _wait_for(
                lambda: _get_json(f"{base}/api/status", token),
                90,
                f"jupyter lab (log: {log_path})",
                alive=lambda: server.poll() is None,
            )
            yield base, token
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def test_jupyter_lab_lists_every_notebook(tmp_path):
    with jupyter_lab(tmp_path) as (base, token):
        listing = _get_json(f"{base}/api/contents/notebooks", token)
        notebooks = [item["name"] for item in listing["content"] if item["type"] == "notebook"]
        on_disk = sorted(path.name for path in (ROOT / "notebooks").glob("*.ipynb"))
        assert on_disk and sorted(notebooks) == on_disk
        assert _get_json(f"{base}/lab/api/settings", token)  # the JupyterLab app is served


class DevTools:
    """Just enough of the Chrome DevTools protocol to evaluate JavaScript in a page."""

    def __init__(self, websocket_url: str):
        import websocket  # websocket-client, a dependency of jupyter_server

        self.socket = websocket.create_connection(websocket_url, timeout=30, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


# What the page shows of notebook 01's widget: sliders, a figure drawn inside the widget's
# output, and the two messages JupyterLab shows instead of a widget it cannot render.
WIDGET_STATE_JS = """(() => {
  const text = document.body?.innerText ?? '';
  const interact = document.querySelectorAll('.widget-interact');
  return {
    kernel: window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status
      ?? null,
    cells: document.querySelectorAll('.jp-Notebook .jp-Cell').length,
    running: [...document.querySelectorAll('.jp-InputArea-prompt')]
      .some(p => p.innerText.includes('*')),
    interact: interact.length,
    sliders: document.querySelectorAll('.widget-interact .widget-slider').length,
    figures: document.querySelectorAll('.widget-interact img').length,
    loading: text.includes('Loading widget...'),
    widgetError: text.includes('Error displaying widget'),
    traceback: text.includes('Traceback (most recent call last)'),
  };
})()"""


def test_notebook_01_explorer_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium: .ci/run installs Debian's chromium package")
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    with jupyter_lab(tmp_path, "--LabApp.expose_app_in_browser=True") as (base, token):
        profile = tmp_path / "chromium-profile"
        url = f"{base}/lab/tree/notebooks/01_routing.ipynb?token={token}"
        browser = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",  # runs as root in CI
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = profile / "DevToolsActivePort"
            port = _wait_for(
                lambda: port_file.read_text().split()[0], 60, "chromium's DevTools port",
                alive=lambda: browser.poll() is None,
            )  # fmt: skip

            def page():
                targets = _get_json(f"http://127.0.0.1:{port}/json")
                pages = [t for t in targets if t["type"] == "page" and "01_routing" in t["url"]]
                return pages[0]["webSocketDebuggerUrl"] if pages else None

            tools = DevTools(_wait_for(page, 30, "the notebook's page"))

            def state():
                return tools.evaluate(WIDGET_STATE_JS)

            _wait_for(
                lambda: state()["kernel"] == "idle" and state()["cells"] > 20,
                120,
                "notebook 01 open with an idle kernel",
            )
            tools.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            final = {}

            def drawn():
                final.update(state())
                return final["figures"] and not final["running"] and not final["loading"]

            try:
                _wait_for(drawn, 300, "notebook 01 run, its explorer drawn")
            except AssertionError as error:
                raise AssertionError(f"{error}; the page showed {final}") from None
            screenshot = tools.call("Page.captureScreenshot", format="png")["data"]
            assert len(screenshot) > 10_000  # a rendered page, not a blank one
            assert final["interact"] == 1 and final["sliders"] == 4, final
            assert not final["widgetError"] and not final["traceback"], final
        finally:
            os.killpg(browser.pid, signal.SIGKILL)
            browser.wait()
