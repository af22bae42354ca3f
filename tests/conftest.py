"""Real parts for every test: the simulated model over HTTP on loopback, the
wsagent server on port 0, and real ``websockets`` clients.

Fixtures only: what tests call themselves is in tests/helpers.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from wsagent.core import chunks
from wsagent.core.config import Settings
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .browser import Browser
from .helpers import AI_SDK_EXAMPLE, ROOT, Cluster, ServerFactory, redis_server, simulator, upstream_for

#: ``pytest --hypothesis-profile=long``: the cluster model (tests/test_cluster_model.py) runs more and longer
#: examples than its CI profile (tests with settings of their own keep them).
hypothesis_settings.register_profile("long", max_examples=30, stateful_step_count=25, deadline=None,
                                     suppress_health_check=list(HealthCheck))


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


@pytest.fixture(params=["orjson", "json"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Chunks decoded by orjson (when installed) and by the standard library: each test gets the same result."""
    if request.param == "json":
        monkeypatch.setattr(chunks, "loads", json.loads)
    elif chunks.loads is json.loads:
        pytest.skip("orjson is not installed")
    return str(request.param)


@pytest.fixture
async def cluster(sim: SimulatorServer) -> AsyncIterator[Cluster]:
    """Cluster mode: a ``redis-server`` of its own; nodes started by the test (:meth:`Cluster.start`)."""
    async with contextlib.AsyncExitStack() as stack:
        port, process = await stack.enter_async_context(redis_server())
        yield Cluster(stack, sim, port, process)


@pytest.fixture
async def page_url() -> AsyncIterator[str]:
    """The AI SDK example, built now and served by a static server on loopback."""
    build = await asyncio.create_subprocess_exec("npm", "run", "-s", "build:example", cwd=ROOT)
    assert await build.wait() == 0
    app = web.Application()
    app.router.add_static("/", AI_SDK_EXAMPLE)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
