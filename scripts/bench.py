"""wsagent against the relays people would write instead, side by side, on this machine.

    pip install -e ".[bench]" && npm ci --prefix scripts/node-peer
    python scripts/bench.py            # the full run (about 25 minutes on 2 cores)
    python scripts/bench.py --quick    # under two minutes, every peer, smaller loads
    python scripts/bench.py --starts   # only what a one-token run costs the server, start to end
    python scripts/bench.py --quick --only-takeover   # only the takeover rows (about a minute)

The simulated upstream (``python -m wsagent.simulator``), then one server at a time under load, each
streaming from that upstream over the tutorial's text protocol on ``/ws/chat``:

* **wsagent** (``python -m wsagent.serve``), also measured on ``/ws/ai-sdk`` (the AI SDK's transport);
* **the tutorial's FastAPI relay** (``scripts/bench_peer.py``: the openai SDK, ``await send_text`` per delta);
* **aiohttp** (``scripts/peer_aiohttp.py``): aiohttp's WebSocket server relaying its own client's stream,
  parsed line by line, no SDK;
* **Node.js** (``scripts/node-peer/relay.mjs``): the ``ws`` package relaying a ``fetch`` (undici) stream,
  an ``AbortController`` tied to the socket's close;
* **the floor** (``scripts/peer_floor.py``): each upstream read's bytes forwarded as one frame on
  ``websockets``, no parsing or encoding: the least a Python relay can do.

Every peer closes its upstream request when its client leaves, but the tutorial's. Then, with
``redis-server``, the cluster: two nodes against one, a rolling restart, and runs that outlive their node
(``--takeover background``: the producer SIGKILLed, how long its watchers wait, and what the node that
took over spends per token). Then wsagent with one worker and with ``--workers 2``, neither pinned, for
what a second core buys.

The servers under test run on core 0; the load (the simulated upstream and this client) runs on the
other cores, as it would on other machines in a deployment, so that it does not preempt the server it
measures (``--no-pin`` lets every process use every core). Only one server is under load at a time.

The upstream writes each token as the CLOCK_MONOTONIC time it wrote it (``sim:stamp=1``); the clock is
shared by every process on the machine, so a client computes the latency each relay adds for every
token, even when a relay merges several tokens into one frame. Clients offer permessage-deflate, as
browsers do. Every load loop is bounded in count and time.

The latency and throughput scenarios, whose figures move most from one minute to the next on a
shared machine, run in rounds that take every server in turn (three in the full run), and each of
their figures is the median of its rounds; the other scenarios run once per server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from wsagent.core.tuning import DEFAULT_GC_THRESHOLDS, tune_gc, tune_malloc

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    """How much of each scenario a run does: :data:`FULL` for the published table, :data:`QUICK` (``--quick``,
    under two minutes) to see every peer and every scenario still run, with figures too small to publish."""

    rounds: int  #: of the latency and throughput scenarios, every server in turn: each figure is their median
    tokens: int  #: per stream, 50 streams x 50 tok/s (the latency rows, here and in the cluster's)
    throughput_tokens: int  #: per client, at full speed
    cancels: int  #: clean closes, and as many abrupt ones
    miss_after: float  #: seconds after which a close the upstream never saw counts as missed
    slow_warmup: float  #: seconds of a first slow reader, whose first-use allocations are not growth
    slow_seconds: float  #: seconds of the measured slow reader
    idle_counts: tuple[int, ...]  #: idle connections held open, one measure each
    levels: tuple[int, ...]  #: streams at 20 tok/s, tried in turn while p99 stays under 50 ms
    level_seconds: float  #: how long each level streams
    cluster_cancels: int  #: cancels from the other node
    cluster_levels: tuple[int, ...]
    worker_levels: tuple[int, ...]
    restart_streams: int  #: streams at 20 tok/s while three nodes are restarted in turn
    takeover_kills: int  #: runs whose producer is SIGKILLed (``--takeover background``), ...
    takeover_per_kill: int  #: ... this many at each SIGKILL
    takeover_streams: int  #: runs at 20 tok/s whose producer's CPU per token is measured, then its taker's
    takeover_seconds: float  #: how long each of those CPU windows lasts


FULL = Plan(rounds=3, tokens=500, throughput_tokens=10000, cancels=50, miss_after=3.0, slow_warmup=3, slow_seconds=60,
            idle_counts=(1000, 10000, 50000), levels=(100, 250, 500, 750, 1000, 1250, 1500, 2000), level_seconds=6,
            cluster_cancels=100, cluster_levels=(250, 500, 750, 1000, 1250, 1500),
            worker_levels=(100, 250, 500, 750, 1000, 1500, 2000), restart_streams=150, takeover_kills=100,
            takeover_per_kill=5, takeover_streams=100, takeover_seconds=8)
QUICK = Plan(rounds=1, tokens=50, throughput_tokens=300, cancels=5, miss_after=1.0, slow_warmup=1, slow_seconds=2,
             idle_counts=(1000,), levels=(200,), level_seconds=2, cluster_cancels=5, cluster_levels=(100,),
             worker_levels=(200,), restart_streams=30, takeover_kills=10, takeover_per_kill=5, takeover_streams=40,
             takeover_seconds=3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (``--workers``' worker processes)."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in family(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def rss_bytes(pid: int) -> int:
    total = 0
    for member in family(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def median(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over ``rounds`` (the results of one scenario, run several times)."""
    return {key: statistics.median(figures[key] for figures in rounds) for key in rounds[0]}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Server:
    name: str
    process: asyncio.subprocess.Process
    port: int
    command: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat"

    @property
    def pid(self) -> int:
        return self.process.pid


