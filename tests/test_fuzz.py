"""Hostile input at every route: the server never crashes, never sends a traceback, and other
clients keep streaming meanwhile."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from wsagent.config import Settings
from wsagent.server import WsAgentServer
from wsagent.simulator import SimulatorServer, SimulatorSettings

from .conftest import upstream_for

SECRET = "fuzz-secret-that-is-long-enough-for-hs256"
ROUTES = ["/ws", "/ws/agent", "/ws/agent-thoughts", "/ws/robust", "/ws/chat", "/ws/secure", "/ws/someone"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
protocol_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["run", "cancel", "resume", "attach", "ping", "auth", "broadcast", "x"])},
    optional={"id": json_values, "key": json_values, "prompt": json_values, "messages": json_values,
              "params": json_values, "after": json_values, "token": json_values, "agent": json_values,
              "workflow": json_values, "model": json_values, "content": json_values},
).map(json.dumps)
frames = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    json_values.map(json.dumps),
    protocol_like,
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 5000).map(lambda depth: '{"type": "run", "id": "d", "messages": ' + "[" * depth + "]" * depth + "}"),
    st.just(b"\xff\xfe invalid utf-8"),  # sent as a text frame below
)
tokens = st.one_of(st.none(), st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", max_size=60),
                   st.just(jwt.encode({"user_id": "fuzz", "exp": int(time.time()) + 3600}, SECRET, "HS256")))


async def attack(server: WsAgentServer, route: str, token: str | None, payloads: list[Any]) -> list[str]:
    """Connect, throw the payloads, read whatever comes back for a moment."""
    url = f"{server.url}{route}" + (f"?token={token}" if token else "")
    received: list[str] = []
    try:
        async with connect(url, open_timeout=5, close_timeout=1, max_size=None) as ws:
            for payload in payloads:
                if payload == b"\xff\xfe invalid utf-8":
                    ws.protocol.send_text(payload)
                    ws.send_data()
                else:
                    await ws.send(payload)
            try:
                async with asyncio.timeout(0.05):
                    while True:
                        message = await ws.recv()
                        received.append(message if isinstance(message, str) else message.decode("latin-1"))
            except TimeoutError:
                pass
    except (WebSocketException, OSError):
        pass
    return received


def test_fuzz_every_route(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="wsagent")
    with asyncio.Runner() as runner:
        sim = runner.run(SimulatorServer(SimulatorSettings(rate=0, switches=True)).start())
        server = runner.run(WsAgentServer(
            Settings(port=0, jwt_secret=SECRET, max_message_size=65536, messages_per_second=1000,
                     message_burst=1000, max_connections_per_ip=10000),
            upstream_for(sim)).start())

        async def bystander() -> str:
            async with connect(f"{server.url}/ws/chat") as ws:
                await ws.send(json.dumps({"type": "run", "id": "b", "prompt": "steady sim:rate=100 sim:tokens=300"}))
                text = []
                while True:
                    event = json.loads(await ws.recv())
                    if event["type"] == "token":
                        text.append(event["content"])
                    if event["type"] in ("done", "error", "cancelled"):
                        assert event["type"] == "done"
                        return "".join(text)

        watcher = runner.get_loop().create_task(bystander())
        seen: list[str] = []

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(ROUTES + ["/ws/a/b", "/%00", "/ws/chat?token=x&token=y"]), tokens,
               st.lists(frames, max_size=6))
        def throw(route: str, token: str | None, payloads: list[Any]) -> None:
            seen.extend(runner.run(attack(server, route, token, payloads)))

        throw()
        bystander_text = runner.run(asyncio.wait_for(watcher, 60))

        async def health() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{server.port}/healthz") as response:
                    return dict(await response.json())

        assert runner.run(health())["status"] == "ok"
        runner.run(server.stop(drain=0))
        runner.run(sim.stop())
    assert len(bystander_text.split()) == 300
    assert not any("Traceback" in message or 'File "' in message for message in seen)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
