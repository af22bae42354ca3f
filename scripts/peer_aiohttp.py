"""A benchmark peer: the relay an aiohttp expert would write, no SDK.

    python scripts/peer_aiohttp.py --port 8101    (BENCH_UPSTREAM_URL=http://127.0.0.1:8001/v1)

aiohttp's own WebSocket server (``web.WebSocketResponse``) on ``/ws/chat``, the tutorial's text protocol:
a prompt in, each content delta out as a text frame, then ``\\n[DONE]``. The upstream is read with
aiohttp's client line by line (``json.loads`` per ``data:`` line). When the client leaves, the
relay's task is cancelled, which closes the upstream connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os

import aiohttp
from aiohttp import web

UPSTREAM = os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8001/v1") + "/chat/completions"
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(session: aiohttp.ClientSession, ws: web.WebSocketResponse, prompt: str) -> None:
    body = {"model": "wsagent-sim", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    try:
        async with session.post(UPSTREAM, json=body) as response:
            if response.status != 200:
                await ws.send_str(f"[ERROR] upstream HTTP {response.status}")
                return
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                choices = json.loads(data).get("choices") or ()
                content = choices[0].get("delta", {}).get("content") if choices else None
                if content:
                    await ws.send_str(content)
        await ws.send_str("\n[DONE]")
    except (aiohttp.ClientError, ValueError) as exc:
        await ws.send_str(f"[ERROR] {exc}")


async def chat(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=1 << 20, compress=True)
    await ws.prepare(request)
    session = request.app[SESSION]
    task: asyncio.Task[None] | None = None
    try:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                if task is not None:
                    await task  # one prompt at a time, answered in order
                task = asyncio.create_task(relay(session, ws, message.data))
    finally:
        if task is not None and not task.done():
            task.cancel()  # the client left: close the upstream request now
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return ws


async def make_app() -> web.Application:
    app = web.Application()
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None))
    app.router.add_get("/ws/chat", chat)

    async def close(app: web.Application) -> None:
        await app[SESSION].close()

    app.on_cleanup.append(close)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8101)
    web.run_app(make_app(), host="127.0.0.1", port=parser.parse_args().port, access_log=None, print=None)