def pin(servers: list[Server], load: list[int]) -> str:
    """Servers on core 0, the load processes (by pid; 0 is this one) on the others. Says what it did.

    With three busy processes on two cores the scheduler preempts whichever it likes: the
    server's tokens then wait for the load client's or the simulator's time slice, a delay the
    server did not add (back to back at 1,000 streams: p99 5-26 ms shared, 3-6 ms pinned).
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if len(cores) < 2:
        return "not pinned (one core)"
    for server in servers:
        os.sched_setaffinity(server.pid, cores[:1])
    for pid in load:
        os.sched_setaffinity(pid, cores[1:])
    return f"servers pinned to core {cores[0]}, load to {','.join(map(str, cores[1:]))}"


async def wait_port(port: int, process: asyncio.subprocess.Process | None = None, limit: float = 30) -> None:
    """Until ``port`` takes a connection (a bounded poll: a peer tells nothing when it listens); a
    ``process`` that exits meanwhile did not start, and waiting longer would not change that."""
    deadline = time.monotonic() + limit
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"exited with status {process.returncode} before it listened") from None
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


#: Every process :func:`start` started, so that whatever happens, :func:`stop_started` stops them all.
STARTED: list[asyncio.subprocess.Process] = []


async def stop_started() -> None:
    """Stop what :func:`start` started and is still running (a run that failed half-way left a dozen
    servers orphaned to init before)."""
    running = [p for p in STARTED if p.returncode is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    await reap(running, 10)
    STARTED.clear()


async def reap(processes: Sequence[asyncio.subprocess.Process], limit: float) -> None:
    """Wait up to ``limit`` seconds for each of ``processes`` (told to end) to exit; kill those that do not."""
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), limit)
        except TimeoutError:
            process.kill()
            await process.wait()


async def start(name: str, command: list[str], port: int, env: dict[str, str] | None = None) -> Server:
    if command[0] == "node" and not (ROOT / "scripts" / "node-peer" / "node_modules").is_dir():
        raise SystemExit("the Node.js peer needs its packages: run npm ci --prefix scripts/node-peer "
                         "(or leave it out with --servers wsagent,aiohttp,fastapi,floor)")
    process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env={**os.environ, **(env or {})},
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    STARTED.append(process)
    try:
        await wait_port(port, process)
    except (OSError, RuntimeError) as exc:
        raise SystemExit(f"{name} did not start ({' '.join(command)}): {exc}") from None
    return Server(name, process, port, command, env)


async def restart(server: Server) -> Server:
    """``server`` stopped, and started again as it was, on a new port."""
    server.process.terminate()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.process.wait(), 15)
    port = free_port()
    command = [str(port) if part == str(server.port) else part for part in server.command]
    return await start(server.name, command, port, server.env)


_STAMP = re.compile(r'"content":"(\d+\.\d+) "')


def stamps(frame: str) -> list[float]:
    out = []
    for word in frame.split():
        try:
            out.append(float(word))
        except ValueError:
            pass
    return out


@dataclass
class Stream:
    """One prompt's stream on one socket, with per-token latency from the upstream's stamps."""

    sent: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttft: float | None = None
    first_latency: float | None = None
    tokens: int = 0
    error: str | None = None
    sse: str | None = None  #: the floor's frames: the upstream's reads as they came, an event's end not yet seen

    def feed(self, frame: str, now: float) -> bool:
        """Account for one text frame received at ``now`` (text mode, the AI SDK's transport on
        ``/ws/ai-sdk``, or the floor's raw SSE); True once the answer is complete."""
        if self.sse is not None or frame.startswith("data: ") or frame.startswith(": "):
            # The floor forwards each upstream read as it came: an event may be split across frames.
            events, _, self.sse = ((self.sse or "") + frame).rpartition("\n\n")
            self._count([float(x) for x in _STAMP.findall(events)], now)
            return events.endswith("data: [DONE]")
        if frame.startswith("[ERROR]"):
            self.error = frame
            return True
        if frame.startswith('{"type":'):
            message = json.loads(frame)
            kind = message["type"]
            if kind in ("start", "usage"):  # the JSON protocol (the cluster rows resume runs there)
                return False
            if kind == "done":
                return True
            if kind == "token":
                self._count(stamps(message["content"]), now)
                return False
            if kind != "chunk":
                self.error = None if message["type"] == "end" else frame
                return True
            chunk = message["chunk"]
            frame = chunk["delta"] if chunk["type"] == "text-delta" else ""
        self._count(stamps(frame), now)
        return frame.endswith("[DONE]")

    def _count(self, found: list[float], now: float) -> None:
        if found:
            if self.ttft is None:
                self.ttft = now - self.sent
                self.first_latency = now - found[0]
            self.latencies.extend(now - s for s in found)
            self.tokens += len(found)


class LoadClient(asyncio.Protocol):
    """One WebSocket client for the load scenarios: the websockets library's sans-I/O
    protocol (with permessage-deflate offered, as browsers do), driven from
    ``data_received``.

    Frames are handled in the callback that reads them, timestamped there, with
    no task, queue or future per message: a thousand streams cost the measuring
    process little of the two cores it shares with the servers it measures, and
    the latency it records is the relay's, not its own scheduling.
    """

    def __init__(self, url: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url), extensions=enable_client_permessage_deflate(None),
                                       max_size=None)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.stream: Stream | None = None
        self.answered: asyncio.Future[Stream] | None = None
        self._fragments: list[bytes | bytearray | memoryview] = []

    @classmethod
    async def open(cls, url: str, limit: float = 60, source: str | None = None) -> LoadClient:
        """A connection to ``url``; from the loopback address ``source`` if given (each address has its own
        ephemeral ports, so that tens of thousands of connections do not run out of them)."""
        uri = parse_uri(url)
        local = (source, 0) if source else None
        async with asyncio.timeout(limit):
            _, client = await asyncio.get_running_loop().create_connection(lambda: cls(url), uri.host, uri.port,
                                                                           local_addr=local)
            await client.opened
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT or event.opcode is Opcode.CONT or event.opcode is Opcode.BINARY:
                    self._fragments.append(event.data)
                    if event.fin:
                        message = b"".join(self._fragments).decode()
                        self._fragments.clear()
                        self._message(message, now)
            elif not self.opened.done():
                if protocol.handshake_exc is None:
                    self.opened.set_result(None)
                else:
                    self.opened.set_exception(protocol.handshake_exc)
        self._flush()

    def _message(self, message: str, now: float) -> None:
        stream, answered = self.stream, self.answered
        if stream is not None and answered is not None and stream.feed(message, now) and not answered.done():
            answered.set_result(stream)

    def _flush(self) -> None:
        assert self.transport is not None
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()
        failure = ConnectionError(f"connection lost: {exc or 'closed by the server'}")
        for future in (self.opened, self.answered):
            if future is not None and not future.done():
                future.set_exception(failure)
        if not self.closed.done():
            self.closed.set_result(None)

    async def ask(self, prompt: str, limit: float, stagger: float = 0.0) -> Stream:
        """Send ``prompt`` after a random delay up to ``stagger`` seconds (so that many streams at one
        rate are not phase-locked, as real users are not) and collect its answer to ``[DONE]``."""
        if stagger:
            await asyncio.sleep(random.uniform(0, stagger))
        self.stream = Stream(sent=time.monotonic())
        self.answered = self.loop.create_future()
        self.protocol.send_text(prompt.encode())
        self._flush()
        async with asyncio.timeout(limit):
            return await self.answered

    async def close(self) -> None:
        if self.transport is None or self.closed.done():
            return
        try:
            self.protocol.send_close(1000)
            self._flush()
            async with asyncio.timeout(5):
                await self.closed
        except Exception:  # already closing, or the server did not answer: drop the connection
            self.transport.abort()


@contextlib.asynccontextmanager
async def sockets(url: str, count: int, source: str | None = None) -> AsyncIterator[list[LoadClient]]:
    gate = asyncio.Semaphore(200)

    async def one() -> LoadClient:
        async with gate:
            return await LoadClient.open(url, source=source)

    opened = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    good = [client for client in opened if isinstance(client, LoadClient)]
    try:
        if len(good) != count:
            errors = [repr(e) for e in opened if not isinstance(e, LoadClient)][:3]
            raise RuntimeError(f"opened {len(good)} of {count} connections: {errors}")
        yield good
    finally:
        for chunk in range(0, len(good), 500):
            await asyncio.gather(*(client.close() for client in good[chunk:chunk + 500]), return_exceptions=True)


# -- scenarios ---------------------------------------------------------------


def ai_sdk_send(prompt: str, n: int) -> str:
    """The frame the AI SDK's ``WebSocketChatTransport`` sends for a one-message chat."""
    return json.dumps({"type": "send", "requestId": f"r{n}", "id": f"bench-chat-{n:06d}", "trigger": "submit-message",
                       "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": prompt}]}],
                       "headers": {}, "body": {}})


async def latency(server: Server, clients: int, rate: float, tokens: int,
                  ramp: float | None = None, ai_sdk: bool = False) -> dict[str, float]:
    """``clients`` streams at ``rate`` tokens/s, started at random moments over ``ramp`` seconds
    (one token interval unless given); on ``/ws/ai-sdk`` with ``ai_sdk``."""
    prompt = f"latency sim:stamp=1 sim:rate={rate:g} sim:tokens={tokens} sim:reasoning=0"
    url = server.url.replace("/ws/chat", "/ws/ai-sdk") if ai_sdk else server.url
    async with sockets(url, clients) as conns:
        cpu0 = cpu_seconds(server.pid)
        results = await asyncio.gather(*(ws.ask(ai_sdk_send(f"{n} {prompt}", n) if ai_sdk else f"{n} {prompt}",
                                                120, ramp or 1 / rate) for n, ws in enumerate(conns)))
        cpu = cpu_seconds(server.pid) - cpu0
    lat = [x for r in results for x in r.latencies]
    first = [r.first_latency for r in results if r.first_latency is not None]
    expected = clients * tokens
    return {
        "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
        "ttft_added_p50_ms": pct(first, 0.5) * 1000, "ttft_added_p99_ms": pct(first, 0.99) * 1000,
        "tokens_lost": expected - sum(r.tokens for r in results),
        "cpu_us_per_token": cpu / max(1, sum(r.tokens for r in results)) * 1e6,
    }


async def throughput(server: Server, clients: int, tokens: int) -> dict[str, float]:
    prompt = f"throughput sim:stamp=1 sim:rate=0 sim:tokens={tokens} sim:reasoning=0"
    async with sockets(server.url, clients) as conns:
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        results = await asyncio.gather(*(ws.ask(f"{n} {prompt}", 600) for n, ws in enumerate(conns)))
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(server.pid) - cpu0
    delivered = sum(r.tokens for r in results)
    return {"tokens_per_s": delivered / elapsed, "cpu_s_per_100k": cpu / delivered * 100_000,
            "tokens_lost": clients * tokens - delivered}


async def starts(server: Server, clients: int, prompts: int) -> dict[str, float]:
    """What a run costs the server from start to end, apart from its tokens: ``clients`` sockets each
    ask ``prompts`` one-token prompts in turn (within wsagent's default message burst)."""
    prompt = "start sim:stamp=1 sim:rate=0 sim:tokens=1 sim:reasoning=0"

    async def one(n: int, ws: LoadClient) -> None:
        for i in range(prompts):
            await ws.ask(f"{n}-{i} {prompt}", 60)

    async with sockets(server.url, clients) as conns:
        cpu0 = cpu_seconds(server.pid)
        await asyncio.gather(*(one(n, ws) for n, ws in enumerate(conns)))
        cpu = cpu_seconds(server.pid) - cpu0
    return {"cpu_us_per_run": cpu / (clients * prompts) * 1e6}


