"""Every run ends with exactly one terminal event, over interleavings of messages, sockets and settings.

Hypothesis draws a script: which socket sends what (run, an agent run, cancel,
resume, attach, approve, steer, AI SDK send and abort, text-mode prompts), which messages leave in one TCP
write (so the server handles them in one read), which sockets close cleanly or
vanish, and the server's settings (the defaults a user gets included). Checked
after every script:

* each request a socket made gets its answer: a stream that ends with exactly
  one terminal event, or a refusal;
* the server comes back to nothing in flight (no run, no per-connection,
  per-address or per-user count left) within a bound, and logged no error.
  A run that waits for a person's approval waits by design (for
  ``--approval-timeout``, 300 s by default): it must be the only kind left,
  and once its requests are denied it ends too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from wsagent.core.config import Settings
from wsagent.upstream.simulator import SimulatorServer, SimulatorSettings
from wsagent.wiring.server import WsAgentServer

from .helpers import TERMINAL, upstream_for

#: How long a step may take to be answered (a bound, never a pause).
LIMIT = 10.0
IDS = ["r1", "r2", "a:b", "\ud800"]  # a colon, and a lone surrogate (answered as U+FFFD)
PROMPTS = ["hi", "slow sim:rate=400 sim:tokens=40"]  # instant, or about 0.1 s


@dataclass(frozen=True)
class Step:
    socket: int
    action: str
    run_id: str = "r1"
    prompt: str = "hi"
    with_key: bool = False
    together: bool = False  # written in the same TCP write as the previous step's frames


steps = st.builds(
    Step,
    socket=st.integers(0, 2),
    action=st.sampled_from(["run", "agent", "agent", "cancel", "resume", "attach", "approve", "approve", "steer",
                            "send", "abort", "text", "close", "vanish"]),  # (twice: drawn twice as often)
    run_id=st.sampled_from(IDS),
    prompt=st.sampled_from(PROMPTS),
    with_key=st.booleans(),
    together=st.booleans(),
)
server_settings = st.fixed_dictionaries({
    "resume_grace": st.sampled_from([0.0, 0.3]),  # 0: the default
    "ai_sdk_grace": st.sampled_from([30.0, 0.0]),  # 30: the default
    "replay_bytes": st.sampled_from([262144, 200]),  # the default, and a log that forgets at once
    "compression": st.sampled_from(["deflate", "off"]),
    "approval_tools": st.sampled_from([(), ("calculator",)]),  # (): the default
    "approval_timeout": st.sampled_from([300.0, 0.3]),  # 300: the default
    "on_busy": st.sampled_from(["enqueue", "reject", "interrupt", "steer"]),  # enqueue: the default
})

ROUTE = {0: "/ws/chat", 1: "/ws/chat", 2: "/ws/ai-sdk"}  # two JSON sockets (one watches the other), useChat's


@dataclass
class Client:
    """One socket, what it asked for, and what it got."""

    ws: ClientConnection
    route: str
    changed: asyncio.Event  # set whenever a frame arrives on any socket
    asked: Counter[str] = field(default_factory=Counter)  # requests that must each get one final answer, by id
    cancels: Counter[str] = field(default_factory=Counter)  # a cancel, approve or steer: answered only if refused
    frames: list[dict[str, Any]] = field(default_factory=list)
    open: bool = True

    def finals(self, run_id: str) -> int:
        """Answers that end a request for ``run_id``: a terminal event of a stream, or a refusal."""
        return sum(1 for f in self.frames if f.get("id") == run_id and f["type"] in TERMINAL)

    def pending(self) -> list[str]:
        """Requests still without their final answer, but for runs waiting for a person's approval."""
        return [run_id for run_id, count in self.asked.items()
                if self.finals(run_id) < count and not self.waiting(run_id)]

    def waiting(self, run_id: str) -> bool:
        asked = {f["call_id"] for f in self.frames if f.get("id") == run_id and f["type"] == "approval_request"}
        answered = {f["call_id"] for f in self.frames if f.get("id") == run_id and f["type"] == "approval"}
        return bool(asked - answered)

    async def read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, str) and message[:1] == "{":
                    self.frames.append(json.loads(message))
                    self.changed.set()
        except ConnectionClosed:
            pass


