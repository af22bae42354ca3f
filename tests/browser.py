"""Headless Chromium driven over the DevTools protocol, with the websockets client we already depend on."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import tempfile
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--remote-debugging-port=0"]


#: ``t.until(check)`` for a page's helpers: resolves with ``check()``'s first truthy value, re-checked on every
#: change to the document (event driven, never polled).
UNTIL = """  until(check) {
    return new Promise(resolve => {
      const test = () => { const v = check(); if (v) { observer.disconnect(); resolve(v); } };
      const observer = new MutationObserver(test);
      observer.observe(document.body, { childList: true, subtree: true, characterData: true, attributes: true });
      test();
    });
  },
"""


class Browser:
    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="wsagent-chromium-")
        self.process: asyncio.subprocess.Process | None = None
        self.ws: ClientConnection | None = None
        self.session: str | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None

    async def start(self) -> Browser:
        self.process = await asyncio.create_subprocess_exec(
            CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert self.process.stderr is not None
        async with asyncio.timeout(60):
            while True:
                line = (await self.process.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("chromium exited before DevTools was ready")
                if "DevTools listening on " in line:
                    endpoint = line.split("DevTools listening on ", 1)[1].strip()
                    break
        self._drain = asyncio.ensure_future(self._discard(self.process.stderr))
        self.ws = await connect(endpoint, max_size=None, open_timeout=30)
        self._reader = asyncio.ensure_future(self._read())
        target = await self.call("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                                   browser=True)
        self.session = attached["sessionId"]
        await self.call("Page.enable")
        await self.call("Runtime.enable")
        return self

    @staticmethod
    async def _discard(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            reply = json.loads(message)
            future = self._pending.pop(reply.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(reply)

    async def call(self, method: str, params: dict[str, Any] | None = None, browser: bool = False) -> dict[str, Any]:
        assert self.ws is not None
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self.session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[message["id"]] = future
        await self.ws.send(json.dumps(message))
        reply = await asyncio.wait_for(future, 60)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        """Run JavaScript in the page; a returned promise is awaited. Returns the value."""
        result = await self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", {"url": url})
        await self.evaluate("new Promise(r => document.readyState === 'complete' ? r() : "
                            "addEventListener('load', () => r()))")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        for task in (self._reader, self._drain):
            if task is not None:
                task.cancel()
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