async def tag_stats(http: aiohttp.ClientSession, port: int, tag: str) -> dict[str, float]:
    async with http.get(f"http://127.0.0.1:{port}/stats", params={"tag": tag}) as response:
        return dict(await response.json())


@dataclass
class Cancels:
    """How long each cancel took to close the upstream request, and how many never did."""

    delays: list[float] = field(default_factory=list)
    missed: int = 0

    def add(self, delay: float | None) -> None:
        if delay is None:
            self.missed += 1
        else:
            self.delays.append(delay)

    def summary(self) -> dict[str, float]:
        return {"p50_ms": pct(self.delays, 0.5) * 1000, "p99_ms": pct(self.delays, 0.99) * 1000,
                "missed": self.missed}


async def upstream_closed(http: aiohttp.ClientSession, sim_port: int, tag: str, since: float,
                          miss_after: float) -> float | None:
    """Seconds from ``since`` to the moment the upstream saw stream ``tag``'s connection close (by its own
    clock), or None if it had not after ``miss_after`` seconds."""
    while True:
        seen = (await tag_stats(http, sim_port, tag)).get("disconnected")
        if seen is not None:
            return float(seen) - since
        if time.monotonic() > since + miss_after:
            return None
        await asyncio.sleep(0.005)  # polling the upstream's record; its own timestamp is what counts


async def cancellation(server: Server, sim_port: int, runs: int, abrupt: bool, miss_after: float) -> dict[str, float]:
    """Close mid-stream; the upstream's own clock says when it saw its connection close."""
    cancels = Cancels()
    async with aiohttp.ClientSession() as http:
        for n in range(runs):
            tag = f"{server.name}-{'abrupt' if abrupt else 'clean'}-{n}-{time.monotonic_ns()}"
            ws = await connect(server.url, ping_interval=None)
            await ws.send(f"cancel me sim:rate=50 sim:tokens=400 sim:reasoning=0 sim:tag={tag}")
            for _ in range(3):
                await ws.recv()
            closed_at = time.monotonic()
            if abrupt:
                ws.transport.abort()
            else:
                await ws.close()
            cancels.add(await upstream_closed(http, sim_port, tag, closed_at, miss_after))
    return cancels.summary()


#: Idle connections one holder process opens (each is a file descriptor of its own, under its limit).
PER_HOLDER = 15_000


def fd_limit() -> int:
    """The most file descriptors a process may have here (its hard limit: servers are started with it)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


async def idle_memory(server: Server, count: int) -> dict[str, float]:
    """RSS per connection with ``count`` idle connections open, each offering permessage-deflate as browsers
    do. They are opened by holder processes (``--hold``), at most :data:`PER_HOLDER` each, each from a
    loopback address of its own (127.0.0.2, 127.0.0.3, ...): no process runs out of file descriptors or
    ephemeral ports. The server's family of processes is measured (Node's and Python's alike are one)."""
    if count + 200 > fd_limit():
        print(f"  idle {count}: skipped, a server process may hold {fd_limit():,} file descriptors here "
              f"(the hard RLIMIT_NOFILE; {count + 200:,} needed)", flush=True)
        return {"rss_kib_per_connection": math.nan}
    base = rss_bytes(server.pid)
    holders: list[asyncio.subprocess.Process] = []
    try:
        for n, start_at in enumerate(range(0, count, PER_HOLDER)):
            holder = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "scripts" / "bench.py"), "--hold", server.url,
                str(min(PER_HOLDER, count - start_at)), f"127.0.0.{n + 2}",
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
            holders.append(holder)
            assert holder.stdout is not None
            async with asyncio.timeout(120):
                line = await holder.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"a holder of idle connections failed: {line.decode(errors='replace')!r}")
        await asyncio.sleep(1.0)  # let allocations settle; a measurement pause, not a wait for an event
        grown = rss_bytes(server.pid)
    finally:
        for holder in holders:
            if holder.stdin is not None:
                holder.stdin.close()
        await reap(holders, 60)
    return {"rss_kib_per_connection": (grown - base) / count / 1024}


