"""Real parts for every test: the simulated model over HTTP on loopback, the
wsagent server on port 0, and real ``websockets`` clients."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from websockets.asyncio.client import ClientConnection, connect

from wsagent import chunks
from wsagent.config import Settings
from wsagent.run import Run
from wsagent.server import WsAgentServer
from wsagent.simulator import SimulatorServer, SimulatorSettings
from wsagent.upstream import UpstreamClient, UpstreamConfig

from .browser import Browser

TERMINAL = {"done", "error", "cancelled"}

#: ``pytest --hypothesis-profile=long``: the cluster model (tests/test_cluster_model.py) runs more and longer
#: examples than its CI profile (tests with settings of their own keep them).
hypothesis_settings.register_profile("long", max_examples=30, stateful_step_count=25, deadline=None,
                                     suppress_health_check=list(HealthCheck))


@contextlib.asynccontextmanager
async def simulator() -> AsyncIterator[SimulatorServer]:
    """The simulated model on a loopback port: unthrottled, 24 tokens, fault switches on."""
    server = await SimulatorServer(SimulatorSettings(rate=0, tokens=24, switches=True)).start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def sim() -> AsyncIterator[SimulatorServer]:
    async with simulator() as server:
        yield server


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium, driven over the DevTools protocol."""
    started = await Browser().start()
    try:
        yield started
    finally:
        await started.close()


def upstream_for(sim: SimulatorServer, **overrides: Any) -> UpstreamClient:
    config: dict[str, Any] = {"base_url": sim.base_url, "backoff_base": 0.01, "first_byte_timeout": 10,
                              "read_timeout": 10}
    config.update(overrides)
    return UpstreamClient(UpstreamConfig(**config))


ServerFactory = Callable[..., Awaitable[WsAgentServer]]


@pytest.fixture
async def make_server(sim: SimulatorServer) -> AsyncIterator[ServerFactory]:
    """Start a wsagent server on 127.0.0.1:0 streaming from ``sim``; settings as keyword arguments."""
    started: list[WsAgentServer] = []

    async def factory(upstream: dict[str, Any] | None = None, **overrides: Any) -> WsAgentServer:
        settings = Settings(host="127.0.0.1", port=0, **overrides)
        server = await WsAgentServer(settings, upstream_for(sim, **(upstream or {}))).start()
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            await server.stop(drain=0)


@pytest.fixture
async def server(make_server: ServerFactory) -> WsAgentServer:
    return await make_server()


def ws_connect(server: WsAgentServer, path: str, **kwargs: Any) -> Any:
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    return connect(f"{server.url}{path}", **kwargs)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    message = await ws.recv()
    assert isinstance(message, str)
    data = json.loads(message)
    assert isinstance(data, dict)
    return data


async def run_events(ws: ClientConnection, run_id: str, others: dict[str, list[dict[str, Any]]] | None = None,
                     ) -> list[dict[str, Any]]:
    """Read events until ``run_id`` ends; events of other runs go to ``others``."""
    events: list[dict[str, Any]] = []
    while True:
        event = await recv_json(ws)
        if event.get("id") == run_id:
            events.append(event)
            if event["type"] in TERMINAL:
                return events
        elif others is not None:
            others.setdefault(str(event.get("id")), []).append(event)


async def text_reply(ws: ClientConnection) -> str:
    """Read text-mode frames until ``[DONE]`` or ``[ERROR]``."""
    parts: list[str] = []
    while True:
        message = await ws.recv()
        assert isinstance(message, str)
        parts.append(message)
        if message.endswith("\n[DONE]") or message.startswith("[ERROR]") or "[CANCELLED]" in message:
            return "".join(parts)


def content(events: list[dict[str, Any]], kind: str = "token") -> str:
    return "".join(e["content"] for e in events if e["type"] == kind)


def find_run(server: WsAgentServer, run_id: str) -> Run | None:
    """The newest run with ``run_id``, whoever started it (tests look runs up from outside any scope)."""
    return next((run for run in reversed(list(server.runs)) if run.id == run_id), None)


@pytest.fixture(params=["orjson", "json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Chunks decoded by orjson (when installed) and by the standard library: each test gets the same result."""
    if request.param == "json":
        monkeypatch.setattr(chunks, "loads", json.loads)
    elif chunks.loads is json.loads:
        pytest.skip("orjson is not installed")
    return str(request.param)
