"""Each client moves by itself when its node goes: a rolling restart (SIGTERM, close 1012) or an abrupt drop.

Two wsagent nodes on one Redis behind a tiny TCP forwarder that stands in for a load balancer: the clients
know one address, and each new connection goes to the first node that takes it. The node a client is on
gets SIGTERM mid-answer (it stops listening, closes its clients with 1012 and keeps producing their runs),
or the client's connection is cut with no close frame while the forwarder now prefers the other node.
The terminal client, the browser page and the AI SDK example each must reconnect, resume on the other
node, and show the whole answer once: nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wsagent.upstream.simulator import SimulatorServer

from .browser import Browser
from .helpers import AI_SDK_HELPERS, PAGE_HELPERS, ROOT, Cluster, Node, expected_text, type_and_send
from .processes import free_port

#: A rolling restart's settings: no resume grace (the handover keeps the runs), a drain longer than an answer.
RESTART = {"resume_grace": None, "drain_timeout": 30}
#: For an abrupt drop the run waits for its client for the resume grace (10 s on the cluster's nodes).
DROP: dict[str, Any] = {}


class Forwarder:
    """A TCP port that passes each connection to the first of ``targets`` that accepts it, as a load
    balancer does with a node that stopped listening. ``drop()`` cuts every connection (no close frame)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.targets: list[int] = []
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> Forwarder:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        return self

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in list(self.targets):
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            break
        else:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self.links.append(link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            if link in self.links:
                self.links.remove(link)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.transport.abort()

    def drop(self) -> None:
        for down, up in self.links:
            down.transport.abort()
            up.transport.abort()

    async def close(self) -> None:
        self.drop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    started = await Forwarder().start()
    try:
        yield started
    finally:
        await started.close()


async def behind(forwarder: Forwarder, cluster: Cluster, **options: Any) -> tuple[Node, Node]:
    """Nodes a and b, a first: the forwarder sends every new connection to a while it listens."""
    a, b = await cluster.start("a", "b", **options)
    forwarder.targets = [a.port, b.port]
    return a, b


async def move(how: str, forwarder: Forwarder, a: Node, b: Node) -> None:
    """Take the client off node a: SIGTERM a (it hands its clients over with 1012), or cut the connection."""
    if how == "sigterm":
        a.process.send_signal(signal.SIGTERM)
    else:
        forwarder.targets = [b.port, a.port]
        forwarder.drop()


def cli(forwarder: Forwarder, *args: str) -> list[str]:
    return [sys.executable, "-m", "wsagent.client", "--url", f"ws://127.0.0.1:{forwarder.port}/ws/chat", *args]


async def run_cli(command: list[str], limit: float = 60) -> tuple[int | None, str, str]:
    process = await asyncio.create_subprocess_exec(*command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(process.communicate(), limit)
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("how", ["sigterm", "drop"])
async def test_terminal_client_moves_to_another_node(cluster: Cluster, forwarder: Forwarder,
                                                     sim: SimulatorServer, how: str) -> None:
    """The text the client prints (its stdout: the answer, thoughts marked) is what it prints when nothing
    moves; --json shows every event once, seq contiguous across the move; exit 0; node a exits 0."""
    a, b = await behind(forwarder, cluster, **(RESTART if how == "sigterm" else DROP))
    prompt = "move me sim:rate=50 sim:tokens=150"
    code, calm, _ = await run_cli([sys.executable, "-m", "wsagent.client", "--url", f"{b.url}/ws/chat", prompt])
    assert code == 0 and await expected_text(sim, prompt) in calm

    for mode in ("text", "json"):
        process = await asyncio.create_subprocess_exec(
            *cli(forwarder, *(["--json"] if mode == "json" else []), prompt), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        assert process.stdout is not None
        shown = b""
        while len(shown) < 400:  # well into the answer
            chunk = await asyncio.wait_for(process.stdout.read(100), 20)
            assert chunk, "the client ended early"
            shown += chunk
        await move(how, forwarder, a, b)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        shown += out
        assert process.returncode == 0, err.decode()
        assert "reconnecting in" in err.decode()  # it did move: said on stderr, never in the answer
        if mode == "text":
            assert shown.decode() == calm
        else:
            events = [json.loads(line) for line in shown.decode().splitlines()]
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert "".join(e["content"] for e in events if e["type"] == "token") == await expected_text(sim, prompt)
            assert events[-1]["type"] == "done"
        if how == "sigterm":
            assert await asyncio.wait_for(a.process.wait(), 40) == 0  # once the run it kept has ended
            a = await cluster.node("a", **RESTART)
            forwarder.targets = [a.port, b.port]
        else:
            forwarder.targets = [a.port, b.port]


@pytest.mark.parametrize("how", ["sigterm", "drop"])
async def test_page_moves_to_another_node(cluster: Cluster, forwarder: Forwarder, sim: SimulatorServer,
                                          browser: Browser, how: str) -> None:
    """The page (served through the forwarder, as behind a load balancer) has two runs streaming when its
    node goes: it reconnects and resumes each from its last seq; both answers whole, once."""
    site = f"http://127.0.0.1:{forwarder.port}"
    a, b = await behind(forwarder, cluster, allowed_origins=site, **(RESTART if how == "sigterm" else DROP))
    await browser.goto(f"{site}/")
    await browser.evaluate(PAGE_HELPERS)
    await browser.evaluate("t.connected()")
    prompts = [f"move the page {n} sim:rate=50 sim:tokens=150" for n in range(2)]
    runs = [await browser.evaluate(f"t.send({json.dumps(prompt)})") for prompt in prompts]
    await browser.evaluate(f"t.until(() => {json.dumps(runs)}.every(run => "
                           "t.turn(run).querySelector('.answer').textContent.length > 40))")
    await browser.evaluate("""(() => {
        const status = document.getElementById('status');
        window.states = [];
        new MutationObserver(() => states.push(status.dataset.state)).observe(status, { attributes: true });
    })()""")
    await move(how, forwarder, a, b)
    for run, prompt in zip(runs, prompts, strict=True):
        result = await browser.evaluate(f"""(async () => {{
            const outcome = await t.finished('{run}');
            return {{ outcome, text: t.turn('{run}').querySelector('.answer').textContent }};
        }})()""")
        assert result == {"outcome": "done", "text": await expected_text(sim, prompt)}  # nothing lost or doubled
    assert "reconnecting" in await browser.evaluate("states")  # it did move
    assert await browser.evaluate("document.getElementById('status').dataset.state") == "open"
    if how == "sigterm":
        assert await asyncio.wait_for(a.process.wait(), 40) == 0


@pytest.mark.parametrize("how", ["sigterm", "drop"])
async def test_ai_sdk_example_moves_to_another_node(
        cluster: Cluster, forwarder: Forwarder, sim: SimulatorServer, browser: Browser,
        page_url: str, how: str) -> None:
    """The useChat example, its WebSocketChatTransport pointed at the forwarder: when its node goes mid-answer
    the transport fails the response ("network connection closed"), and the example resumes the chat by id
    on the node the forwarder reaches; the answer replays from its start in place: whole, once."""
    a, b = await behind(forwarder, cluster, allowed_origins=page_url, **(RESTART if how == "sigterm" else DROP))
    await browser.goto(f"{page_url}/index.html?ws=ws://127.0.0.1:{forwarder.port}/ws/ai-sdk")
    await browser.evaluate(AI_SDK_HELPERS)
    await browser.evaluate("t.until(() => t.status() === 'ready')")
    await type_and_send(browser, "move the chat sim:rate=50 sim:tokens=150")
    partial = await browser.evaluate("t.until(() => t.answer().length > 40 && t.answer())")
    await move(how, forwarder, a, b)
    answer = await browser.evaluate("""Promise.race([
        t.until(() => t.status() === 'ready' && t.answer().split(' ').length >= 150 && t.answer()),
        new Promise(r => setTimeout(() => r(`not resumed: ${document.getElementById('status').textContent}`),
                                    30000)),
    ])""")
    assert not answer.startswith("not resumed"), answer
    assert len(answer.split()) == 150 and answer.startswith(partial)  # all the words, in order, none twice
    assert await browser.evaluate("t.answers().length") == 1  # resumed in place, not as a second answer
    assert sim.simulator.stats.streams == 1  # the model was asked once: the answer came from the cluster
    if how == "sigterm":
        assert await asyncio.wait_for(a.process.wait(), 40) == 0