async def hold(url: str, count: int, source: str) -> None:
    """``--hold``: open ``count`` idle connections to ``url`` from ``source``, say ``ready``, keep them until
    standard input closes, then close them."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit(), fd_limit()))
    loop = asyncio.get_running_loop()
    async with sockets(url, count, source):
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)


async def slow_client(server: Server, sim_port: int, seconds: float, bytes_per_s: int) -> dict[str, float]:
    """One client reads at ``bytes_per_s`` while the upstream could write as fast as it likes."""
    tag = f"{server.name}-slow-{time.monotonic_ns()}"
    prompt = f"slow reader sim:rate=0 sim:tokens=200000 sim:pad=200 sim:reasoning=0 sim:tag={tag}"
    async with aiohttp.ClientSession() as http:
        base = peak = rss_bytes(server.pid)
        received = 0
        ws = await connect(server.url, max_size=None, max_queue=4, ping_interval=None)
        await ws.send(prompt)
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(seconds):
                while time.monotonic() < deadline:
                    frame = await ws.recv()
                    received += len(frame)  # the floor's frames are bytes, the others' text: the same here
                    peak = max(peak, rss_bytes(server.pid))
                    await asyncio.sleep(len(frame) / bytes_per_s)  # the slow reader's pace
        upstream_tokens = (await tag_stats(http, sim_port, tag)).get("tokens", 0)
        ws.transport.abort()
    return {"rss_growth_mib": (peak - base) / 2**20, "upstream_tokens": upstream_tokens,
            "received_mib": received / 2**20, "upstream_mib": upstream_tokens * 200 / 2**20}


async def scale(server: Server, levels: Sequence[int], seconds: float, limit_ms: float) -> dict[str, float]:
    """The most concurrent streams at 20 tokens/s whose added latency stays under ``limit_ms`` at p99.

    Streams start at random moments over one second, then all run together: this measures a
    server carrying N live streams, not N users pressing Enter in the same 50 ms (time to first
    token under a burst is the latency scenario's ``ttft`` row). Every token is counted, the
    first ones included.
    """
    best = 0
    rows: dict[str, float] = {}
    tokens = int(seconds * 20)
    for level in levels:
        try:
            result = await latency(server, level, 20, tokens, ramp=1.0)
        except (RuntimeError, OSError, TimeoutError, WebSocketException) as exc:
            print(f"    {server.name} at {level} streams: {exc!r}"[:200], flush=True)
            break
        rows[f"p99_ms_at_{level}"] = result["p99_ms"]
        rows[f"cpu_us_per_token_at_{level}"] = result["cpu_us_per_token"]
        print(f"    {server.name}: {level} streams, p99 {result['p99_ms']:.1f} ms", flush=True)
        if result["p99_ms"] >= limit_ms or result["tokens_lost"]:
            break
        best = level
    rows["max_streams"] = best
    return rows


# -- cluster mode ------------------------------------------------------------


@dataclass
class Pair:
    """Where runs start (``producer``) and where their clients read them (``reader``: another node of a
    cluster, or the same server), and the processes whose CPU the pair spends."""

    name: str
    producer: Server
    reader: Server
    pids: list[int]


async def handed_over(pair: Pair, n: int, prompt: str, reader: LoadClient, ramp: float) -> Stream:
    """Start run ``n`` on the producer, then read it on the reader (a ``resume`` from seq 1), while the
    socket that started it leaves: every token reaches its client through the reader."""
    await asyncio.sleep(random.uniform(0, ramp))
    async with connect(pair.producer.url, ping_interval=None, compression=None) as ws:
        await ws.send(json.dumps({"type": "run", "id": f"b{n}", "prompt": f"{n} {prompt}"}))
        key = json.loads(await ws.recv())["key"]
        answer = asyncio.ensure_future(reader.ask(json.dumps({"type": "resume", "id": f"b{n}", "key": key,
                                                              "after": 1}), 120))
        await asyncio.sleep(0)  # the resume is written before this socket's close
    return await answer


async def pair_latency(pair: Pair, clients: int, rate: float, tokens: int, ramp: float | None = None
                       ) -> dict[str, float]:
    prompt = f"cluster sim:stamp=1 sim:rate={rate:g} sim:tokens={tokens} sim:reasoning=0"
    async with sockets(pair.reader.url, clients) as conns:
        cpu0 = sum(cpu_seconds(pid) for pid in pair.pids)
        results = await asyncio.gather(*(handed_over(pair, n, prompt, ws, ramp or 1 / rate)
                                         for n, ws in enumerate(conns)))
        cpu = sum(cpu_seconds(pid) for pid in pair.pids) - cpu0
    lat = [x for r in results for x in r.latencies]
    return {"p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
            "tokens_lost": clients * tokens - sum(r.tokens for r in results),
            "cpu_us_per_token": cpu / max(1, sum(r.tokens for r in results)) * 1e6}


async def pair_scale(pair: Pair, levels: Sequence[int], seconds: float, limit_ms: float) -> dict[str, float]:
    best = 0
    rows: dict[str, float] = {}
    for level in levels:
        try:
            result = await pair_latency(pair, level, 20, int(seconds * 20), ramp=1.0)
        except (RuntimeError, OSError, TimeoutError, WebSocketException) as exc:
            print(f"    {pair.name} at {level} streams: {exc!r}"[:200], flush=True)
            break
        rows[f"p99_ms_at_{level}"] = result["p99_ms"]
        rows[f"cpu_us_per_token_at_{level}"] = result["cpu_us_per_token"]
        print(f"    {pair.name}: {level} streams, p99 {result['p99_ms']:.1f} ms, "
              f"{result['cpu_us_per_token']:.1f} us/token", flush=True)
        if result["p99_ms"] >= limit_ms or result["tokens_lost"]:
            break
        best = level
    rows["max_streams"] = best
    return rows


async def pair_cancel(pair: Pair, sim_port: int, runs: int, miss_after: float) -> dict[str, float]:
    """A run started on the producer, cancelled from the reader; the upstream's clock says when it saw
    its connection close."""
    cancels = Cancels()
    async with aiohttp.ClientSession() as http:
        for n in range(runs):
            tag = f"{pair.name}-cancel-{n}-{time.monotonic_ns()}"
            # (a socket per cancel: one socket sending a hundred would pass --messages-per-second)
            async with connect(pair.producer.url, ping_interval=None) as ws, \
                    connect(pair.reader.url, ping_interval=None) as other:
                await ws.send(json.dumps({"type": "run", "id": f"x{n}",
                                          "prompt": f"cancel me sim:rate=50 sim:tokens=400 sim:tag={tag}"}))
                key = json.loads(await ws.recv())["key"]
                while json.loads(await ws.recv())["type"] != "token":  # the model is answering
                    pass
                sent = time.monotonic()
                await other.send(json.dumps({"type": "cancel", "id": f"x{n}", "key": key}))
                cancels.add(await upstream_closed(http, sim_port, tag, sent, miss_after))
    return cancels.summary()


async def cluster_rows(results: dict[str, dict[str, dict[str, float]]], upstream: str, sim_port: int,
                       plan: Plan) -> None:
    """Two nodes and Redis against one node, in the same run and by the same client: each run starts on
    one node and its client reads it on the other (``resume``); the single node serves both sides.
    Nothing is pinned (two nodes, Redis, the upstream and the load share both cores): CPU per token
    counts every process of the pair."""
    redis_port = free_port()
    redis = await start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], redis_port)
    extra = ["--resume-grace", "30"]
    servers: list[Server] = []
    try:
        for name, cluster in (("single", False), ("a", True), ("b", True)):
            port = free_port()
            command = [part.replace("UPSTREAM", upstream).replace("PORT", str(port)) for part in WSAGENT]
            if cluster:
                command += ["--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--node-id", name]
            servers.append(await start(name, [*command, *extra], port))
        single, a, b = servers
        pairs = [Pair("wsagent-single", single, single, [single.pid]),
                 Pair("wsagent-cluster", a, b, [a.pid, b.pid, redis.pid])]
        for pair in pairs:
            print(f"== {pair.name}", flush=True)
            r = results[pair.name] = {}
            r["latency"] = await pair_latency(pair, 50, 50, plan.tokens)
            print(f"  latency {r['latency']}", flush=True)
            r["cancel"] = await pair_cancel(pair, sim_port, plan.cluster_cancels, 3.0)
            print(f"  cancel {r['cancel']}", flush=True)
            r["scale"] = await pair_scale(pair, plan.cluster_levels, plan.level_seconds, 50.0)
            print(f"  scale {r['scale']}", flush=True)
        # What a run that never leaves its node pays for being in a cluster (its log still goes to Redis).
        stays = Pair("wsagent-cluster-local", a, a, [a.pid, redis.pid])
        results[stays.name] = {"latency": await pair_latency(stays, 50, 50, plan.tokens)}
        print(f"== {stays.name}\n  latency {results[stays.name]['latency']}", flush=True)
    finally:
        for process in [*(s.process for s in servers), redis.process]:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)


async def connect_live(nodes: list[Server], n: int) -> tuple[Server, ClientConnection]:
    """A connection to a node that is not being restarted, as a client that moves makes one: a node that
    began to drain while this handshake was under way answers 503, and the client tries another."""
    for attempt in range(10):
        live = [s for s in nodes if not s.name.endswith("-stopping")]
        node = live[(n + attempt) % len(live)]
        try:
            return node, await connect(node.url, ping_interval=None)
        except InvalidStatus as refused:
            if refused.response.status_code != 503:
                raise
    raise RuntimeError("no node took a connection in ten tries")


async def moving_stream(nodes: list[Server], n: int, stop: asyncio.Event, stopped_at: dict[str, float],
                        tally: dict[str, list[float]]) -> None:
    """Runs at 20 tok/s, one after another until ``stop``; on a 1012 (its node restarts) the run is resumed
    on a live node. Tallies the runs, those that did not end ``done`` or whose seqs were not contiguous,
    and for each move the extra delay its client saw: the gap around the move beyond one token's interval."""
    count = 0
    while not stop.is_set():
        count += 1
        run_id = f"m{n}-{count}"
        node, ws = await connect_live(nodes, n)
        await ws.send(json.dumps({"type": "run", "id": run_id, "prompt": f"{n} restart sim:rate=20 sim:tokens=60"}))
        seqs: list[int] = []
        key, last, moved = "", 0.0, False
        while True:
            try:
                event = json.loads(await asyncio.wait_for(ws.recv(), 60))
            except ConnectionClosed as closed:
                if closed.rcvd is None or closed.rcvd.code != 1012:
                    raise
                tally["told"].append(time.monotonic() - stopped_at[node.name])
                node, ws = await connect_live(nodes, random.randrange(len(nodes)))
                await ws.send(json.dumps({"type": "resume", "id": run_id, "key": key, "after": seqs[-1]}))
                moved = True
                continue
            seqs.append(event["seq"])
            now = time.monotonic()
            if event["type"] == "start":
                key = event["key"]
            elif event["type"] == "token":
                if moved and last:
                    tally["extra"].append(max(0.0, now - last - 1 / 20))
                moved, last = False, now
            elif event["type"] in ("done", "error", "cancelled"):
                tally["runs"].append(1.0)
                if event["type"] != "done" or seqs != list(range(1, len(seqs) + 1)):
                    tally["lost"].append(1.0)
                break
        await ws.close()


async def restart_rows(results: dict[str, dict[str, dict[str, float]]], upstream: str, plan: Plan) -> None:
    """A rolling restart: three nodes and Redis, streams at 20 tok/s, each node restarted in turn (SIGTERM,
    its runs end, start again) while clients move (1012) and resume on the others."""
    redis_port = free_port()
    await start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no"], redis_port)

    async def node(name: str) -> Server:
        port = free_port()
        command = [part.replace("UPSTREAM", upstream).replace("PORT", str(port)) for part in WSAGENT]
        return await start(name, [*command, "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--node-id", name,
                                  "--drain-timeout", "30"], port)

    nodes = [await node(name) for name in ("a", "b", "c")]
    stop = asyncio.Event()
    stopped_at: dict[str, float] = {}
    tally: dict[str, list[float]] = {"runs": [], "lost": [], "told": [], "extra": []}
    streams = [asyncio.ensure_future(moving_stream(nodes, n, stop, stopped_at, tally))
               for n in range(plan.restart_streams)]
    began = time.monotonic()
    for n, name in enumerate(("a", "b", "c")):
        await asyncio.sleep(2)  # streams running on every node (a pace, not a wait for something)
        old = nodes[n]
        stopped_at[name] = time.monotonic()
        nodes[n] = Server(f"{name}-stopping", old.process, old.port)  # no new run or move goes to it
        old.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(old.process.wait(), 60)
        nodes[n] = await node(name)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*streams), 120)
    results["wsagent-restart"] = {"restart": {
        "runs": len(tally["runs"]), "runs_lost": len(tally["lost"]), "moves": len(tally["told"]),
        "told_p99_ms": pct(tally["told"], 0.99) * 1000, "extra_p50_ms": pct(tally["extra"], 0.5) * 1000,
        "extra_p99_ms": pct(tally["extra"], 0.99) * 1000, "seconds": time.monotonic() - began}}
    print(f"  restart {results['wsagent-restart']['restart']}", flush=True)


