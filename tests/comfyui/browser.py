"""A real ComfyUI server and a headless Chromium driven over the DevTools protocol, for the browser
tests (test_browser.py), which also render the README screenshots and template thumbnails:

    DITPRUNE_WRITE_SCREENSHOTS=1 python -m pytest -q tests/comfyui/test_browser.py

Chromium is Debian's ``chromium`` package (``apt-get install chromium``); the DevTools websocket
client is aiohttp's, which ComfyUI itself requires. Nothing here imports ComfyUI: the server is a
subprocess started the way tests/comfyui/test_server.py starts it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
VIEWPORT = (1600, 1000)


def find_chromium() -> str | None:
    for name in (os.environ.get("DITPRUNE_CHROMIUM"), *CHROMIUM_NAMES):
        if name and (path := shutil.which(name)):
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return get_json(url)
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited: {log.read_text()[-3000:]}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer in {seconds:.0f} s") from None
            time.sleep(0.3)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def comfy_server(comfy_root: Path, base: Path, start_seconds: float = 180) -> Iterator[str]:
    """ComfyUI on 127.0.0.1 with ``base`` as its base directory and this pack in custom_nodes.

    Yields the server URL once ``/object_info`` answers (within ``start_seconds``)."""
    for sub in ("custom_nodes", "user", "input", "output", "models/diffusion_models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "ditprune"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log_path = base / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--base-directory",
                str(base),
                "--disable-auto-launch",
                "--database-url",
                f"sqlite:///{base}/user/comfyui.db",
            ],
            cwd=comfy_root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for(f"{url}/object_info/DitPruneApplyPruning", server, log_path, start_seconds)
            yield url
        finally:
            _stop(server)


class Page:
    """One Chromium tab over the DevTools protocol: evaluate JavaScript, take screenshots."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.console: list[str] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("method") == "Runtime.consoleAPICalled":
                args = msg["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif msg.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(msg["params"]["exceptionDetails"])[:500])
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg["result"])

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), as JSON."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"JavaScript failed: {text}\n--- in ---\n{expression[:800]}")
        return result["result"].get("value")

    async def wait_js(self, expression: str, seconds: float = 60) -> Any:
        deadline = time.monotonic() + seconds
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} stayed false for {seconds:.0f} s")
            await asyncio.sleep(0.25)

    async def screenshot(self, path: Path, *, quality: int | None = None, scale: float = 1.0) -> Path:
        """The page as shown (PNG, or JPEG for .jpg), optionally scaled down."""
        fmt = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
        params: dict[str, Any] = {"format": fmt}
        if quality is not None and fmt == "jpeg":
            params["quality"] = quality
        if scale != 1.0:
            width, height = await self.js("[window.innerWidth, window.innerHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": height, "scale": scale}
        data = await self.send("Page.captureScreenshot", **params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


@contextlib.asynccontextmanager
async def chromium_page(chromium: str, url: str, viewport: tuple[int, int] = VIEWPORT) -> Any:
    """A headless Chromium showing ``url``, as a :class:`Page`; the browser is stopped afterwards."""
    import aiohttp  # ComfyUI's own dependency; imported here so collecting the tests never needs it

    port = free_port()
    profile = Path(tempfile.mkdtemp(prefix="ditprune-chromium-"))
    log_path = profile / "chromium.log"
    with log_path.open("w") as log:
        browser = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--force-device-scale-factor=1",
                f"--window-size={viewport[0]},{viewport[1]}",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            targets = _wait_for(f"http://127.0.0.1:{port}/json/list", browser, log_path, 60)
            ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(ws_url, max_msg_size=0) as ws,
            ):
                page = Page(ws)
                await page.send("Runtime.enable")
                await page.send("Page.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=viewport[0],
                    height=viewport[1],
                    deviceScaleFactor=1,
                    mobile=False,
                )
                await page.send("Page.navigate", url=url)
                yield page
        finally:
            _stop(browser)
            shutil.rmtree(profile, ignore_errors=True)


# --- JavaScript run in the ComfyUI page -------------------------------------------------------------

APP_READY = "!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph)"

# ComfyUI shows its first-run dialogs (templates browser) on a fresh user folder: skip them.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Minimap.Visible": False,
}


def geometry_js() -> str:
    """Nodes, groups and rendered link paths, and every link that runs behind a node it does not
    end at, read from the canvas as drawn (``canvas.renderedPaths``, tested with isPointInStroke)."""
    return r"""
(() => {
  const g = app.graph, c = app.canvas;
  c.draw(true, true);
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = g._nodes.map(n => ({
    id: n.id, type: n.type, title: n.title,
    registered: n.type in LiteGraph.registered_node_types && !n.has_errors,
    rect: [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title],
  }));
  const groups = g._groups.map(gr => ({title: gr.title, rect: Array.from(gr._bounding)}));
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.lineWidth = 6;
  const behind = [];
  for (const seg of c.renderedPaths) {
    // a link's last segment, or a reroute's segment shared by several links
    const links = seg.linkIds ? [...seg.linkIds].map(id => g._links.get(id)).filter(Boolean) : [seg];
    if (!seg.path || !links.length) continue;
    const ends = new Set(links.flatMap(l => [l.origin_id, l.target_id]));
    const link = links[0];
    for (const n of nodes) {
      if (ends.has(n.id)) continue;
      const [x, y, w, h] = n.rect;
      let hit = false;
      for (let px = x + 4; px < x + w - 4 && !hit; px += 6)
        for (let py = y + 4; py < y + h - 4 && !hit; py += 6)
          if (ctx.isPointInStroke(seg.path, px, py)) hit = true;
      if (hit) behind.push({link: link.id, from: link.origin_id, to: link.target_id, node: n.id});
    }
  }
  // every Note's text must show whole: its textarea may not scroll
  const notes = g._nodes.filter(n => n.type === 'Note').map(n => {
    const el = n.widgets?.[0]?.element;
    return {id: n.id, title: n.title, overflow: el ? el.scrollHeight - el.clientHeight : null};
  });
  // the widget values as the frontend holds them after loading (what a run would use)
  const widgets = g._nodes.map(n => ({id: n.id, type: n.type, values: (n.widgets || []).map(w => w.value)}));
  return {nodes, groups, behind, notes, widgets, scale: c.ds.scale};
})()
"""
