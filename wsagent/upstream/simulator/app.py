"""The simulator's aiohttp app: its routes, the fault switches applied, the answer paced; and
:class:`SimulatorServer`, which serves it on a loopback port inside the current event loop."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .chat_format import ChatFormat
from .plan import cap, directives, last_user_text, plan
from .responses_format import ResponsesFormat, chat_body
from .settings import SimulatorSettings

__all__ = ["SIMULATOR", "SimStats", "Simulator", "SimulatorServer", "make_app"]


@dataclass
class SimStats:
    """What the simulated upstream saw; tests and benchmarks read it."""

    requests: int = 0
    streams: int = 0
    active: int = 0
    completed: int = 0
    disconnected: int = 0
    tokens_sent: int = 0
    disconnect_times: list[float] = field(default_factory=list)
    last_body: dict[str, Any] | None = None
    tags: dict[str, dict[str, float]] = field(default_factory=dict)
    changed: asyncio.Condition | None = None

    def disconnect(self, tag: dict[str, float] | None) -> None:
        now = time.monotonic()
        self.disconnected += 1
        self.disconnect_times.append(now)
        if tag is not None:
            tag["disconnected"] = now

    def _notify(self) -> None:
        cond = self.changed
        if cond is not None:
            asyncio.get_running_loop().create_task(_notify_all(cond))

    async def wait_for(self, predicate: Any, limit: float = 10.0) -> None:
        """Wait until ``predicate(stats)`` holds (event driven, not polled); at most ``limit`` seconds."""
        if self.changed is None:
            self.changed = asyncio.Condition()
        async with asyncio.timeout(limit):
            async with self.changed:
                await self.changed.wait_for(lambda: predicate(self))


async def _notify_all(cond: asyncio.Condition) -> None:
    async with cond:
        cond.notify_all()


Format = ChatFormat | ResponsesFormat


class Simulator:
    """The aiohttp handlers; one instance per app holds its settings and stats."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.stats = SimStats()
        self._failures: dict[str, int] = {}

    async def stats_view(self, request: web.Request) -> web.Response:
        """What the simulator saw, for benchmarks running it in another process."""
        stats = self.stats
        if "tag" in request.query:
            return web.json_response(stats.tags.get(request.query["tag"], {}))
        return web.json_response({
            "requests": stats.requests, "streams": stats.streams, "active": stats.active,
            "completed": stats.completed, "disconnected": stats.disconnected, "tokens_sent": stats.tokens_sent,
            "disconnect_times": stats.disconnect_times[-10000:],
        })

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({
            "object": "list",
            "data": [{"id": self.settings.model, "object": "model", "created": 0, "owned_by": "wsagent"}],
        })

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``."""
        return await self._answer(request, "messages", ChatFormat)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: the same answers, in the Responses API's events."""
        return await self._answer(request, "input", ResponsesFormat)

    async def _answer(self, request: web.Request, required: str,
                      make: type[ChatFormat] | type[ResponsesFormat]) -> web.StreamResponse:
        self.stats.requests += 1
        try:
            raw_body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON", "invalid_request_error")
        if not isinstance(raw_body, dict) or not isinstance(raw_body.get(required), (list, str)):
            return _error(400, f"'{required}' is required", "invalid_request_error")
        self.stats.last_body = raw_body
        body = raw_body if make is ChatFormat else chat_body(raw_body)
        switches, prompt = directives(body)
        if not self.settings.switches:
            switches, prompt = {}, last_user_text(body)
        switches = cap(switches)
        status = switches.get("status")
        if status is not None:
            key = switches.get("fail_key", prompt)
            seen = self._failures.get(key, 0)
            self._failures[key] = seen + 1
            if "fail_times" not in switches or seen < int(switches["fail_times"]):
                headers = {}
                if "retry_after_ms" in switches:
                    headers["retry-after-ms"] = switches["retry_after_ms"]
                if "should_retry" in switches:
                    headers["x-should-retry"] = switches["should_retry"]
                return _error(int(status), f"simulated HTTP {status}", "server_error", headers)
        if switches.get("hold") == "1":
            await asyncio.Event().wait()
        if "raw" in switches:
            return await self._raw(request, switches)
        model = str(body.get("model") or self.settings.model)
        nl = {"crlf": "\r\n", "cr": "\r"}.get(switches.get("newline", "lf"), "\n")
        fmt = make(raw_body, model, plan(body, switches, prompt, self.settings), nl)
        if not body.get("stream") or switches.get("json") == "1":
            return web.json_response(fmt.whole())
        return await self._stream(request, fmt, switches)

    async def _raw(self, request: web.Request, switches: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        raw = switches["raw"].encode()
        step = int(switches.get("raw_chunk", 0)) or len(raw) or 1
        for start in range(0, len(raw), step):
            await response.write(raw[start:start + step])
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, fmt: Format, switches: dict[str, str]) -> web.StreamResponse:
        stats = self.stats
        stats.streams += 1
        stats.active += 1
        stats._notify()
        the_plan = fmt.plan
        rate = float(switches.get("rate", self.settings.rate))
        interval = 1.0 / rate if rate > 0 else 0.0
        error_after = int(switches.get("error_after", -1))
        stall_after = int(switches.get("stall_after", -1))
        drop_after = int(switches.get("drop_after", -1))
        comment_every = int(switches.get("comment_every", 0))
        stamp = switches.get("stamp") == "1"
        tag = stats.tags.setdefault(switches["tag"], {"tokens": 0, "streams": 0}) if "tag" in switches else None
        if tag is not None:
            tag["streams"] += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        loop = asyncio.get_running_loop()
        finished = False
        try:
            await response.prepare(request)
            await response.write(fmt.begin().encode())
            sent = 0
            start = loop.time()
            pieces: list[tuple[str, str]] = [("reasoning_content", t) for t in the_plan.reasoning]
            pad = int(switches.get("pad", 0))
            pieces += [("content", _padded(t, pad, n) if pad else t) for n, t in enumerate(the_plan.content)]
            if "long" in switches:
                pieces.append(("content", "x" * int(switches["long"])))
            for kind, text in pieces:
                if sent == error_after:
                    await response.write(fmt.error(switches.get("error_done") == "1").encode())
                    finished = True
                    return response
                if sent == stall_after:
                    await asyncio.Event().wait()
                if sent == drop_after:
                    assert request.transport is not None
                    request.transport.abort()
                    finished = True
                    return response
                if interval:
                    delay = start + sent * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if comment_every and sent and sent % comment_every == 0:
                    await response.write(f": ping{fmt.nl}".encode())
                if stamp:
                    text = f"{time.monotonic():.6f} "
                await response.write(fmt.token(kind, text).encode())
                sent += 1
                stats.tokens_sent += 1
                if tag is not None:
                    tag["tokens"] = sent
            await response.write(fmt.end(len(pieces) + len(the_plan.tool_calls)).encode())
            await response.write_eof()
            finished = True
            return response
        except asyncio.CancelledError:
            stats.disconnect(tag)
            raise
        except ConnectionError:
            stats.disconnect(tag)
            return response
        finally:
            stats.active -= 1
            if finished:
                stats.completed += 1
            stats._notify()


