"""What more than one test module uses: plain functions, classes and constants (fixtures are in conftest.py).

Test modules import these from here, never from one another (tests/test_layers.py checks that)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from wsagent.core.chunks import TextDelta
from wsagent.engine.broker import LocalBroker
from wsagent.engine.cluster.wire import Wire
from wsagent.engine.run import Run, Subscription
from wsagent.upstream.model import UpstreamClient, UpstreamConfig
from wsagent.upstream.simulator import SimulatorServer, SimulatorSettings
from wsagent.wiring.server import WsAgentServer

from .browser import UNTIL, Browser
from .processes import Notifications, free_port, started

#: The repository's root.
ROOT = Path(__file__).parent.parent
TERMINAL = {"done", "error", "cancelled"}


# The simulator, a server, clients.

@contextlib.asynccontextmanager
async def simulator() -> AsyncIterator[SimulatorServer]:
    """The simulated model on a loopback port: unthrottled, 24 tokens, fault switches on."""
    server = await SimulatorServer(SimulatorSettings(rate=0, tokens=24, switches=True)).start()
    try:
        yield server
    finally:
        await server.stop()


def upstream_for(sim: SimulatorServer, **overrides: Any) -> UpstreamClient:
    config: dict[str, Any] = {"base_url": sim.base_url, "backoff_base": 0.01, "first_byte_timeout": 10,
                              "read_timeout": 10}
    config.update(overrides)
    return UpstreamClient(UpstreamConfig(**config))


ServerFactory = Callable[..., Awaitable[WsAgentServer]]


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


def run_request(run_id: str, prompt: str, **fields: Any) -> str:
    """The ``run`` frame a client sends to start ``run_id``."""
    return json.dumps({"type": "run", "id": run_id, "prompt": prompt, **fields})


def content(events: list[dict[str, Any]], kind: str = "token") -> str:
    return "".join(e["content"] for e in events if e["type"] == kind)


def check_sequence(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert sum(e["type"] in ("done", "error", "cancelled") for e in events) == 1
    assert events[-1]["type"] in ("done", "error", "cancelled")


async def expected_text(sim: SimulatorServer, prompt: str) -> str:
    """The simulator's deterministic answer to ``prompt``."""
    client = upstream_for(sim)
    parts = [e.text async for e in client.stream([{"role": "user", "content": prompt}])
             if isinstance(e, TextDelta) and e.kind == "content"]
    await client.close()
    return "".join(parts)


def local_broker(server: WsAgentServer) -> LocalBroker:
    """The broker of a server that is alone (not in cluster mode), with what only it has: its runs to iterate."""
    broker = server.broker
    assert isinstance(broker, LocalBroker)
    return broker


def find_run(server: WsAgentServer, run_id: str) -> Run | None:
    """The newest run with ``run_id``, whoever started it (tests look runs up from outside any scope)."""
    return next((run for run in reversed(list(local_broker(server))) if run.id == run_id), None)


class Sink:
    """A watcher that writes into a list: what a socket would receive, and when it would take it."""

    def __init__(self, eager: bool = True) -> None:
        self.subs: list[Subscription] = []
        self.frames: list[str] = []
        self.eager = eager

    def watch(self, sub: Subscription) -> None:
        self.subs.append(sub)
        self.wake()

    def unwatch(self, sub: Subscription) -> None:
        if sub in self.subs:
            self.subs.remove(sub)

    def wake(self) -> None:
        if self.eager:
            self.drain()

    def drain(self) -> None:
        for sub in list(self.subs):
            self.frames.extend(sub.take())
            sub.sent()
            if sub.ended:
                self.unwatch(sub)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(frame) for frame in self.frames]


# Authentication (the tutorial's tokens).

SECRET = "correct-horse-battery-staple-0123456789"


def token(claims: dict[str, Any] | None = None, key: Any = SECRET, algorithm: str = "HS256",
          ttl: float = 3600, **headers: Any) -> str:
    """Made the way the tutorial makes them: PyJWT, HS256, a user_id claim."""
    payload: dict[str, Any] = {"user_id": "alice", "exp": math.ceil(time.time() + ttl)}  # (int() cut a 1 s
    # token's life to as little as a millisecond: a flaky "Invalid token" at the handshake)
    payload.update(claims or {})
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers or None)


