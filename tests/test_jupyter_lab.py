"""`jupyter lab` opens the course: every notebook is listed by the server's contents API."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the GPU machine has none)")

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, token: str):
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def test_jupyter_lab_lists_every_notebook(tmp_path):
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
    ]
    log_path = tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)},
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    listing = _get_json(f"{base}/api/contents/notebooks", token)
                    break
                except (urllib.error.URLError, ConnectionError):
                    assert server.poll() is None, log_path.read_text()
                    assert time.monotonic() < deadline, "jupyter lab did not answer in 90 s"
                    time.sleep(0.5)
            notebooks = [item["name"] for item in listing["content"] if item["type"] == "notebook"]
            on_disk = sorted(path.name for path in (ROOT / "notebooks").glob("*.ipynb"))
            assert on_disk and sorted(notebooks) == on_disk
            assert _get_json(f"{base}/lab/api/settings", token)  # the JupyterLab app is served
        finally:
            server.terminate()
            server.wait(timeout=30)
