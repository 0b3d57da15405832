"""Drive a real headless Chromium through the DevTools protocol: load a page, watch it until a
condition holds, read its DOM, take a screenshot. For the chat page of ``dragon-edge serve``.

Chromium's own ``--dump-dom`` / ``--screenshot`` do not wait for a streamed answer (virtual time
runs on while a fetch streams), so this watches the page instead: it polls a JS expression
every 50 ms and records what the answer showed meanwhile (so a test can tell a streamed answer
from one that arrived in one block).

As a command (the README's manual check; writes the screenshot)::

    python tests/e2e/headless_chromium.py "http://127.0.0.1:8088/?q=What+is+the+home+wifi+password%3F" docs/chat_page.png
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ANSWERED = "document.body.dataset.state === 'answered'"
ANSWER_TEXT = "document.getElementById('answer').textContent"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageRun:
    dom: str
    png: bytes
    seen: list[str] = field(default_factory=list)  # the answer's text at each poll, while it streamed
    seconds: float = 0.0


async def watch_page(url: str, done_js: str = ANSWERED, progress_js: str = ANSWER_TEXT, timeout_s: float = 120,
                     size: tuple[int, int] = (1100, 1000)) -> PageRun:
    """Load ``url`` in a fresh headless Chromium, poll until ``done_js`` is true, return the DOM,
    a PNG screenshot and the values of ``progress_js`` seen on the way."""
    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--hide-scrollbars", f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}",
                                 "--remote-debugging-port=0", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            ws_url = await asyncio.wait_for(asyncio.to_thread(_devtools_url, proc), 60)
            return await asyncio.wait_for(_drive(ws_url, url, done_js, progress_js), timeout_s)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _devtools_url(proc: subprocess.Popen) -> str:
    for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:
            return found.group(1)
    raise RuntimeError(f"chromium exited (code {proc.wait()}) without a DevTools address")


async def _drive(browser_ws: str, url: str, done_js: str, progress_js: str) -> PageRun:
    ids = itertools.count(1)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(browser_ws, max_msg_size=0) as ws:
            async def call(method: str, session: str | None = None, **params) -> dict:
                msg_id = next(ids)
                await ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params,
                                              **({"sessionId": session} if session else {})}))
                while True:  # events and other replies are skipped
                    reply = json.loads((await ws.receive()).data)
                    if reply.get("id") == msg_id:
                        if "error" in reply:
                            raise RuntimeError(f"{method}: {reply['error']}")
                        return reply["result"]

            target = (await call("Target.createTarget", url="about:blank"))["targetId"]
            session = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]

            async def evaluate(expr: str):
                return (await call("Runtime.evaluate", session, expression=expr, returnByValue=True))["result"].get("value")

            t0 = time.monotonic()
            await call("Page.navigate", session, url=url)
            seen: list[str] = []
            while not await evaluate(done_js):
                value = await evaluate(progress_js)
                if value and (not seen or seen[-1] != value):
                    seen.append(value)
                await asyncio.sleep(0.05)
            seconds = time.monotonic() - t0
            dom = await evaluate("document.documentElement.outerHTML")
            shot = await call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
            return PageRun(dom, base64.b64decode(shot["data"]), seen, seconds)


if __name__ == "__main__":
    page_url, out = sys.argv[1], Path(sys.argv[2])
    run = asyncio.run(watch_page(page_url))
    out.write_bytes(run.png)
    print(f"answered in {run.seconds:.1f} s; the answer grew through {len(run.seen)} states; wrote {out}")