def frames_of(step: Step, keys: dict[str, str], asked: dict[str, str]) -> list[str]:
    request: dict[str, Any]
    if step.action == "run":
        request = {"type": "run", "id": step.run_id, "prompt": step.prompt}
    elif step.action == "agent":  # a prompt for a tool: the calculator, which may need approval
        request = {"type": "run", "id": step.run_id, "prompt": f"What is (2 + 3) * 7? {step.prompt}",
                   "agent": "assistant"}
    elif step.action in ("cancel", "resume", "attach", "approve", "steer"):
        request = {"type": step.action, "id": step.run_id}
        if step.with_key and step.run_id in keys:
            request["key"] = keys[step.run_id]
        if step.action == "approve":
            request.update(call_id=asked.get(step.run_id, "call_none"), approved=step.with_key)
        elif step.action == "steer":
            request["content"] = step.prompt
    elif step.action == "send":
        request = {"type": "send", "requestId": step.run_id, "id": f"chat-{step.run_id}",
                   "trigger": "submit-message",
                   "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": step.prompt}]}]}
    elif step.action == "abort":
        request = {"type": "abort", "requestId": step.run_id}
    else:
        return [step.prompt]
    return [json.dumps(request)]


async def play(server: WsAgentServer, script: list[Step]) -> list[Client]:
    changed = asyncio.Event()
    clients = {n: Client(await connect(f"{server.url}{route}", open_timeout=5, close_timeout=1), route, changed)
               for n, route in ROUTE.items()}
    readers = [asyncio.get_running_loop().create_task(client.read()) for client in clients.values()]
    keys: dict[str, str] = {}  # the key of each run id, as its owner's start event gave it
    for step in script:
        client = clients[step.socket]
        if not client.open:
            continue
        if step.action in ("close", "vanish"):
            client.open = False
            if step.action == "vanish":
                client.ws.transport.abort()
            else:
                await client.ws.close()
            continue
        if (client.route == "/ws/ai-sdk") != (step.action in ("send", "abort")):
            continue  # each route gets its own protocol's messages
        run_id = step.run_id.replace("\ud800", "\ufffd")
        if step.action in ("cancel", "approve", "steer"):
            client.cancels[run_id] += 1
        elif step.action in ("run", "agent", "resume", "attach"):
            client.asked[run_id] += 1
        asked = {f["id"]: f["call_id"] for f in client.frames if f["type"] == "approval_request"}
        for frame in frames_of(step, keys, asked):
            client.ws.protocol.send_text(frame.encode())
        if not step.together:
            client.ws.send_data()
            await asyncio.sleep(0)  # a yield, not a wait: the server and the readers may run between writes
        keys.update((f["id"], f["key"]) for c in clients.values() for f in c.frames if f["type"] == "start")
    for client in clients.values():
        if client.open:
            client.ws.send_data()
    async with asyncio.timeout(LIMIT):  # every request of an open JSON socket gets its final answer
        while any(c.open and c.route == "/ws/chat" and c.pending() for c in clients.values()):
            changed.clear()
            await changed.wait()
    for client in clients.values():
        await client.ws.close()
    await asyncio.gather(*readers)
    return list(clients.values())


async def drained(server: WsAgentServer) -> None:
    """Nothing left in flight: no run, and no per-connection or per-address count. A run still waiting for a
    person (nobody answered; its socket may be gone) is the only one left; denied, it ends."""
    app = server.app
    async with asyncio.timeout(LIMIT):
        while not app.idle.is_set():
            for run in app.broker.active_runs():
                while run.waiting_for:
                    run.answer(run.waiting_for[0], False, "the script ended")
            with contextlib.suppress(TimeoutError):  # (a run may reach its approval request meanwhile)
                await asyncio.wait_for(app.idle.wait(), 0.05)
    assert app.inflight == 0 and app.broker.active_runs() == []
    assert not app._conn_runs and not app._ip_runs


@pytest.mark.timeout(300)
def test_every_interleaving_ends_every_run_once(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="wsagent")
    with asyncio.Runner() as runner:
        sim = runner.run(SimulatorServer(SimulatorSettings(rate=0, tokens=24, switches=True)).start())

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(server_settings, st.lists(steps, min_size=1, max_size=14))
        def script(options: dict[str, Any], plan: list[Step]) -> None:
            async def one() -> None:
                server = await WsAgentServer(Settings(host="127.0.0.1", port=0, **options), upstream_for(sim)).start()
                try:
                    clients = await play(server, plan)
                    for client in clients:
                        if client.route != "/ws/chat":
                            continue
                        for run_id, count in client.asked.items():
                            finals = client.finals(run_id)
                            if client.open and not client.waiting(run_id):  # to the end: one final answer
                                # per request (a cancel's, approve's or steer's only if refused)
                                assert count <= finals <= count + client.cancels[run_id], (run_id, client.frames)
                    await drained(server)
                finally:
                    await server.stop(drain=0)

            runner.run(one())

        script()
        runner.run(sim.stop())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
