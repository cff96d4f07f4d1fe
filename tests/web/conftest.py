"""A real `facelens serve` in a subprocess and Debian's Chromium driven by Playwright.

Chromium is never downloaded: the tests use /usr/bin/chromium (``apt-get install chromium``) and
skip, saying so, when it is absent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_UPLOAD_MB = 1.0
STARTUP_S = 120


@dataclass
class Server:
    url: str
    upload_dir: Path
    process: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium) to run "
                    "the browser tests")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is needed for the browser tests")
    return CHROMIUM


def start_server(*args: str, env: dict[str, str] | None = None) -> Server:
    """`facelens serve` on a free port with a 1 MB upload limit (and ``args``), once it says where uploads go."""
    pytest.importorskip("gradio", reason="facelens serve needs gradio (the web extra)")
    port = _free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "facelens.cli", "serve", "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB),
         *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    ready = threading.Event()
    found: dict[str, str] = {}

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line.rstrip())
            m = re.search(r"uploads in (\S+)", line)
            if m:
                found["dir"] = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(STARTUP_S) or "dir" not in found:
        proc.kill()
        pytest.fail("facelens serve did not start:\n" + "\n".join(log[-30:]))
    return Server(url=f"http://127.0.0.1:{port}/", upload_dir=Path(found["dir"]), process=proc, log=log)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """`facelens serve` on a free port with a 1 MB upload limit; stopped (SIGTERM) afterwards.

    Browser tests also ask for `browser` (or `chromium`), which skips them when Chromium is absent;
    the HTTP-only tests run without it.
    """
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def playwright(chromium: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: object, chromium: Path) -> Iterator[object]:
    b = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)  # type: ignore[attr-defined]
    yield b
    b.close()


def write_y4m(path: Path, rgb: np.ndarray, frames: int = 10, fps: int = 10) -> Path:
    """A YUV4MPEG2 4:2:0 video of one still RGB frame (Chromium's fake camera plays it in a loop)."""
    import cv2

    h, w = rgb.shape[:2]
    if h % 2 or w % 2:
        raise ValueError("4:2:0 needs even sides")
    i420 = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2YUV_I420)  # Y plane, then U, then V
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for _ in range(frames):
            f.write(b"FRAME\n")
            f.write(i420.tobytes())
    return path


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class ApiSession:
    """One client session of the app over gradio's HTTP API, as the browser talks to it.

    Files go to ``/gradio_api/upload``; events run through ``/gradio_api/call/<api>`` under this
    session's own ``session_hash`` (so its ``gr.State`` is its own); `close` ends the session the
    way a closed tab does (the heartbeat stream drops, gradio runs the page's unload event).
    """

    def __init__(self, server: Server, timeout: float = 180.0) -> None:
        import secrets

        import httpx

        self.base = server.url.rstrip("/")
        self.session_hash = secrets.token_hex(6)
        self.http = httpx.Client(timeout=timeout)
        self._heartbeat: object = None

    def upload(self, name: str, data: bytes) -> dict:
        """Upload the bytes as file ``name``; the payload the browser would then send."""
        r = self.http.post(f"{self.base}/gradio_api/upload", files=[("files", (name, data))])
        r.raise_for_status()
        return {"path": r.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}

    def call(self, api: str, data: list) -> tuple[str, object]:
        """``("complete", outputs)`` or ``("error", message)`` of one event.

        A streaming event (the webcam's) answers each frame with a ``generating`` message and
        completes only when its stream times out; its first answer counts as complete here.
        """
        r = self.http.post(f"{self.base}/gradio_api/call/{api}", json={"data": data, "session_hash": self.session_hash})
        r.raise_for_status()
        event_id = r.json()["event_id"]
        event = None
        with self.http.stream("GET", f"{self.base}/gradio_api/call/{api}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[len("event:"):].strip()
                elif line.startswith("data:") and event in ("complete", "generating", "error"):
                    return ("error" if event == "error" else "complete"), json.loads(line[len("data:"):])
        raise ConnectionError(f"the {api} event ended without a result")

    def open(self) -> None:
        """Hold the heartbeat stream open, as a page does while the tab is open."""
        self._heartbeat = self.http.stream("GET", f"{self.base}/gradio_api/heartbeat/{self.session_hash}")
        self._heartbeat.__enter__()  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.__exit__(None, None, None)  # type: ignore[attr-defined]
            self._heartbeat = None
        self.http.close()
