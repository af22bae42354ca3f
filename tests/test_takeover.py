"""Runs that outlive their node (``--takeover background``): real processes (three nodes, Redis, the simulator
serving the Responses API's background responses); the producer is SIGKILLed mid-answer."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wsagent.upstream.simulator import SimulatorServer

from .helpers import Cluster, Node, frames_until, redis_server, seq, start_run, terminal

pytestmark = pytest.mark.skipif(not __import__("shutil").which("redis-server"), reason="needs redis-server")

TAKEOVER = {"upstream_api": "responses", "takeover": "background"}


@pytest.fixture
async def cluster(sim: SimulatorServer) -> AsyncIterator[Cluster]:
    async with contextlib.AsyncExitStack() as stack:
        port, process = await stack.enter_async_context(redis_server(0))
        yield Cluster(stack, sim, port, process)


def text(frames: list[str]) -> str:
    return "".join(json.loads(f).get("content", "") for f in frames if json.loads(f)["type"] == "token")


def contiguous(frames: list[str], after: int) -> None:
    """Each frame's seq is the one after the last, from ``after``; exactly one terminal event, last."""
    seqs = [seq(f) for f in frames]
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), seqs
    kinds = [json.loads(f)["type"] for f in frames]
    assert [k for k in kinds if k in ("done", "error", "cancelled")] == [kinds[-1]], kinds[-3:]


async def killed(node: Node) -> None:
    """SIGKILL ``node`` (its pid, started by the test) and wait for it to be gone."""
    node.process.send_signal(signal.SIGKILL)
    await node.process.wait()


async def expected(node: Node, prompt: str) -> str:
    """The answer the simulator gives ``prompt``, streamed whole from ``node``."""
    async with node.connect() as ws:
        await start_run(ws, "expected", prompt)
        return text(await frames_until(ws, terminal))


async def test_a_watcher_and_the_resumed_client_get_the_rest_when_the_producer_dies(
        cluster: Cluster, sim: SimulatorServer) -> None:
    a, b, c = await cluster.start("a", "b", "c", **TAKEOVER)
    prompt = "sim:rate=40 sim:tokens=160 sim:reasoning=0 takeover"
    async with a.connect() as own, b.connect() as watcher:
        key = await start_run(own, "r1", prompt)
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(watcher, lambda e: e["type"] == "start")
        head = await frames_until(own, lambda e: e["type"] == "token" and e["seq"] >= 12)
        began = time.monotonic()
        await killed(a)
        watched = await frames_until(watcher, terminal, limit=60)
        paused = time.monotonic() - began
    async with c.connect() as moved:
        await moved.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        rest = await frames_until(moved, terminal, limit=30)
    contiguous(rest, seq(head[-1]))
    assert json.loads(rest[-1])["type"] == "done", rest[-1]
    assert json.loads(watched[-1])["type"] == "done", watched[-1]
    whole = await expected(b, prompt)
    assert text(head) + text(rest) == whole
    assert text(watched) == whole  # it attached at the start: all of it, once
    contiguous(watched, 1)
    responses = [stat for stat in sim.simulator.stats.background.values() if stat.status == "completed"]
    # the killed run's response and the expected one: each token generated once, the killed one read twice
    assert sorted(stat.tokens for stat in responses) == [160, 160]
    assert sorted(len(stat.retrievals) for stat in responses) == [0, 1]
    print(f"takeover pause {paused:.2f} s")


async def test_takeover_off_is_today_s_producer_lost(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", upstream_api="responses")
    async with a.connect() as own, b.connect() as watcher:
        key = await start_run(own, "r1", "sim:rate=40 sim:tokens=160 sim:reasoning=0")
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(watcher, lambda e: e["type"] == "token")
        await killed(a)
        last: dict[str, Any] = json.loads((await frames_until(watcher, terminal, limit=30))[-1])
    assert (last["type"], last["code"]) == ("error", "producer_lost")
