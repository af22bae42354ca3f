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

from wsagent.core.config import Settings
from wsagent.upstream.simulator import SimulatorServer, SimulatorSettings
from wsagent.wiring.server import WsAgentServer

from .helpers import upstream_for

SECRET = "fuzz-secret-that-is-long-enough-for-hs256"
ROUTES = ["/ws", "/ws/agent", "/ws/agent-thoughts", "/ws/robust", "/ws/chat", "/ws/secure", "/ws/ai-sdk", "/ws/someone"]

#: Strings as an attacker writes them: any code point, lone surrogates included (json.dumps escapes them as
#: ``\ud800``), and names with colons (Redis keys and scopes are built from them).
texts = (st.text(st.characters(exclude_categories=()), max_size=30)
         | st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\ude00b", "alice:r1", "user:acme:x", ":", "ai-sdk:c"]))
ids = texts | st.integers() | st.none() | st.lists(st.integers(), max_size=2) | st.booleans()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)
protocol_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["run", "cancel", "resume", "attach", "ping", "auth", "broadcast", "send", "x"])},
    optional={"id": ids, "key": ids, "prompt": json_values, "messages": json_values,
              "params": json_values, "after": json_values, "token": json_values, "agent": json_values,
              "workflow": json_values, "model": json_values, "content": json_values, "to": ids},
).map(json.dumps)
ui_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2)
ai_sdk_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["send", "resume", "abort", "x"]), "requestId": ids},
    optional={"id": ids, "trigger": st.sampled_from(["submit-message", "regenerate-message", "x"]),
              "messages": st.lists(st.fixed_dictionaries({"id": ids, "role": st.sampled_from(["user", "x"]),
                                                          "parts": ui_parts}), max_size=2) | json_values,
              "body": json_values},
).map(json.dumps)
#: Well-formed requests whose names are hostile, so the fuzz reaches past validation often.
hostile_names = st.sampled_from(["\ud800", "\udfff", "a\ud83d", "alice:r1", ":", "r1", "ai-sdk:c"])
hostile = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["run", "cancel", "resume", "attach"]), "id": hostile_names,
                           "prompt": st.sampled_from(["hi", "x\udc00y"])}, optional={"key": hostile_names}),
    st.fixed_dictionaries({"type": st.sampled_from(["send", "resume", "abort"]), "requestId": hostile_names,
                           "id": hostile_names, "trigger": st.just("submit-message"),
                           "messages": st.just([{"id": "m", "role": "user",
                                                 "parts": [{"type": "text", "text": "hi"}]}])}),
    st.fixed_dictionaries({"type": st.sampled_from(["broadcast", "send"]), "content": hostile_names,
                           "to": hostile_names}),
).map(json.dumps)
frames = st.one_of(
    hostile,
    hostile,
    st.binary(max_size=200),
    st.text(max_size=200),
    json_values.map(json.dumps),
    protocol_like,
    ai_sdk_like,
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 5000).map(lambda depth: '{"type": "run", "id": "d", "messages": ' + "[" * depth + "]" * depth + "}"),
    st.just(b"\xff\xfe invalid utf-8"),  # sent as a text frame below
)
tokens = st.one_of(st.none(), st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", max_size=60),
                   st.just(jwt.encode({"user_id": "fuzz", "exp": int(time.time()) + 3600}, SECRET, "HS256")))


async def attack(server: WsAgentServer, route: str, token: str | None, payloads: list[Any],
                 together: bool) -> list[str]:
    """Connect, throw the payloads (``together``: in one TCP write, so the server reads them at once),
    read whatever comes back for a moment."""
    url = f"{server.url}{route}" + (f"?token={token}" if token else "")
    received: list[str] = []
    try:
        async with connect(url, open_timeout=5, close_timeout=1, max_size=None) as ws:
            for payload in payloads:
                if payload == b"\xff\xfe invalid utf-8" or together and isinstance(payload, str):
                    ws.protocol.send_text(payload if isinstance(payload, bytes) else payload.encode())
                    if not together:
                        ws.send_data()
                else:
                    await ws.send(payload)
            ws.send_data()
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
               st.lists(frames, max_size=6), st.booleans())
        def throw(route: str, token: str | None, payloads: list[Any], together: bool) -> None:
            seen.extend(runner.run(attack(server, route, token, payloads, together)))

        throw()
        bystander_text = runner.run(asyncio.wait_for(watcher, 60))

        async def health() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{server.port}/healthz") as response:
                    return dict(await response.json())

        runner.run(asyncio.wait_for(server.app.idle.wait(), 30))  # every run the attack started has ended
        health_after = runner.run(health())
        assert (health_after["status"], health_after["runs_active"]) == ("ok", 0)
        runner.run(server.stop(drain=0))
        runner.run(sim.stop())
    assert len(bystander_text.split()) == 300
    assert not any("Traceback" in message or 'File "' in message for message in seen)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
