"""The benchmark's floor: the least any Python relay on ``websockets`` can do.

    python scripts/peer_floor.py --port 8103    (BENCH_UPSTREAM_URL=http://127.0.0.1:8001/v1)

Each upstream read's bytes go to the client as one binary frame, as they came: no SSE parsing, no
JSON, no text encoding, no merging, no backpressure beyond ``websockets``' own. A relay that does
its job (parse, pick the content, frame it for a browser) cannot do less work per token; every
wsagent figure is reported as a ratio to this one. When the client leaves, the relay's task is
cancelled, which closes the upstream connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os

import aiohttp
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

UPSTREAM = os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:8001/v1") + "/chat/completions"


async def main(port: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def relay(ws: ServerConnection, prompt: str) -> None:
            body = json.dumps({"model": "wsagent-sim", "stream": True,
                               "messages": [{"role": "user", "content": prompt}]})
            async with session.post(UPSTREAM, data=body, headers={"Content-Type": "application/json"}) as response:
                async for data in response.content.iter_any():
                    await ws.send(data)

        async def handler(ws: ServerConnection) -> None:
            task: asyncio.Task[None] | None = None
            try:
                async for prompt in ws:
                    if task is not None:
                        await task
                    task = asyncio.create_task(relay(ws, str(prompt)))
            except ConnectionClosed:
                pass
            finally:
                if task is not None and not task.done():
                    task.cancel()  # the client left: close the upstream request now
                    with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                        await task

        async with serve(handler, "127.0.0.1", port, max_size=1 << 20, ping_interval=None):
            await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8103)
    asyncio.run(main(parser.parse_args().port))
