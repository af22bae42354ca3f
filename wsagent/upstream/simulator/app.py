"""The simulator's aiohttp app: its routes (answers streamed by :func:`~.play.play` on their connection,
background responses by :mod:`.background`, ``GET /stats``); and :class:`SimulatorServer`, which serves it
on a loopback port inside the current event loop."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from aiohttp import web

from .background import BackgroundResponses, error
from .chat_format import ChatFormat
from .plan import cap, continued, directives, last_user_text, plan
from .play import Format, play
from .responses_format import ResponsesFormat, chat_body
from .settings import SimulatorSettings
from .stats import BackgroundStat, SimStats

__all__ = ["SIMULATOR", "BackgroundStat", "SimStats", "Simulator", "SimulatorServer", "make_app"]


class Simulator:
    """The aiohttp handlers; one instance per app holds its settings and stats."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.stats = SimStats()
        self._failures: dict[str, int] = {}
        self.background = BackgroundResponses(self.stats, settings.background_kept, settings.rate)

    async def stats_view(self, request: web.Request) -> web.Response:
        """What the simulator saw, for benchmarks running it in another process."""
        stats = self.stats
        if "tag" in request.query:
            return web.json_response(stats.tags.get(request.query["tag"], {}))
        return web.json_response({
            "requests": stats.requests, "streams": stats.streams, "active": stats.active,
            "completed": stats.completed, "disconnected": stats.disconnected, "tokens_sent": stats.tokens_sent,
            "disconnect_times": stats.disconnect_times[-10000:],
            "background": {key: asdict(stat) for key, stat in stats.background.items()},
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
        background = make is ResponsesFormat and raw_body.get("background") is True
        if background and raw_body.get("store") is False:  # ``store`` left out is true, as OpenAI has it
            return error(400, "Background mode requires store=true: a background response is kept to be retrieved.",
                         "invalid_request_error", param="store")
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
        prefix = continued(body)
        if prefix is not None:
            self.stats.continued = [*self.stats.continued[-99:], prefix]
        model = str(body.get("model") or self.settings.model)
        nl = {"crlf": "\r\n", "cr": "\r"}.get(switches.get("newline", "lf"), "\n")
        fmt = make(raw_body, model, plan(body, switches, prompt, self.settings), nl)
        streamed = bool(body.get("stream")) and switches.get("json") != "1"
        if background and isinstance(fmt, ResponsesFormat):
            return await self.background.start(request, fmt, switches, streamed)
        if not streamed:
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
        tag = stats.tags.setdefault(switches["tag"], {"tokens": 0, "streams": 0}) if "tag" in switches else None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        with stats.streaming(tag) as streamed:
            await response.prepare(request)
            ending = await play(fmt, switches, self.settings.rate, _Connection(request, response, stats, tag))
            if ending == "end":
                await response.write_eof()
            streamed.finished = True
        return response


class _Connection:
    """The :class:`~.play.Sink` of an answer streamed on its request's connection."""

    def __init__(self, request: web.Request, response: web.StreamResponse, stats: SimStats,
                 tag: dict[str, float] | None) -> None:
        self.request = request
        self.response = response
        self.stats = stats
        self.tag = tag

    async def write(self, text: str) -> None:
        await self.response.write(text.encode())

    async def comment(self, text: str) -> None:
        await self.response.write(text.encode())

    def drop(self) -> bool:
        assert self.request.transport is not None
        self.request.transport.abort()
        return True

    def token(self, sent: int) -> None:
        self.stats.tokens_sent += 1
        if self.tag is not None:
            self.tag["tokens"] = sent


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    return error(status, message, kind, headers, code=str(status))


SIMULATOR = web.AppKey("simulator", Simulator)


def make_app(settings: SimulatorSettings | None = None) -> web.Application:
    """The simulator as an aiohttp app; ``app[SIMULATOR]`` holds its settings and stats."""
    sim = Simulator(settings or SimulatorSettings())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIMULATOR] = sim
    app.router.add_post("/v1/chat/completions", sim.completions)
    app.router.add_post("/v1/responses", sim.responses)
    app.router.add_get("/v1/responses/{response_id}", sim.background.retrieve)
    app.router.add_post("/v1/responses/{response_id}/cancel", sim.background.cancel)
    app.on_shutdown.append(sim.background.close)
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