# The AI SDK's own transport, in Node.

DRIVER = Path(__file__).parent / "ai_sdk" / "drive.mjs"


async def drive_at(url: str, *steps: dict[str, Any], **transport: Any) -> list[dict[str, Any]]:
    """Run the steps in Node with the AI SDK's transport against the ``/ws/ai-sdk`` route at ``url``; what each
    step saw."""
    if not (ROOT / "node_modules" / "ai").is_dir():
        pytest.fail("the AI SDK is not installed: run `npm ci` in the repository (README's test command does)")
    plan = {"url": url, "transport": transport, "steps": list(steps)}
    process = await asyncio.create_subprocess_exec(
        "node", str(DRIVER), json.dumps(plan), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    assert isinstance(result, list)
    return result


# Pages in headless Chromium.

#: Helpers installed in the page at GET /: send like a person would (type, press Send), then wait on the DOM.
PAGE_HELPERS = """
window.t = {
  send(prompt) {
    document.getElementById('prompt').value = prompt;
    document.getElementById('send').click();
    return document.querySelector('#log .turn:last-child').dataset.run;
  },
  turn(run) { return document.querySelector(`.turn[data-run="${run}"]`); },
  watch(run) {
    const answer = this.turn(run).querySelector('.answer');
    const seen = { changes: 0 };
    new MutationObserver(() => { seen.changes += 1; })
      .observe(answer, { childList: true, characterData: true, subtree: true });
    return seen;
  },
""" + UNTIL + """  finished(run) { return this.until(() => this.turn(run).dataset.outcome); },
  connected() { return this.until(() => document.getElementById('status').dataset.state === 'open'); },
};
"""

#: The AI SDK example app (examples/ai-sdk-chat/).
AI_SDK_EXAMPLE = ROOT / "examples" / "ai-sdk-chat"

#: Helpers installed in the AI SDK example's page.
AI_SDK_HELPERS = """
window.t = {
""" + UNTIL + """  status() { return document.getElementById('status')?.dataset.status; },
  answers() { return [...document.querySelectorAll('#messages li.assistant')]; },
  answer() {
    const last = this.answers().at(-1);
    return last ? [...last.querySelectorAll('.text')].map(p => p.textContent).join('') : '';
  },
  tools() { return [...document.querySelectorAll('#messages li.assistant .tool')]; },
  button(name) { return document.querySelector(`#messages .tool.approval button.${name}`); },
};
"""


async def type_and_send(browser: Browser, text: str) -> None:
    """As a person would: focus the field, type, press Send."""
    await browser.evaluate("document.getElementById('prompt').focus()")
    await browser.call("Input.insertText", {"text": text})
    await browser.evaluate("t.until(() => document.getElementById('prompt').value.length > 0)")
    await browser.evaluate("document.getElementById('send').click()")


# Cluster mode: a real redis-server, wsagent nodes as separate processes.

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CLUSTER_SECRET = "cluster-test-secret-of-32-bytes!"
#: How long a test waits for what must happen well within it (a bound, never a pause).
LIMIT = 15.0


@contextlib.asynccontextmanager
async def redis_server(port: int = 0, *options: str) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """A ``redis-server`` of our own on a loopback port, with nothing saved to disk."""
    port = port or free_port()
    async with started([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        *options], b"Ready to accept connections", limit=20) as process:
        yield port, process


class Node:
    def __init__(self, name: str, port: int, process: asyncio.subprocess.Process,
                 notes: Notifications | None = None) -> None:
        self.name = name
        self.port = port
        self.process = process
        self.notes = notes  # what it tells systemd (its status says whether Redis is up)
        self.url = f"ws://127.0.0.1:{port}"

    def connect(self, path: str = "/ws/chat", user: str | None = None, **kwargs: Any) -> Any:
        if user is not None:
            path += f"?token={cluster_token(user)}"
        return connect(self.url + path, open_timeout=5, close_timeout=2, **kwargs)

    async def http(self, path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body


class Cluster:
    """Nodes joined through one Redis, streaming from one simulator."""

    def __init__(self, stack: contextlib.AsyncExitStack, sim: SimulatorServer, redis_port: int,
                 redis: asyncio.subprocess.Process) -> None:
        self.stack = stack
        self.sim = sim
        self.redis_port = redis_port
        self.redis = redis
        self.nodes: dict[str, Node] = {}

    async def start(self, *names: str, **options: Any) -> list[Node]:
        return list(await asyncio.gather(*(self.node(name, **options) for name in names)))

    async def node(self, name: str, **options: Any) -> Node:
        """Node ``name`` (options as settings; one that is None is left to its default, as
        ``resume_grace=None``: every other test's nodes have a grace)."""
        settings = {"resume_grace": 10, "jwt_secret": CLUSTER_SECRET, "log_level": "INFO",
                    "redis_url": f"redis://127.0.0.1:{self.redis_port}/0", **options}
        for attempt in range(3):  # a free port can be taken by another process before the node binds it
            port = free_port()
            command = [sys.executable, "-m", "wsagent.serve", "--port", str(port), "--node-id", name,
                       "--upstream-url", self.sim.base_url,
                       "--event-loop", "asyncio" if name == "b" else "auto"]  # b on asyncio's loop, the others uvloop
            for key, value in settings.items():
                if value is not None:
                    command += [f"--{key.replace('_', '-')}", str(value)]
            notes = Notifications()
            self.stack.callback(notes.close)
            try:
                process = await self.stack.enter_async_context(
                    started(command, b"wsagent listening on", env={"NOTIFY_SOCKET": notes.path}, limit=30))
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                continue
            break
        node = self.nodes[name] = Node(name, port, process, notes)
        return node


def cluster_token(user: str) -> str:
    """A token the cluster's nodes accept, for ``user``."""
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, CLUSTER_SECRET, algorithm="HS256")


# Clusters side by side: a test whose scenarios each wait out NODE_TTL waits once, for all of them.

#: How long a cluster's first nodes wait for the others' to be up (a node that does not start within 30 s fails).
UP_LIMIT = 100.0


class Rendezvous:
    """Where scenarios run side by side wait for each other: each arrives once (or ends), and all go on together."""

    def __init__(self, parties: int) -> None:
        self.left = parties
        self.everyone = asyncio.Event()

    def arrive(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.everyone.set()


class SideBySide(Cluster):
    """A cluster run beside others: its first nodes start with theirs, and the test goes on once all are up (the
    nodes' start-up, the machine's busiest moment, never overlaps another cluster's runs, kills and pauses)."""

    def __init__(self, stack: contextlib.AsyncExitStack, sim: SimulatorServer, redis_port: int,
                 redis: asyncio.subprocess.Process, up: Rendezvous) -> None:
        super().__init__(stack, sim, redis_port, redis)
        self.up = up
        self.arrived = False

    async def start(self, *names: str, **options: Any) -> list[Node]:
        nodes = await super().start(*names, **options)
        if not self.arrived:
            self.arrive()
            async with asyncio.timeout(UP_LIMIT):  # (each of the others arrives, or ends: see side_by_side)
                await self.up.everyone.wait()
        return nodes

    def arrive(self) -> None:
        if not self.arrived:
            self.arrived = True
            self.up.arrive()


@contextlib.asynccontextmanager
async def own_cluster(up: Rendezvous | None = None) -> AsyncIterator[Cluster]:
    """A cluster with a simulator (``cluster.sim``, as the ``sim`` fixture's) and a ``redis-server`` of its own:
    nothing in it is shared with another, so that several can run side by side (:func:`side_by_side`, which
    gives ``up``)."""
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(simulator())
        for attempt in range(3):  # a free port can be taken by another process (a node, a client) before Redis binds it
            try:
                port, process = await stack.enter_async_context(redis_server())
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                continue
            break
        yield Cluster(stack, sim, port, process) if up is None else SideBySide(stack, sim, port, process, up)


Scenario = Callable[[Cluster], Awaitable[None]]


async def side_by_side(scenarios: dict[str, Scenario]) -> None:
    """Run each scenario in a cluster of its own (:func:`own_cluster`), all at once: the nodes each starts first
    start together, and no scenario goes on before all of them are up. Each runs to its end whatever the others do;
    those that failed are raised (together, when more than one did), each with a note naming it."""
    up = Rendezvous(len(scenarios))

    async def one(scenario: Scenario) -> None:
        made = False
        try:
            async with own_cluster(up) as cluster:
                made = True
                try:
                    await scenario(cluster)
                finally:
                    assert isinstance(cluster, SideBySide)
                    cluster.arrive()  # (one that ended before its nodes were up holds nobody back)
        finally:
            if not made:  # (nor one whose Redis or simulator did not start)
                up.arrive()

    results = await asyncio.gather(*map(one, scenarios.values()), return_exceptions=True)
    failed: list[BaseException] = []
    for name, result in zip(scenarios, results, strict=True):
        if isinstance(result, BaseException):
            result.add_note(f"(in scenario {name}, one of {len(scenarios)} run side by side)")
            failed.append(result)
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise BaseExceptionGroup(f"{len(failed)} of {len(scenarios)} scenarios failed", failed)


async def frames_until(ws: ClientConnection, stop: Callable[[dict[str, Any]], object], limit: float = LIMIT,
                       ) -> list[str]:
    """Frames (as sent) until one satisfies ``stop`` (that one included)."""
    got: list[str] = []
    async with asyncio.timeout(limit):
        while True:
            frame = await ws.recv()
            assert isinstance(frame, str)
            got.append(frame)
            if stop(json.loads(frame)):
                return got


def terminal(event: dict[str, Any]) -> bool:
    return event["type"] in TERMINAL


def seq(frame: str) -> int:
    return int(json.loads(frame)["seq"])


async def start_run(ws: ClientConnection, run_id: str, prompt: str, **fields: Any) -> str:
    """Start a run; its key."""
    await ws.send(run_request(run_id, prompt, **fields))
    first = json.loads(await ws.recv())
    assert first["type"] == "start", first
    return str(first["key"])


async def redis_went(node: Node, *states: str) -> dict[str, Any]:
    """Wait until ``node`` has told systemd its link to Redis went through ``states`` (``down``, ``up``), in
    order; then its ``/healthz``."""
    assert node.notes is not None
    for state in states:
        await node.notes.expect(f"STATUS=cluster node {node.name}: Redis {state}")
    _, body = await node.http("/healthz")
    return dict(json.loads(body))


async def stream_entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """The entries of the Redis stream ``key`` (read by a client that decodes responses): (id, fields)."""
    entries = await redis.xrange(key)
    assert entries is not None
    decoded: list[tuple[str, dict[str, str]]] = []
    for entry_id, fields in entries:
        assert isinstance(entry_id, str) and fields is not None
        strings: dict[str, str] = {}
        for name, value in fields.items():
            assert isinstance(name, str) and isinstance(value, str)
            strings[name] = value
        decoded.append((entry_id, strings))
    return decoded


# Redis, as a test reads it.

async def redis_fields(port: int, *command: str) -> str:
    process = await asyncio.create_subprocess_exec("redis-cli", "-p", str(port), *command,
                                                   stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    return out.decode()


@contextlib.asynccontextmanager
async def key_events(port: int, key: str, kinds: str = "g") -> AsyncIterator[asyncio.Queue[str]]:
    """What happens to ``key`` in Redis (``del``, ``expire``...; with ``kinds`` "gh", ``hset`` too), as it
    happens: its keyspace events."""
    url = f"redis://127.0.0.1:{port}/0"
    control = await Wire.open(url)
    await control.send([("CONFIG", "SET", "notify-keyspace-events", "K" + kinds)])
    control.close()
    events: asyncio.Queue[str] = asyncio.Queue()
    subscribed = asyncio.get_running_loop().create_future()

    def push(reply: Any) -> None:
        if reply[0] == "subscribe" and not subscribed.done():
            subscribed.set_result(None)
        elif reply[0] == "message":
            events.put_nowait(reply[2])

    watcher = await Wire.open(url, push)
    watcher.push(("SUBSCRIBE", f"__keyspace@0__:{key}"))
    try:
        await asyncio.wait_for(subscribed, LIMIT)
        yield events
    finally:
        watcher.close()