# -- takeover ----------------------------------------------------------------


@dataclass
class Watch:
    """A run watched from another node (``attach`` on a socket of its own): when each token frame arrived and
    how many tokens it held, every ``seq``, the last token's upstream stamp, and how the run ended."""

    run_id: str
    key: str
    socket: ClientConnection
    seqs: list[int] = field(default_factory=list)
    tokens: list[tuple[float, int]] = field(default_factory=list)  #: (arrival, tokens in the frame)
    stamp: float = 0.0  #: the upstream's stamp of the last token read
    end: str | None = None  #: the terminal event's type (an error's code after a colon); None: none came
    streaming: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, limit: float) -> None:
        """Frames until the run's terminal event, the socket's close or ``limit`` seconds."""
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(limit):
                async for frame in self.socket:
                    now = time.monotonic()
                    event = json.loads(frame)
                    if "seq" in event:
                        self.seqs.append(int(event["seq"]))
                    kind = event["type"]
                    if kind == "token":
                        found = stamps(event["content"])
                        self.tokens.append((now, len(found)))
                        if found:
                            self.stamp = found[-1]
                        if len(self.tokens) >= 5:
                            self.streaming.set()
                    elif kind in ("done", "error", "cancelled"):
                        self.end = f"{kind}:{event.get('code')}" if kind == "error" else kind
                        return

    def whole(self, tokens: int) -> bool:
        """Ended ``done``, every ``seq`` once and in order from the first, and all ``tokens`` tokens read."""
        seqs = self.seqs
        return (self.end == "done" and bool(seqs) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
                and sum(n for _, n in self.tokens) == tokens)

    def resumed(self, killed: float) -> float | None:
        """When the first token after the pause that ``killed`` began arrived: the first one after ``killed``
        that follows a silence of a second or more (a token already on its way at the kill is the dead
        producer's, not the new one's). None: no token came after such a silence."""
        previous = 0.0
        for arrived, _ in self.tokens:
            if arrived > killed and previous and arrived - previous >= 1.0:
                return arrived
            previous = arrived
        return None

    def caught_up(self, now: float) -> bool:
        """Its last token is at most 0.25 s old by the upstream's stamp (the backlog of the pause is read)."""
        return bool(self.stamp) and now - self.stamp < 0.25

    def tokens_between(self, start: float, end: float) -> int:
        return sum(n for arrived, n in self.tokens if start <= arrived < end)


async def open_watched(producer: Server, watcher: Server, run_id: str, prompt: str, leave: bool,
                       stagger: float = 0.0) -> tuple[ClientConnection | None, Watch]:
    """Start run ``run_id`` on ``producer`` and attach to it from ``watcher`` (another node). The run's own
    socket is returned open (to die with its node), or closed once the attach is sent (``leave``: the run
    goes on in its grace, and its producer writes to no client of its own)."""
    if stagger:
        await asyncio.sleep(random.uniform(0, stagger))
    own = await connect(producer.url, ping_interval=None, compression=None, open_timeout=10)
    await own.send(json.dumps({"type": "run", "id": run_id, "prompt": prompt}))
    first = json.loads(await asyncio.wait_for(own.recv(), 10))
    if first.get("type") != "start":
        raise RuntimeError(f"{producer.name} did not start run {run_id}: {first}")
    socket = await connect(watcher.url, ping_interval=None, compression=None, open_timeout=10, max_size=None)
    await socket.send(json.dumps({"type": "attach", "id": run_id, "key": first["key"]}))
    if leave:
        await own.close()
        return None, Watch(run_id, first["key"], socket)
    return own, Watch(run_id, first["key"], socket)


async def drain(own: ClientConnection, limit: float) -> None:
    """Read a run's own socket (its producer is paced by it) until it closes: at the kill, abruptly."""
    with contextlib.suppress(TimeoutError, ConnectionClosed, OSError):
        async with asyncio.timeout(limit):
            async for _ in own:
                pass


async def cluster_metric(http: aiohttp.ClientSession, server: Server, metric: str) -> float:
    """One unlabelled figure of ``server``'s ``/metrics`` (0 if it is not there)."""
    async with http.get(f"http://127.0.0.1:{server.port}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as reply:
        for line in (await reply.text()).splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[1])
    return 0.0