_PAD_SIZE = 1 << 20
_pad_text: str | None = None


def _padded(token: str, width: int, n: int) -> str:
    """``token`` filled out to ``width`` characters with random letters, which compress about as
    poorly as real text (a repeated filler would let permessage-deflate hide any backpressure bug)."""
    global _pad_text
    if _pad_text is None:
        rng = random.Random(0)
        _pad_text = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=_PAD_SIZE))
    fill = max(0, width - len(token) - 1)
    start = (n * fill) % (_PAD_SIZE - fill)
    return token + " " + _pad_text[start:start + fill]


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": str(status)}},
        status=status,
        headers=headers,
    )


SIMULATOR = web.AppKey("simulator", Simulator)


def make_app(settings: SimulatorSettings | None = None) -> web.Application:
    """The simulator as an aiohttp app; ``app[SIMULATOR]`` holds its settings and stats."""
    sim = Simulator(settings or SimulatorSettings())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIMULATOR] = sim
    app.router.add_post("/v1/chat/completions", sim.completions)
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_get("/v1/models", sim.models)
    app.router.add_get("/stats", sim.stats_view)
    return app


class SimulatorServer:
    """Run the simulator on a loopback port inside the current event loop."""

    def __init__(self, settings: SimulatorSettings | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = make_app(settings)
        self.host = host
        self.port = port
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)

    @property
    def simulator(self) -> Simulator:
        return self.app[SIMULATOR]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> SimulatorServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()
