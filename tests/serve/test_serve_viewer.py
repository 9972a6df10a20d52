"""The web viewer in a real headless Chromium: the screenshot shows the red segmentation overlay on the image, the
page logs no error (console, exceptions, failed loads, CSP), and the viewer's cookie is bound to its job.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages separated by
NUL bytes on file descriptors 3 and 4), so no extra Python package is needed.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medlens.serve.viewer import find_modules

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "viewer-test-token-0123456789"
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(
        find_modules() is None, reason="NiiVue is not installed: run 'make install' (npm ci in viewer/)"
    ),
]


class Browser:
    """A headless Chromium spoken to over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path, size: tuple[int, int] = (900, 700)) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # the protocol's descriptors must be exactly 3 (in) and 4 (out), and inherited
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # above 4, so dup2 below really copies
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--enable-unsafe-swiftshader", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def _recv(self, timeout: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from_chrome], [], [], timeout)
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, session: bool = True, timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._recv(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def open_page(self) -> None:
        target = self.call("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 25.0) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression} stayed false")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions, failed loads (4xx/5xx or network) and browser log errors."""
        out = []
        urls = {
            e["params"]["requestId"]: e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        }
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    "console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + p["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']} ({p['entry'].get('url', '')})")
            elif method == "Network.responseReceived" and p["response"]["status"] >= 400:
                out.append(f"http {p['response']['status']}: {p['response']['url']}")
            elif method == "Network.loadingFailed":
                if p.get("canceled") and not p.get("blockedReason"):
                    continue  # given up by the page or browser (seen on a starved CPU), not a missing resource
                url = urls.get(p.get("requestId"), "?")
                out.append(f"load failed: {p.get('errorText')} ({url}, canceled={p.get('canceled')})")
        return out

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", session=False, timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture(scope="module")
def server(seg_run: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """``(base URL, TestClient-like httpx client with the token)``: the service on a free loopback port."""
    import httpx
    import uvicorn

    from medlens.serve.api import create_app

    _, run = seg_run
    app = create_app([run], names=["blobs"], token=TOKEN, work_dir=tmp_path_factory.mktemp("jobs"), threads=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    for _ in range(100):
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield base, client
    client.close()
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _job(client: Any, dataset: Any, uncertainty: bool) -> str:
    image = Path(dataset.root) / dataset.test[0].image[0]
    r = client.post(
        "/models/blobs/predict",
        params={"uncertainty": uncertainty},
        files={"file": ("x.nii.gz", image.read_bytes())},
    )
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "done", r.json()
    return str(r.json()["id"])


def _red_and_blue(png: bytes) -> tuple[int, int, int]:
    from PIL import Image as PILImage

    rgb = np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = int(((r > 120) & (r > 2 * g) & (r > 2 * b)).sum())
    blue = int(((b > 100) & (b > 1.5 * r) & (b > 1.2 * g)).sum())
    grey = int(((r > 40) & (abs(r - g) < 12) & (abs(g - b) < 12)).sum())
    return red, blue, grey


def test_viewer_shows_segmentation_and_uncertainty_overlays_without_errors(
    server: tuple[str, Any], seg_run: tuple[Any, Path], tmp_path: Path
) -> None:
    base, client = server
    job = _job(client, seg_run[0], uncertainty=True)
    link = client.post(f"/jobs/{job}/viewer").json()["url"]
    browser = Browser(tmp_path / "profile")
    try:
        browser.open_page()
        browser.call("Page.navigate", url=base + link)
        state = browser.wait_for(
            "['ready','failed','error'].includes(document.body.dataset.state) && document.body.dataset.state"
        )
        status_text = browser.evaluate("document.getElementById('state').textContent")
        assert state == "ready", status_text
        assert "label" in status_text and "uncertainty" in status_text
        assert browser.evaluate("location.search") == ""  # the ticket left the address bar
        time.sleep(0.5)  # let NiiVue draw the last frame
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "viewer.png").write_bytes(png)
        red, blue, grey = _red_and_blue(png)
        # The blob covers a few % of each slice view: hundreds of red pixels; the crosshair is green.
        assert red > 500, f"no segmentation overlay in the screenshot ({red} red pixels)"
        assert blue > 100, f"no uncertainty overlay in the screenshot ({blue} blue pixels)"
        assert grey > 500, f"the image itself is not drawn ({grey} grey pixels)"
        # Hiding the segmentation removes the red: it was the overlay, not page decoration.
        browser.evaluate("const c = document.getElementById('show-label'); c.checked = false; "
                         "c.dispatchEvent(new Event('input')); true")  # fmt: skip
        time.sleep(0.5)
        hidden = _red_and_blue(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
        assert hidden[0] < red / 5, (hidden, red)
        assert browser.errors() == []
    finally:
        browser.close()


def test_viewer_cookie_opens_only_its_own_job(server: tuple[str, Any], seg_run: tuple[Any, Path]) -> None:
    import httpx

    base, client = server
    first, second = _job(client, seg_run[0], False), _job(client, seg_run[0], False)
    link = client.post(f"/jobs/{first}/viewer").json()["url"]
    browser = httpx.Client(base_url=base, timeout=30, follow_redirects=True)  # no token: a browser
    try:
        assert browser.get(f"/viewer/{first}").status_code == 401  # no cookie yet
        opened = browser.get(link)  # ticket -> cookie -> redirect to the bare page
        assert opened.status_code == 200 and "niivue.umd.js" in opened.text
        assert "default-src 'self'" in opened.headers["content-security-policy"]
        assert browser.get(f"/viewer/{first}/files/label.nii.gz").status_code == 200
        assert browser.get(link).status_code == 401  # single use
        assert browser.get(f"/viewer/{second}").status_code == 401  # the cookie is for the first job only
        assert browser.get(f"/viewer/{second}/files/label.nii.gz").status_code == 401
        assert browser.get(f"/viewer/{first}/files/result.json").status_code == 404  # not a viewer file
        assert browser.get(f"/jobs/{first}").status_code == 401  # the cookie is not an API token
        assert browser.get("/static/niivue/niivue.umd.js").status_code == 200  # served locally
    finally:
        browser.close()