async def until(condition: Callable[[], bool], limit: float, what: str) -> None:
    """Poll ``condition`` every 10 ms, for at most ``limit`` seconds (then say ``what`` never came)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {limit:g} s")
        await asyncio.sleep(0.01)


async def takeover_kills(nodes: list[Server], plain: Server, spawn: Callable[[], Awaitable[Server]], plan: Plan,
                         http: aiohttp.ClientSession) -> dict[str, float]:
    """Rounds of: ``takeover_per_kill`` runs started on one node (their own sockets on it), each attached to from
    another node, the node SIGKILLed at a random moment of the second after every watcher reads tokens; for each
    run, the time from the SIGKILL to its watcher's first token after the pause; then a replacement node under a
    new id (three stay alive)."""
    tokens = 160
    prompt = f"takeover sim:stamp=1 sim:rate=40 sim:tokens={tokens} sim:reasoning=0"
    delays: list[float] = []
    runs = lost = unresumed = kills = 0
    claims: dict[str, float] = {}
    per_kill = plan.takeover_per_kill
    for n in range(math.ceil(plan.takeover_kills / per_kill)):
        producer = nodes[n % len(nodes)]
        survivors = [node for node in nodes if node is not producer]
        homes = [*survivors, plain]  # the watchers' nodes: the two that may take over, and one that may not
        opened = await asyncio.gather(*(open_watched(producer, homes[i % len(homes)], f"k{n}-{i}",
                                                     f"{n}-{i} {prompt}", leave=False) for i in range(per_kill)))
        watches = [watch for _, watch in opened]
        readers = [asyncio.ensure_future(watch.read(60)) for watch in watches]
        owners = [asyncio.ensure_future(drain(own, 60)) for own, _ in opened if own is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(watch.streaming.wait() for watch in watches)), 20)
            # At a random point of the heartbeats (one a second): nodes started back to back and a kill at a
            # fixed time after would otherwise find the beats at the same phase every round (2.85 s each time).
            await asyncio.sleep(random.uniform(0, 1.0))
            before = [await cluster_metric(http, node, "wsagent_cluster_runs_taken_over_total") for node in survivors]
            killed = time.monotonic()
            producer.process.kill()
            await asyncio.wait_for(producer.process.wait(), 10)
            kills += 1
            await asyncio.wait_for(asyncio.gather(*readers, *owners), 90)
        finally:
            for task in [*readers, *owners]:
                task.cancel()
            await asyncio.gather(*(watch.socket.close() for watch in watches), return_exceptions=True)
        for node, was in zip(survivors, before, strict=True):
            took = await cluster_metric(http, node, "wsagent_cluster_runs_taken_over_total") - was
            if took:
                claims[node.name] = claims.get(node.name, 0) + took
        for watch in watches:
            runs += 1
            at = watch.resumed(killed)
            if at is None:
                unresumed += 1
            else:
                delays.append(at - killed)
            if not watch.whole(tokens):
                lost += 1
                print(f"    run {watch.run_id} (key {watch.key}) on {producer.name}: ended {watch.end}, "
                      f"{sum(c for _, c in watch.tokens)} of {tokens} tokens, seqs {watch.seqs[:3]}..{watch.seqs[-3:]}",
                      flush=True)
        print(f"    kill {kills}: {producer.name}, {len(watches)} runs, SIGKILL to the next token "
              f"{', '.join(f'{d:.2f}' for d in delays[-len(watches):])} s", flush=True)
        nodes[n % len(nodes)] = await spawn()
    return {"runs": runs, "runs_lost": lost, "unresumed": unresumed, "kills": kills, "per_kill": per_kill,
            "resume_p50_ms": pct(delays, 0.5) * 1000, "resume_p99_ms": pct(delays, 0.99) * 1000,
            "resume_max_ms": max(delays, default=math.nan) * 1000,
            "claimers_per_kill": len(claims) / max(1, kills), "runs_taken_over": sum(claims.values())}


async def producer_window(producers: list[Server], watches: list[Watch], seconds: float,
                          http: aiohttp.ClientSession) -> dict[str, float]:
    """The ``producers``' CPU over ``seconds`` against the tokens the watchers read meanwhile (every one of
    them produced there), and their writes of run entries to Redis."""
    batches0 = sum([await cluster_metric(http, node, "wsagent_cluster_batches_total") for node in producers])
    cpu0, t0 = sum(cpu_seconds(node.pid) for node in producers), time.monotonic()
    await asyncio.sleep(seconds)  # the measured window: the watchers read meanwhile
    cpu, t1 = sum(cpu_seconds(node.pid) for node in producers) - cpu0, time.monotonic()
    batches = sum([await cluster_metric(http, node, "wsagent_cluster_batches_total") for node in producers]) - batches0
    tokens = sum(watch.tokens_between(t0, t1) for watch in watches)
    return {"tokens": tokens, "cpu_s_per_100k": cpu / max(1, tokens) * 100_000,
            "redis_writes_per_token": batches / max(1, tokens)}


async def takeover_cpu(producer: Server, home: Server, claimers: list[Server] | None, plan: Plan, label: str,
                       http: aiohttp.ClientSession, rate: float = 20) -> dict[str, dict[str, float]]:
    """``takeover_streams`` runs at ``rate`` tok/s on ``producer``, each watched from ``home`` (their own sockets
    left: no producer writes to a client of its own), the producer's CPU per token over a window; with
    ``claimers``, the producer is then SIGKILLed and, once every run is going on and its backlog read, the CPU
    per token of whichever of them took the runs over, over a window as long. Every run is then cancelled."""
    seconds = plan.takeover_seconds
    prompt = f"takeover cpu sim:stamp=1 sim:rate={rate:g} sim:tokens={int(rate * (2 * seconds + 25))} sim:reasoning=0"
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> Watch:
        async with gate:
            return (await open_watched(producer, home, f"{label}-{i}", f"{label} {i} {prompt}", leave=True,
                                       stagger=1.0))[1]

    watches = list(await asyncio.gather(*(one(i) for i in range(plan.takeover_streams))))
    readers = [asyncio.ensure_future(watch.read(120)) for watch in watches]
    out: dict[str, dict[str, float]] = {}
    try:
        await asyncio.wait_for(asyncio.gather(*(watch.streaming.wait() for watch in watches)), 30)
        await asyncio.sleep(1.0)  # every run streaming steadily before the window
        out["producer"] = await producer_window([producer], watches, seconds, http)
        if claimers is not None:
            before = [await cluster_metric(http, node, "wsagent_cluster_runs_taken_over_total") for node in claimers]
            killed = time.monotonic()
            producer.process.kill()
            await asyncio.wait_for(producer.process.wait(), 10)
            await until(lambda: all(watch.resumed(killed) is not None or watch.end for watch in watches), 30,
                        "every run going on after the kill")
            await until(lambda: all(watch.caught_up(time.monotonic()) or watch.end for watch in watches), 30,
                        "every watcher caught up")
            await asyncio.sleep(0.5)
            took = [await cluster_metric(http, node, "wsagent_cluster_runs_taken_over_total") - was
                    for node, was in zip(claimers, before, strict=True)]
            taking = [node for node, count in zip(claimers, took, strict=True) if count]
            out["claimer"] = await producer_window(taking, watches, seconds, http)
            out["claimer"].update(runs_taken_over=sum(took), claimers=len(taking),
                                  ended_early=sum(1 for watch in watches if watch.end))
        for watch in watches:
            if not watch.end:
                await watch.socket.send(json.dumps({"type": "cancel", "id": watch.run_id, "key": watch.key}))
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*(watch.socket.close() for watch in watches), return_exceptions=True)
    return out


async def takeover_rows(results: dict[str, dict[str, dict[str, float]]], upstream: str, plan: Plan) -> None:
    """Runs that outlive their node (``--takeover background``): Redis, three nodes with it and one without
    (``--upstream-api responses`` all, their runs read from the simulator's Responses API), nothing pinned.

    * :func:`takeover_kills`: SIGKILL to the watchers' first token after the pause, and the runs lost;
    * :func:`takeover_cpu`: CPU per token of a plain cluster run's producer (the node without ``--takeover``),
      of a resumable run's producer (before the kill), and of the node that took the runs over (after it)."""
    redis_port = free_port()
    redis = await start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], redis_port)
    started: list[Server] = []
    names = iter(f"n{n}" for n in range(1, 10_000))

    async def node(name: str, takeover: bool = True) -> Server:
        port = free_port()
        command = [part.replace("UPSTREAM", upstream).replace("PORT", str(port)) for part in WSAGENT]
        command += ["--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--node-id", name, "--upstream-api",
                    "responses", "--resume-grace", "30"]
        server = await start(name, [*command, *(["--takeover", "background"] if takeover else [])], port)
        started.append(server)
        return server

    mine = results["wsagent-takeover"] = {}
    failures = (RuntimeError, TimeoutError, OSError, WebSocketException)
    try:
        async with aiohttp.ClientSession() as http:
            plain = await node("plain", takeover=False)
            nodes = [await node(name) for name in ("a", "b", "c")]
            print("== takeover: SIGKILL to the watchers' next token", flush=True)
            try:
                mine["takeover"] = await takeover_kills(nodes, plain, lambda: node(next(names)), plan, http)
                print(f"  takeover {mine['takeover']}", flush=True)
            except failures as exc:  # a finding to report, not a reason to lose the rows after these
                print(f"  takeover kills failed: {exc!r}", flush=True)
            print("== takeover: CPU per token", flush=True)
            for n, server in enumerate(nodes):  # (a round that failed may have left a node killed)
                if server.process.returncode is not None:
                    nodes[n] = await node(next(names))
            try:
                base = await takeover_cpu(plain, nodes[0], None, plan, "plain", http)
                print(f"  plain cluster run {base}", flush=True)
                mine["cpu_plain"] = base["producer"]
                taken = await takeover_cpu(nodes[0], plain, nodes[1:], plan, "resumable", http)
                print(f"  takeover {taken}", flush=True)
                mine["cpu_resumable"], mine["cpu_claimer"] = taken["producer"], taken["claimer"]
            except failures as exc:
                print(f"  takeover CPU failed: {exc!r}", flush=True)
    finally:
        for process in [*(s.process for s in started), redis.process]:
            if process.returncode is None:
                process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)


# -- driver ------------------------------------------------------------------


WSAGENT = [sys.executable, "-m", "wsagent.serve", "--port", "PORT", "--upstream-url", "UPSTREAM", "--log-level",
           "WARNING", "--max-connections", "100000", "--max-connections-per-ip", "100000", "--run-max-tokens", "0",
           "--run-max-seconds", "0", "--max-runs-per-user", "100000", "--max-runs-per-ip", "0"]
#: The servers, in the table's order: wsagent, then the peers (see the module's docstring), the floor last.
PEERS = [
    ("wsagent", WSAGENT),
    ("fastapi", [sys.executable, "-m", "uvicorn", "scripts.bench_peer:app", "--port", "PORT", "--log-level", "warning",
                 "--no-access-log", "--ws-max-queue", "16"]),
    ("aiohttp", [sys.executable, "scripts/peer_aiohttp.py", "--port", "PORT"]),
    ("node", ["node", "scripts/node-peer/relay.mjs", "PORT"]),
    ("floor", [sys.executable, "scripts/peer_floor.py", "--port", "PORT"]),
]
if importlib.util.find_spec("uvloop") is not None:  # wsagent uses it when installed: measure it without too
    PEERS.insert(1, ("wsagent-asyncio", [*WSAGENT, "--event-loop", "asyncio"]))
#: Environment a server of PEERS needs beyond the peers' (``--before``: where the other tree is).
PEER_ENV: dict[str, dict[str, str]] = {}
LABELS = {"wsagent": "wsagent", "wsagent-before": "wsagent, before",
          "wsagent-asyncio": "wsagent, asyncio loop", "fastapi": "tutorial (FastAPI)",
          "aiohttp": "aiohttp", "node": "Node.js (ws)", "floor": "floor"}


async def workers_row(results: dict[str, dict[str, dict[str, float]]], upstream: str, plan: Plan) -> None:
    """What a second core buys: wsagent with one worker and with ``--workers 2``, neither pinned (the load
    shares both cores with them), throughput and scale, one after the other."""
    for name, workers in (("wsagent-1w", "1"), ("wsagent-2w", "2")):
        port = free_port()
        command = [part.replace("UPSTREAM", upstream).replace("PORT", str(port)) for part in WSAGENT]
        server = await start(name, [*command, "--workers", workers], port)
        try:
            print(f"== {name} (not pinned)", flush=True)
            r = results[name] = {}
            r["throughput"] = await throughput(server, 40, plan.throughput_tokens)
            print(f"  throughput {r['throughput']}", flush=True)
            r["scale"] = await scale(server, plan.worker_levels, plan.level_seconds, 50.0)
            print(f"  scale {r['scale']}", flush=True)
        finally:
            server.process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.process.wait(), 15)


async def bench(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    tune_gc(DEFAULT_GC_THRESHOLDS)  # the measuring client must not add collector pauses of its own to what it measures
    tune_malloc()  # nor spend the cores it shares with the servers on mmap for every frame it reads
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    plan = QUICK if args.quick else FULL
    sim_port = free_port()
    upstream = f"http://127.0.0.1:{sim_port}/v1"
    sim = await start("simulator", [sys.executable, "-m", "wsagent.simulator", "--switches", "--port", str(sim_port),
                                    "--rate", "0", "--no-reasoning"], sim_port)
    peer_env = {"BENCH_UPSTREAM_URL": upstream}
    servers = []
    chosen = set(args.servers.split(",")) if args.servers else None
    for name, command in PEERS:
        if (chosen is not None and name not in chosen) or args.only_takeover:
            continue
        port = free_port()
        servers.append(await start(name, [p.replace("PORT", str(port)).replace("UPSTREAM", upstream) for p in command],
                                   port, {**peer_env, **PEER_ENV.get(name, {})}))
    placement = "not pinned" if args.no_pin or args.only_takeover else pin(servers, [sim.process.pid, 0])
    print(placement, flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        if args.starts:  # only this, in rounds like latency's
            for n in range(3):
                for server in servers:
                    cost = results.setdefault(server.name, {})[f"starts_{n}"] = await starts(server, 200, 10)
                    print(f"  {server.name}: {cost['cpu_us_per_run']:.0f} us per one-token run", flush=True)
            return results
        if args.idle:  # only this, in rounds, each figure the median of its rounds
            idle: dict[str, dict[str, list[dict[str, float]]]] = {server.name: {} for server in servers}
            for n in range(plan.rounds):
                for count in plan.idle_counts:
                    for server in servers:
                        # A server that held connections before keeps their memory for the next ones: each
                        # measure starts one afresh, as the first measure of a full run does.
                        fresh = await restart(server)
                        servers[servers.index(server)] = fresh
                        cost = await idle_memory(fresh, count)
                        idle[server.name].setdefault(f"idle_{count}", []).append(cost)
                        if not math.isnan(cost["rss_kib_per_connection"]):
                            print(f"  round {n + 1}: {server.name} {count} idle: "
                                  f"{cost['rss_kib_per_connection']:.2f} KiB per connection", flush=True)
            return {name: {key: median(costs) for key, costs in rows.items()} for name, rows in idle.items()}
        # The figures that move most between runs, in rounds that take every server in turn: a slow
        # minute of the machine lands on all of them alike, and each figure is the median of its rounds.
        rounds: dict[str, dict[str, list[dict[str, float]]]] = {server.name: {} for server in servers}
        for n in range(plan.rounds):
            for server in servers:
                mine = rounds[server.name]
                print(f"== round {n + 1} of {plan.rounds}: {server.name}", flush=True)
                mine.setdefault("latency", []).append(await latency(server, 50, 50, plan.tokens))
                if server.name == "wsagent":  # the AI SDK's protocol, in the same run
                    mine.setdefault("latency_ai_sdk", []).append(await latency(server, 50, 50, plan.tokens,
                                                                               ai_sdk=True))
                mine.setdefault("throughput", []).append(await throughput(server, 20, plan.throughput_tokens))
                for scenario, figures in mine.items():
                    print(f"  {scenario} {figures[-1]}", flush=True)
        for server in servers:
            print(f"== {server.name}", flush=True)
            r = results[server.name] = {scenario: median(figures) for scenario, figures in rounds[server.name].items()}
            for abrupt in (False, True):
                key = "cancel_abrupt" if abrupt else "cancel_clean"
                r[key] = await cancellation(server, sim_port, plan.cancels, abrupt, plan.miss_after)
                print(f"  {key} {r[key]}", flush=True)
            # Before the idle scenarios: the memory their connections free would hide the slow client's growth.
            await slow_client(server, sim_port, plan.slow_warmup, 64 * 1024)  # first-use allocations are not growth
            r["slow_client"] = await slow_client(server, sim_port, plan.slow_seconds, 64 * 1024)
            print(f"  slow client {r['slow_client']}", flush=True)
            for count in plan.idle_counts:
                r[f"idle_{count}"] = await idle_memory(server, count)
                print(f"  idle {count} {r[f'idle_{count}']}", flush=True)
            r["scale"] = await scale(server, plan.levels, plan.level_seconds, 50.0)
            print(f"  scale {r['scale']}", flush=True)
        everything = set(range(os.cpu_count() or 1))
        for pid in (0, sim.process.pid):  # the cluster and --workers rows share every core, the load too
            os.sched_setaffinity(pid, everything)
        if shutil.which("redis-server") and not args.no_cluster:
            if not args.only_takeover:
                await cluster_rows(results, upstream, sim_port, plan)
            if not args.no_takeover and not args.only_takeover:
                print("== rolling restart", flush=True)
                await restart_rows(results, upstream, plan)
            if not args.no_takeover:
                await takeover_rows(results, upstream, plan)
        elif args.only_takeover:
            raise SystemExit("--only-takeover needs redis-server (and no --no-cluster)")
        if not args.no_workers and not args.only_takeover:
            await workers_row(results, upstream, plan)
    finally:
        for process in [*(s.process for s in servers), sim.process]:
            process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 10)
    return results


ROWS = [
    ("latency", "p50_ms", "added latency per token, p50 (ms), 50 clients x 50 tok/s", "lower"),
    ("latency", "p99_ms", "added latency per token, p99 (ms)", "lower"),
    ("latency", "ttft_added_p99_ms", "time to first token added, p99 (ms)", "lower"),
    ("throughput", "tokens_per_s", "throughput, 20 clients at full speed (tokens/s)", "higher"),
    ("throughput", "cpu_s_per_100k", "server CPU seconds per 100k tokens", "lower"),
    ("cancel_clean", "p99_ms", "cancellation after a clean close, p99 (ms)", "lower"),
    ("cancel_clean", "missed", "clean closes never cancelled upstream", "lower"),
    ("cancel_abrupt", "p99_ms", "cancellation after an abrupt close, p99 (ms)", "lower"),
    ("cancel_abrupt", "missed", "abrupt closes never cancelled upstream", "lower"),
    ("idle_1000", "rss_kib_per_connection", "RSS per idle connection, 1,000 open (KiB)", "lower"),
    ("idle_10000", "rss_kib_per_connection", "RSS per idle connection, 10,000 open (KiB)", "lower"),
    ("idle_50000", "rss_kib_per_connection", "RSS per idle connection, 50,000 open (KiB)", "lower"),
    ("slow_client", "rss_growth_mib", "RSS growth, one slow reader (MiB)", "lower"),
    ("slow_client", "upstream_mib", "upstream text sent meanwhile (MiB)", "lower"),
    ("slow_client", "received_mib", "text the slow client read (MiB)", "higher"),
    ("scale", "max_streams", "most streams at 20 tok/s with p99 < 50 ms", "higher"),
]


def _number(value: float) -> str:
    if math.isnan(value):
        return "none"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def _ratio(ours: float, theirs: float) -> str:
    """``ours / theirs``, the same way round on every row (each row's "better" column says which way wins)."""
    if theirs < 0 or ours < 0:  # an RSS that shrank while connections opened (V8 gave memory back): no ratio
        return "n/a"
    if math.isnan(theirs) and not math.isnan(ours):
        return "it never cancelled"
    if ours == theirs:
        return "same"
    if not theirs or math.isnan(ours):
        return "n/a"
    return f"{ours / theirs:.2f}"


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per measure, one column per server, then wsagent against the strongest peers and the floor."""
    names = [name for name, _ in PEERS if name in results]
    against = [name for name in ("aiohttp", "node", "floor") if name in results]
    lines = ["| measure | better | " + " | ".join(LABELS[n] for n in names) + " | "
             + " | ".join(f"wsagent / {LABELS[n]}" for n in against) + " |",
             "| --- | --- |" + " ---: |" * (len(names) + len(against))] if names else []
    for scenario, key, label, better in ROWS:
        values = [results.get(n, {}).get(scenario, {}).get(key) for n in names]
        if not values or values[0] is None:
            continue
        ours = float(values[0])
        ratios = []
        for name in against:
            theirs = results.get(name, {}).get(scenario, {}).get(key)
            ratios.append(_ratio(ours, float(theirs)) if theirs is not None else "-")
        shown = [_number(float(v)) if v is not None else "-" for v in values]
        lines.append(f"| {label} | {better} | " + " | ".join(shown) + " | " + " | ".join(ratios) + " |")
    chat = results.get("wsagent", {}).get("latency")
    sdk = results.get("wsagent", {}).get("latency_ai_sdk")
    if chat and sdk:  # the AI SDK's protocol against wsagent's own /ws/chat, measured in the same run
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            lines.append(f"| added latency per token, {label} (ms), on /ws/ai-sdk: {_number(sdk[key])} "
                         f"(/ws/ai-sdk / /ws/chat: {sdk[key] / chat[key]:.2f}) | lower |"
                         + " |" * (len(names) + len(against)))
    lines += _versus(results, "wsagent-single", "wsagent-cluster", (
        "not pinned; each run read on another node (resume)", "one node", "two nodes + Redis", "cluster / one"), (
        ("latency", "p50_ms", "added latency per token, p50 (ms), 50 x 50 tok/s", "lower"),
        ("latency", "p99_ms", "added latency per token, p99 (ms)", "lower"),
        ("latency", "cpu_us_per_token", "CPU per token, every process (us)", "lower"),
        ("cancel", "p99_ms", "cancel to upstream close, p99 (ms)", "lower"),
        ("cancel", "missed", "cancels never seen upstream", "lower"),
        ("scale", "max_streams", "most streams at 20 tok/s with p99 < 50 ms", "higher")))
    lines += _versus(results, "wsagent-single", "wsagent-cluster-local", (
        "not pinned; each run read on its own node", "one node", "a node of a cluster", "cluster / one"), (
        ("latency", "p50_ms", "added latency per token, p50 (ms), 50 x 50 tok/s", "lower"),
        ("latency", "p99_ms", "added latency per token, p99 (ms)", "lower"),
        ("latency", "cpu_us_per_token", "CPU per token, the node and Redis (us)", "lower")))
    restart = results.get("wsagent-restart", {}).get("restart")
    if restart:
        lines += ["", "| rolling restart: three nodes restarted in turn, streams at 20 tok/s moving | |",
                  "| --- | ---: |",
                  f"| runs, and runs lost (not `done`, or a seq missing or doubled) | {restart['runs']:.0f}, "
                  f"{restart['runs_lost']:.0f} |",
                  f"| moves (a client told 1012, resumed on another node) | {restart['moves']:.0f} |",
                  f"| SIGTERM to the client told to move, p99 (ms) | {_number(restart['told_p99_ms'])} |",
                  f"| extra delay a moved client saw, p50 / p99 (ms) | {_number(restart['extra_p50_ms'])} / "
                  f"{_number(restart['extra_p99_ms'])} |"]
    lines += _takeover_table(results.get("wsagent-takeover"))
    lines += _versus(results, "wsagent-1w", "wsagent-2w", (
        "not pinned (the load shares both cores)", "one worker", "--workers 2", "two / one"), (
        ("throughput", "tokens_per_s", "throughput, 40 clients at full speed (tokens/s)", "higher"),
        ("throughput", "cpu_s_per_100k", "server CPU seconds per 100k tokens", "lower"),
        ("scale", "max_streams", "most streams at 20 tok/s with p99 < 50 ms", "higher")))
    return "\n".join(lines)


def _takeover_table(takeover: dict[str, dict[str, float]] | None) -> list[str]:
    """The takeover rows (:func:`takeover_rows`), or nothing if they did not run."""
    if not takeover:
        return []
    lines = []
    kills = takeover.get("takeover")
    if kills:
        lines += ["", "| takeover: three nodes with --takeover background, the producer SIGKILLed | |",
                  "| --- | ---: |",
                  f"| runs, and runs lost (not `done`, a seq missing or doubled, or a token missing) | "
                  f"{kills['runs']:.0f}, {kills['runs_lost']:.0f} |",
                  f"| SIGKILLs, runs per SIGKILL (each watched from another node) | {kills['kills']:.0f}, "
                  f"{kills['per_kill']:.0f} |",
                  f"| SIGKILL to the watcher's first token after the pause, p50 / p99 (ms) | "
                  f"{_number(kills['resume_p50_ms'])} / {_number(kills['resume_p99_ms'])} |",
                  f"| runs whose watcher saw no token after the pause | {kills['unresumed']:.0f} |"]
    plain, resumable, claimer = (takeover.get(k) for k in ("cpu_plain", "cpu_resumable", "cpu_claimer"))
    if plain and resumable and claimer:
        lines += ["", "| not pinned; the producing node, each run watched from another | better | plain cluster run "
                  "| --takeover, before the SIGKILL | the node that took over | took over / plain |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for key, label in (("cpu_s_per_100k", "server CPU seconds per 100k tokens"),
                           ("redis_writes_per_token", "writes of run entries to Redis per token")):
            lines.append(f"| {label} | lower | {_number(plain[key])} | {_number(resumable[key])} | "
                         f"{_number(claimer[key])} | {_ratio(claimer[key], plain[key])} |")
    return lines


def _versus(results: dict[str, dict[str, dict[str, float]]], first: str, second: str, heads: tuple[str, ...],
            rows: tuple[tuple[str, str, str, str], ...]) -> list[str]:
    """A table of ``second`` against ``first`` (both measured in the run), or nothing if either is missing."""
    one, two = results.get(first), results.get(second)
    if not one or not two:
        return []
    lines = ["", f"| {heads[0]} | better | " + " | ".join(heads[1:]) + " |", "| --- | --- | ---: | ---: | ---: |"]
    for scenario, key, label, better in rows:
        a_value, b_value = one[scenario][key], two[scenario][key]
        lines.append(f"| {label} | {better} | {_number(a_value)} | {_number(b_value)} | {_ratio(b_value, a_value)} |")
    return lines


async def bench_then_stop(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    try:
        return await bench(args)
    finally:
        await stop_started()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under two minutes (QUICK)")
    parser.add_argument("--out", type=Path, help="write the raw results as JSON here")
    parser.add_argument("--no-pin", action="store_true", help="let servers and load share every core")
    parser.add_argument("--no-workers", action="store_true", help="leave out the --workers 2 rows")
    parser.add_argument("--no-cluster", action="store_true", help="leave out the cluster rows (two nodes and Redis)")
    parser.add_argument("--no-takeover", action="store_true",
                        help="of the cluster rows, leave out the rolling restart and the takeover (the longest)")
    parser.add_argument("--starts", action="store_true",
                        help="only the server CPU per one-token run (what starting and ending a run costs), in rounds")
    parser.add_argument("--servers", help="only these, comma-separated (wsagent,fastapi,aiohttp,node,floor)")
    parser.add_argument("--idle", action="store_true",
                        help="only RSS per idle connection at 1,000, 10,000 and 50,000 connections, in rounds")
    parser.add_argument("--hold", nargs=3, metavar=("URL", "COUNT", "SOURCE"), help=argparse.SUPPRESS)
    parser.add_argument("--only-takeover", action="store_true",
                        help="only the takeover rows (--takeover background: SIGKILL to the watchers' next token, "
                             "runs lost, CPU per token of the node that took over); needs redis-server")
    parser.add_argument("--before", type=Path, metavar="TREE",
                        help="also run wsagent from another checkout (git worktree add TREE main), as 'wsagent, "
                             "before': a change's before and after in one run")
    args = parser.parse_args()
    if args.before:
        # -P: not the working directory (this tree) first on the path, but PYTHONPATH's tree.
        PEERS.insert(1, ("wsagent-before", [sys.executable, "-P", *WSAGENT[1:]]))
        PEER_ENV["wsagent-before"] = {"PYTHONPATH": str(args.before.resolve())}
    if args.hold:
        url, count, source = args.hold
        asyncio.run(hold(url, int(count), source))
        return
    started = time.monotonic()
    results = asyncio.run(bench_then_stop(args))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    if args.idle:
        print()
        print(table(results))
        return
    if args.starts:
        for name, rounds in results.items():
            print(f"{LABELS[name]}: {statistics.median(r['cpu_us_per_run'] for r in rounds.values()):.0f} us of "
                  "server CPU per one-token run (median of three rounds)")
        return
    print()
    print(table(results))
    print(f"\n{'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f}s, {os.cpu_count()} cores,"
          f" python {sys.version.split()[0]}, "
          f"{'not pinned' if args.no_pin or args.only_takeover else 'servers and load on separate cores'}")


if __name__ == "__main__":
    main()
