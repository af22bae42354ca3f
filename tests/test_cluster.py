"""Cluster mode end to end: a real ``redis-server``, wsagent nodes as separate processes, the simulator.

Faults are injected as they happen in production: a node killed with SIGKILL,
a node or Redis stopped with SIGSTOP, Redis stopped and started again empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from wsagent.core.errors import ClusterUnavailable
from wsagent.core.events import Start, Token
from wsagent.engine.cluster import RedisBroker
from wsagent.engine.cluster.names import name as _name
from wsagent.engine.cluster.wire import Address, Wire
from wsagent.engine.run import Run
from wsagent.upstream.simulator import SimulatorServer

from .helpers import (
    LIMIT,
    REDIS_SERVER,
    TERMINAL,
    Cluster,
    Node,
    drive_at,
    frames_until,
    key_events,
    redis_fields,
    redis_server,
    redis_went,
    run_request,
    seq,
    start_run,
    stream_entries,
    terminal,
)
from .processes import free_port, started


def at_most(count: int) -> Any:
    """A stop for :func:`frames_until`: after ``count`` frames, or at the terminal event."""
    seen = iter(range(1, count + 1))
    return lambda event: terminal(event) or next(seen, count) == count


async def begun(node: Node, run_id: str, prompt: str) -> tuple[str, int]:
    """Start ``run_id`` on ``node`` and read there up to its first token, then leave: its key, and the
    last seq read."""
    async with node.connect() as ws:
        key = await start_run(ws, run_id, prompt)
        head = await frames_until(ws, lambda e: e["type"] == "token")
    return key, seq(head[-1])


async def whole_log(node: Node, run_id: str, key: str, user: str | None = None) -> list[str]:
    """Every frame of a finished run, attached from its start (the producer's log, verbatim)."""
    async with node.connect(user=user) as ws:
        await ws.send(json.dumps({"type": "attach", "id": run_id, "key": key, "after": 0}))
        return await frames_until(ws, terminal)


async def test_resume_on_another_node_gives_the_same_frames(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b")
    async with a.connect() as ws:
        key = await start_run(ws, "r1", "hello sim:rate=200 sim:tokens=120")
        head = await frames_until(ws, lambda e: e.get("seq", 0) >= 20)
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        tail = await frames_until(ws, terminal)
    assert json.loads(tail[-1])["type"] == "done", tail[-1]
    received = head + tail  # (the start frame was read by start_run())
    assert [seq(f) for f in received] == list(range(2, seq(tail[-1]) + 1))  # no gap, no duplicate
    reference = await whole_log(a, "r1", key)
    assert received == reference[1:]  # byte for byte


async def test_attach_from_a_third_node_mid_stream(cluster: Cluster) -> None:
    a, _, c = await cluster.start("a", "b", "c")
    async with a.connect() as producer:
        key = await start_run(producer, "r1", "hello sim:rate=100 sim:tokens=150")
        await frames_until(producer, lambda e: e.get("seq", 0) >= 10)
        async with c.connect() as watcher:
            await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
            watched = await frames_until(watcher, terminal)
        own = await frames_until(producer, terminal)
    assert json.loads(own[-1])["type"] == "done", own[-1]
    reference = await whole_log(a, "r1", key)
    assert watched == reference  # from the start event: the run's log is short enough to be kept whole
    assert sum(1 for f in watched if json.loads(f)["type"] in TERMINAL) == 1


async def test_cancel_from_another_node_closes_the_upstream_request(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b")
    sim = cluster.sim.simulator.stats
    async with a.connect() as producer:
        key = await start_run(producer, "r1", "a long one sim:rate=50 sim:tokens=5000")
        await frames_until(producer, lambda e: e["type"] == "token")
        async with b.connect() as other:
            sent = time.monotonic()
            await other.send(json.dumps({"type": "cancel", "id": "r1", "key": key}))
            await sim.wait_for(lambda s: s.disconnected == 1, LIMIT)
            closed = time.monotonic() - sent
            end = await frames_until(producer, terminal)
            await other.send(json.dumps({"type": "cancel", "id": "r1", "key": key}))  # again: it has ended
            again = json.loads(await asyncio.wait_for(other.recv(), LIMIT))
            assert (again["type"], again["code"]) == ("error", "unknown_run"), again
    assert json.loads(end[-1]) | {"seq": 0} == json.loads(end[-1]) | {"seq": 0, "type": "cancelled",
                                                                       "reason": "cancelled by client"}
    assert closed < 1.0, f"the upstream saw its connection close {closed * 1000:.0f} ms after the cancel"


async def test_another_user_cannot_resume_attach_or_cancel(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b")
    async with a.connect(user="alice") as alice:
        key = await start_run(alice, "mine", "secret sim:rate=50 sim:tokens=100")
        async with b.connect(user="bob") as bob:
            for kind in ("resume", "attach", "cancel"):
                await bob.send(json.dumps({"type": kind, "id": "mine", "key": key, "after": 0}))
                refusal = json.loads(await bob.recv())
                assert (refusal["type"], refusal["code"]) == ("error", "unknown_run"), refusal
        async with b.connect(user="alice") as alice_elsewhere:  # her own, from another node, by id alone
            await alice_elsewhere.send(json.dumps({"type": "attach", "id": "mine"}))
            watched = await frames_until(alice_elsewhere, terminal)
        assert json.loads(watched[-1])["type"] == "done"
        own = await frames_until(alice, terminal)
        assert json.loads(own[-1])["type"] == "done", own[-1]


async def test_a_killed_producer_ends_every_remote_watcher_with_producer_lost(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b")
    async with a.connect() as producer:
        key = await start_run(producer, "r1", "a long one sim:rate=50 sim:tokens=5000")
        async with b.connect() as watcher, b.connect() as second:
            for ws in (watcher, second):
                await ws.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
                await frames_until(ws, lambda e: e["type"] == "token")
            a.process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            for ws in (watcher, second):
                frames = await frames_until(ws, terminal, limit=10)
                elapsed = time.monotonic() - killed
                last = json.loads(frames[-1])
                assert (last["type"], last["code"], last["retryable"]) == ("error", "producer_lost", True)
                assert elapsed < 5.0, f"producer_lost came {elapsed:.2f} s after the SIGKILL"
                assert [json.loads(f)["type"] for f in frames].count("error") == 1
        with pytest.raises(ConnectionClosed):  # its own client loses the connection (after what was in flight)
            async with asyncio.timeout(LIMIT):
                while True:
                    await producer.recv()


async def test_a_client_that_moves_keeps_its_run_past_the_grace_and_leaving_starts_it_again(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", resume_grace=1)
    sim = cluster.sim.simulator.stats
    async with a.connect() as ws:
        key = await start_run(ws, "r1", "slow sim:rate=25 sim:tokens=75")  # 3 s: longer than the grace
        head = await frames_until(ws, lambda e: e["type"] == "token")
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        tail = await frames_until(ws, terminal)
    assert json.loads(tail[-1])["type"] == "done"  # watched on b all along: never orphaned on a

    key, after = await begun(a, "r2", "slow sim:rate=20 sim:tokens=400")
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r2", "key": key, "after": after}))
        await frames_until(ws, lambda e: e["seq"] >= after + 3)
        left = time.monotonic()
    await sim.wait_for(lambda s: s.disconnected == 1, LIMIT)  # b's client left: a's grace ran out
    waited = time.monotonic() - left
    assert 0.9 < waited < 3.0, f"the run was cancelled {waited:.2f} s after its client left b (grace: 1 s)"
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "attach", "id": "r2", "key": key}))
        frames = await frames_until(ws, terminal)
    assert json.loads(frames[-1]) | {"seq": 0} == {"type": "cancelled", "id": "r2", "seq": 0,
                                                   "reason": "client did not return"}


async def test_redis_stops_and_restarts_empty_mid_stream(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", replay_bytes=100_000)
    async with a.connect() as local, b.connect() as remote:
        key = await start_run(local, "r1", "long sim:rate=40 sim:tokens=200")  # 5 s
        head = await frames_until(local, lambda e: e["type"] == "token")
        await remote.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(remote, lambda e: e["type"] == "token")

        cluster.redis.terminate()
        await cluster.redis.wait()
        watched = await frames_until(remote, lambda e: e["type"] == "error")
        gone = json.loads(watched[-1])
        assert (gone["code"], gone["retryable"], "seq" in gone) == ("cluster_unavailable", True, False)
        health = await redis_went(a, "down")
        assert (health["status"], health["cluster"]["redis"]) == ("degraded", "down")
        _, metrics = await a.http("/metrics")
        assert "wsagent_cluster_redis_up 0" in metrics and "wsagent_cluster_redis_failures_total 1" in metrics
        await remote.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        refused = json.loads(await remote.recv())
        assert (refused["code"], refused["retryable"]) == ("cluster_unavailable", True)

        port = cluster.redis_port
        _, cluster.redis = await cluster.stack.enter_async_context(redis_server(port))  # empty
        await redis_went(a, "up")
        assert (await redis_went(b, "down", "up"))["status"] == "ok"
        await remote.send(json.dumps({"type": "attach", "id": "r1", "key": key, "after": 0}))
        again = await frames_until(remote, terminal)
        own = await frames_until(local, terminal)
    assert json.loads(own[-1])["type"] == "done"  # producer and client on one node: untouched
    received = head + own
    assert [seq(f) for f in received] == list(range(2, seq(own[-1]) + 1))
    assert again == await whole_log(a, "r1", key)  # a wrote its log back to the new Redis
    assert received == again[1:]


async def test_what_an_empty_redis_lost_is_a_replay_gap(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", replay_bytes=500)
    async with a.connect() as local:
        key = await start_run(local, "r1", "long sim:rate=0 sim:tokens=300 sim:reasoning=0")
        own = await frames_until(local, terminal)
    assert json.loads(own[-1])["type"] == "done", own[-1]
    cluster.redis.terminate()
    await cluster.redis.wait()
    _, cluster.redis = await cluster.stack.enter_async_context(redis_server(cluster.redis_port))
    for node in (a, b):
        await redis_went(node, "down", "up")
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": 1}))
        refused = json.loads(await ws.recv())
        assert refused["code"] == "replay_gap", refused
        await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(own[-3])}))
        tail = await frames_until(ws, terminal)
    assert tail == own[-2:]  # what the producer still kept (its usage and done) it wrote back


@pytest.fixture
async def small_buffers(sim: SimulatorServer) -> AsyncIterator[Cluster]:
    """A cluster whose Redis cuts a subscriber off once 256 KiB wait for it (its default is 32 MiB)."""
    async with contextlib.AsyncExitStack() as stack:
        port, process = await stack.enter_async_context(
            redis_server(0, "--client-output-buffer-limit", "pubsub 256kb 64kb 1"))
        yield Cluster(stack, sim, port, process)


async def test_a_stopped_watcher_node_never_holds_the_producer_back(small_buffers: Cluster) -> None:
    cluster = small_buffers
    a, b = await cluster.start("a", "b")
    async with a.connect(max_size=None) as local, b.connect(max_size=None) as remote:
        # 48 MB: more than the kernel's socket buffers between Redis and b can hold (tcp_rmem's ceiling is often
        # 32 MiB), so Redis's own output buffer for b must pass its limit; 8 MB once fitted in them (CI).
        key = await start_run(local, "big", "bulk sim:rate=0 sim:tokens=24000 sim:pad=2000 sim:reasoning=0")
        await remote.send(json.dumps({"type": "attach", "id": "big", "key": key}))
        await frames_until(remote, lambda e: e["type"] == "start")
        b.process.send_signal(signal.SIGSTOP)  # a's run waits for its own client, which reads from here on
        try:
            began = time.monotonic()
            own = await frames_until(local, terminal, limit=60)
            took = time.monotonic() - began
            memory = await redis_fields(cluster.redis_port, "info", "memory")
            used = int(next(line for line in memory.splitlines() if line.startswith("used_memory:")).split(":")[1])
        finally:
            b.process.send_signal(signal.SIGCONT)
        assert json.loads(own[-1])["type"] == "done", own[-1]
        assert used < 32 * 1024 * 1024, f"Redis holds {used} bytes"  # not the stopped node's backlog
        watched = await frames_until(remote, lambda e: e["type"] in TERMINAL or e.get("code") == "lagging")
        last = json.loads(watched[-1])
        # b's subscription was cut while it slept; it subscribes again and refills from the history the
        # producer left (its last replay bytes): the watcher is told it lagged, or gets the rest, once.
        assert last["type"] == "done" or (last["type"], last["code"], last["retryable"]) == ("error", "lagging", True)
    _, body = await b.http("/healthz")
    assert json.loads(body)["cluster"]["redis"] == "up"
    _, metrics = await b.http("/metrics")
    resubscribes = re.search(r"^wsagent_cluster_resubscribes_total (\d+)$", metrics, re.M)
    cluster_lines = [line for line in metrics.splitlines() if line.startswith("wsagent_cluster")]
    assert resubscribes is not None and int(resubscribes[1]) >= 1, cluster_lines  # Redis cut b off, b came back
    print(f"8 MB relayed on a in {took:.2f} s while b was stopped")


async def closed_with(ws: ClientConnection, code: int) -> None:
    """The server closes ``ws`` with ``code`` (within LIMIT seconds)."""
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), LIMIT)
    assert ws.close_code == code


async def registered(ws: ClientConnection, client_id: str) -> None:
    """Once a message sent to ``client_id`` comes back, the cluster knows who holds it."""
    await ws.send(json.dumps({"type": "send", "to": client_id, "content": "me?"}))
    assert json.loads(await asyncio.wait_for(ws.recv(), LIMIT)) == {"type": "personal", "from": client_id,
                                                                    "content": "me?"}


async def test_broadcast_and_personal_messages_reach_every_node_once(cluster: Cluster) -> None:
    a, b, c = await cluster.start("a", "b", "c")
    async with a.connect("/ws/alice") as alice, b.connect("/ws/bob") as bob, c.connect("/ws/carol") as carol:
        for ws, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
            await registered(ws, name)
        await alice.send(json.dumps({"type": "broadcast", "content": "hi all"}))
        for ws in (alice, bob, carol):
            heard = json.loads(await asyncio.wait_for(ws.recv(), LIMIT))
            assert heard == {"type": "broadcast", "from": "alice", "content": "hi all"}
        await carol.send(json.dumps({"type": "send", "to": "alice", "content": "psst"}))
        assert json.loads(await asyncio.wait_for(alice.recv(), LIMIT)) == {"type": "personal", "from": "carol",
                                                                           "content": "psst"}
        await carol.send(json.dumps({"type": "send", "to": "nobody", "content": "?"}))
        assert json.loads(await asyncio.wait_for(carol.recv(), LIMIT))["code"] == "unknown_client"
        await bob.send(json.dumps({"type": "broadcast", "content": "once"}))  # each got the first one once:
        for ws in (alice, bob, carol):                                       # the next frame is this one
            assert json.loads(await asyncio.wait_for(ws.recv(), LIMIT))["content"] == "once"


async def test_a_client_id_taken_on_another_node_replaces_the_old_connection(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b")
    async with a.connect("/ws/dora") as old:
        await registered(old, "dora")
        async with b.connect("/ws/dora") as new:
            await closed_with(old, 4009)
            await registered(new, "dora")


async def test_with_the_reject_policy_a_client_id_held_elsewhere_is_refused(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", client_id_policy="reject")
    async with key_events(cluster.redis_port, "wsagent:client:erin") as events:
        async with a.connect("/ws/erin") as held:
            await registered(held, "erin")
            async with b.connect("/ws/erin") as refused:
                await closed_with(refused, 4009)
            await held.send(json.dumps({"type": "broadcast", "content": "mine"}))
            assert json.loads(await asyncio.wait_for(held.recv(), LIMIT))["content"] == "mine"
        async with asyncio.timeout(LIMIT):  # released once a has seen its holder close
            while await events.get() != "del":
                pass
    async with b.connect("/ws/erin") as later:
        await registered(later, "erin")


async def test_per_user_limits_hold_across_nodes(cluster: Cluster) -> None:
    a, b, c = await cluster.start("a", "b", "c", max_connections_per_user=2, max_runs_per_user=1)
    async with a.connect(user="frank") as first, b.connect(user="frank") as second:
        for ws in (first, second):  # counted once answered (a handshake's count comes after its upgrade)
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), LIMIT))["type"] == "pong"
        async with c.connect(user="frank") as third:
            await closed_with(third, 4029)
        await start_run(first, "one", "long sim:rate=20 sim:tokens=200")
        await second.send(run_request("two", "another"))
        refused = json.loads(await asyncio.wait_for(second.recv(), LIMIT))
        assert (refused["type"], refused["code"]) == ("error", "too_many_runs"), refused
        await first.send(json.dumps({"type": "cancel", "id": "one"}))
        await frames_until(first, terminal)
    async with c.connect(user="frank") as again:  # both closed: the count went down everywhere
        await start_run(again, "three", "short sim:tokens=3")
        assert json.loads((await frames_until(again, terminal))[-1])["type"] == "done"


@pytest.fixture
async def three_nodes(cluster: Cluster) -> list[Node]:
    return await cluster.start("a", "b", "c", resume_grace=5)


_examples = iter(range(1_000_000))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.integers(0, 2), hops=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 25), st.booleans()),
                                              min_size=1, max_size=6))
async def test_random_reconnects_across_nodes_receive_the_producers_log(
        three_nodes: list[Node], first: int, hops: list[tuple[int, int, bool]]) -> None:
    """A client drops (cleanly or not) after a few frames and resumes on any node, again and again:
    what it received, in order, is the producer's log, with one terminal event."""
    run_id = f"hop{next(_examples)}"
    producer = three_nodes[first]
    async with producer.connect() as ws:
        key = await start_run(ws, run_id, "hop sim:rate=300 sim:tokens=120")
        received = await frames_until(ws, lambda e: e["seq"] >= 3)
    for node_index, count, abrupt in hops:
        if terminal(json.loads(received[-1])):
            break
        ws = await three_nodes[node_index].connect()
        try:
            await ws.send(json.dumps({"type": "resume", "id": run_id, "key": key, "after": seq(received[-1])}))
            received += await frames_until(ws, at_most(count))
        finally:
            if abrupt:
                ws.transport.abort()
            await ws.close()
    if not terminal(json.loads(received[-1])):
        async with three_nodes[hops[-1][0]].connect() as ws:
            await ws.send(json.dumps({"type": "resume", "id": run_id, "key": key, "after": seq(received[-1])}))
            received += await frames_until(ws, terminal)
    reference = await whole_log(producer, run_id, key)
    assert received == reference[1:]
    assert sum(1 for frame in received if json.loads(frame)["type"] in TERMINAL) == 1


async def test_use_chat_resumes_its_answer_on_another_node(cluster: Cluster) -> None:
    """The AI SDK's own transport: a page reload lands on another node and reads the answer to its end."""
    a, b = await cluster.start("a", "b")
    (seen,) = await drive_at(f"{a.url}/ws/ai-sdk", {
        "kind": "resume", "chatId": "chat-moves-0123456789", "text": "move me sim:rate=100 sim:tokens=60",
        "after": 3, "resumeUrl": f"{b.url}/ws/ai-sdk"})
    before, after = seen["before"], seen["after"]
    assert after is not None and after["error"] is None
    assert cluster.sim.simulator.stats.streams == 1  # resumed, not asked again
    assert after["message"]["id"] == before["message"]["id"]  # the same message id on every node
    text = "".join(part["text"] for part in after["message"]["parts"] if part["type"] == "text")
    assert text.startswith("".join(part["text"] for part in before["message"]["parts"] if part["type"] == "text"))
    assert after["types"][:2] == ["start", "start-step"] and after["types"][-1] == "finish"


async def test_workers_given_one_node_id_are_nodes_of_their_own(cluster: Cluster) -> None:
    """``--workers 2 --node-id edge`` gave both workers the node id ``edge``: to the cluster one node, whose two
    processes each said ``hello`` as that node at start (ending each other's followed runs) and wrote their
    per-user counts over each other's. Each worker is a node of its own: ``edge-w1``, ``edge-w2``."""
    port = free_port()
    command = [sys.executable, "-m", "wsagent.serve", "--workers", "2", "--port", str(port), "--node-id", "edge",
               "--redis-url", f"redis://127.0.0.1:{cluster.redis_port}/0", "--upstream-url", cluster.sim.base_url]
    async with started(command, b"2 workers listening on", limit=30):
        nodes = (await redis_fields(cluster.redis_port, "zrange", "wsagent:nodes", "0", "-1")).split()
        assert sorted(nodes) == ["edge-w1", "edge-w2"], nodes


async def test_each_worker_process_is_a_node(cluster: Cluster) -> None:
    """``--workers 2`` with Redis: both processes join, so a resume works on whichever one the kernel picks."""
    port = free_port()
    command = [sys.executable, "-m", "wsagent.serve", "--workers", "2", "--port", str(port), "--resume-grace", "10",
               "--redis-url", f"redis://127.0.0.1:{cluster.redis_port}/0", "--upstream-url", cluster.sim.base_url]
    async with started(command, b"2 workers listening on", limit=30):
        nodes = (await redis_fields(cluster.redis_port, "zrange", "wsagent:nodes", "0", "-1")).split()
        assert len(nodes) == 2, nodes
        server = Node("workers", port, cluster.redis)
        async with server.connect() as ws:
            key = await start_run(ws, "w1", "hop sim:rate=40 sim:tokens=400")
            received = await frames_until(ws, lambda e: e["seq"] >= 3)
            workers = {ws.response.headers["X-Wsagent-Worker"]}
        for _ in range(40):  # each new connection lands on either worker: go on until both served a resume
            if len(workers) == 2 or terminal(json.loads(received[-1])):
                break
            async with server.connect() as ws:
                await ws.send(json.dumps({"type": "resume", "id": "w1", "key": key, "after": seq(received[-1])}))
                received += await frames_until(ws, at_most(2))
                workers.add(ws.response.headers["X-Wsagent-Worker"])
        assert len(workers) == 2  # (the header names the worker's pid)
        async with server.connect() as ws:
            if not terminal(json.loads(received[-1])):
                await ws.send(json.dumps({"type": "resume", "id": "w1", "key": key, "after": seq(received[-1])}))
                received += await frames_until(ws, terminal)
        assert [seq(f) for f in received] == list(range(2, seq(received[-1]) + 1))
        assert json.loads(received[-1])["type"] == "done"


class Holder:
    """A client id's holder as the broker sees one (a connection, in the server): it records an eviction."""

    def __init__(self) -> None:
        self.evicted = False
        self.frames: list[str] = []

    def put(self, frame: str) -> bool:
        self.frames.append(frame)
        return True

    def evict(self) -> None:
        self.evicted = True


async def test_a_node_back_from_a_cut_writes_no_stale_state_over_newer() -> None:
    """What a node writes back when Redis answers again is fenced: its log entries only above the
    stream's last (Redis refuses lower ids), a client id only if nobody took it meanwhile."""
    async with redis_server() as (port, _):
        url = f"redis://127.0.0.1:{port}/0"
        broker = await RedisBroker(url, "a").start()
        try:
            run = Run("r1", scope="user:u")
            await broker.add_run(run, 5)
            run.push(Start("m", run.key))
            run.push(Token("old"))
            run.wake()
            holder = Holder()
            assert await broker.claim_client("gina", holder, "replace")
            await broker.link.send([("PING",)])  # everything before it is written
            newer = [("XADD", f"wsagent:log:{run.key}", "9-0", "c", 0, "p", "newer"),
                     ("SET", "wsagent:client:gina", "b/1")]  # what others wrote while "a" was cut off
            await broker.link.send(newer)
            run.push(Token("stale"))  # seq 3, never written: the cut
            await broker.write_back()
            log = await stream_entries(broker.link.redis, f"wsagent:log:{run.key}")
            assert [(entry_id, fields["p"]) for entry_id, fields in log][-2:] == [("2-0", "old"), ("9-0", "newer")]
            assert holder.evicted and await broker.link.redis.get("wsagent:client:gina") == "b/1"
        finally:
            await broker.close()


async def test_a_workflow_watched_from_another_node(cluster: Cluster) -> None:
    """Attach on another node gets the workflow's snapshot first, as on its own node, and a cancel of one
    agent sent there stops that agent on the producing node."""
    a, b = await cluster.start("a", "b")
    async with a.connect() as ws, b.connect() as late:
        await ws.send(run_request("w", "Analyze sim:rate=100 sim:tokens=100", workflow="market-analysis"))
        key = json.loads(await ws.recv())["key"]
        while json.loads(await ws.recv())["type"] != "answer":
            pass
        await late.send(json.dumps({"type": "attach", "id": "w", "key": key}))
        snapshot = json.loads(await asyncio.wait_for(late.recv(), LIMIT))
        assert snapshot["type"] == "snapshot" and snapshot["workflow"] == "market-analysis"
        assert [agent["status"] for agent in snapshot["agents"]] == ["running"] * 3
        await late.send(json.dumps({"type": "cancel", "id": "w", "key": key, "agent": "technical-analyst"}))
        own = await frames_until(ws, terminal)
        watched = await frames_until(late, terminal)
    ends = {e["agent"]: e["outcome"] for e in map(json.loads, own) if e["type"] == "agent_end"}
    assert ends == {"market-researcher": "done", "financial-analyst": "done", "technical-analyst": "cancelled"}
    assert watched[-1] == own[-1] and json.loads(own[-1])["type"] == "done"
    assert [f for f in watched if json.loads(f)["type"] == "agent_end"] == \
        [f for f in own if json.loads(f)["type"] == "agent_end"]


async def test_use_chat_takes_its_next_turn_on_another_node(cluster: Cluster) -> None:
    """A chat's second message lands on another node: the first answer, produced elsewhere and finished,
    gives way to the new one (the chat's id is the same, its key is new)."""
    a, b = await cluster.start("a", "b")
    chat = "chat-turns-0123456789"
    first, second = await drive_at(
        f"{a.url}/ws/ai-sdk",
        {"kind": "send", "chatId": chat, "text": "one sim:tokens=5"},
        {"kind": "send", "chatId": chat, "text": "two sim:tokens=5", "url": f"{b.url}/ws/ai-sdk"})
    for turn in (first, second):
        assert turn["error"] is None and turn["types"][-1] == "finish", turn
    assert first["message"]["id"] != second["message"]["id"]


async def test_a_redis_that_stops_answering_is_noticed_and_nothing_hangs(cluster: Cluster) -> None:
    """Redis stopped (SIGSTOP: connections stay open, nothing answers), then running again."""
    a, b = await cluster.start("a", "b")
    async with a.connect() as local, b.connect() as remote:
        key = await start_run(local, "r1", "long sim:rate=40 sim:tokens=240")  # 6 s
        await frames_until(local, lambda e: e["type"] == "token")
        await remote.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(remote, lambda e: e["type"] == "token")
        cluster.redis.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            watched = await frames_until(remote, lambda e: e["type"] in TERMINAL or "code" in e)
            noticed = time.monotonic() - stopped
            gone = json.loads(watched[-1])
            assert (gone["code"], gone["retryable"]) == ("cluster_unavailable", True)
            assert noticed < 5.0, f"a stopped Redis was noticed after {noticed:.1f} s"
            own = await frames_until(local, terminal)  # the producer's own client: never held back
            assert json.loads(own[-1])["type"] == "done", own[-1]
        finally:
            cluster.redis.send_signal(signal.SIGCONT)
    for node in (a, b):
        await redis_went(node, "down", "up")
    async with b.connect() as again:
        await again.send(json.dumps({"type": "attach", "id": "r1", "key": key, "after": 0}))
        assert json.loads((await frames_until(again, terminal))[-1])["type"] == "done"


async def test_a_run_whose_client_was_on_a_node_that_died_is_orphaned(cluster: Cluster) -> None:
    """The client resumed on b, then b was killed: a notices at its next heartbeats, and the run's
    grace starts as if the client had left."""
    a, b = await cluster.start("a", "b", resume_grace=1)
    sim = cluster.sim.simulator.stats
    key, after = await begun(a, "r1", "slow sim:rate=20 sim:tokens=400")
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": after}))
        await frames_until(ws, lambda e: e["seq"] >= after + 2)
        b.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
    await sim.wait_for(lambda s: s.disconnected == 1, LIMIT)
    waited = time.monotonic() - killed
    assert 1.0 < waited < 6.0, f"the run was cancelled {waited:.2f} s after its client's node died"
    async with a.connect() as ws:
        await ws.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        last = json.loads((await frames_until(ws, terminal))[-1])
    assert (last["type"], last["reason"]) == ("cancelled", "client did not return")


async def test_the_hot_path_connection_logs_in_and_selects_its_database() -> None:
    async with redis_server(0, "--requirepass", "s3cret") as (port, _):
        with pytest.raises(ConnectionError, match="Redis refused"):
            await Wire.open(f"redis://:wrong@127.0.0.1:{port}/0")
        wire = await Wire.open(f"redis://:s3cret@127.0.0.1:{port}/2")
        try:
            stored, info = await wire.send([("SET", "k", "v"), ("CLIENT", "INFO")])
            assert stored == "OK" and " db=2 " in info
        finally:
            wire.close()


async def test_a_command_that_cannot_be_encoded_fails_alone() -> None:
    """A lone surrogate cannot be sent to Redis (it is not UTF-8): that command fails by itself, before
    anything is written; the batch's other commands, and every later one, get their own replies."""
    async with redis_server() as (port, _):
        wire = await Wire.open(f"redis://127.0.0.1:{port}/0")
        try:
            replies = await wire.send([("SET", "a", "1"), ("SET", "wsagent:id:\ud800", "x"), ("GET", "a")])
            assert replies[0] == "OK" and replies[2] == "1"
            assert isinstance(replies[1], hiredis.ReplyError) and "encode" in str(replies[1])
            assert wire.write([("SET", "b", "\udfff"), ("SET", "b", "2")]) >= 0  # replies dropped
            assert wire.write([("SET", "\ud800",)]) >= 0  # nothing of it can be sent
            assert await wire.send([("GET", "b"), ("PING",)]) == ["2", "PONG"]
            (alone,) = await wire.send([("GET", "\ud800")])
            assert isinstance(alone, hiredis.ReplyError)
            assert await wire.send([("GET", "a")]) == ["1"]
        finally:
            wire.close()


async def test_an_entry_redis_cannot_take_fails_alone_in_its_batch() -> None:
    """A run whose id holds a lone surrogate (not UTF-8: no Redis command can carry it) shares a flush with
    another user's run: only its entry that holds the id is not written; the batch's others are, and every
    later request still gets its own reply (once, a run's registration read another's and was refused as
    "already in use", and the whole batch was dropped)."""
    async with redis_server() as (port, _):
        broker = await RedisBroker(f"redis://127.0.0.1:{port}/0", "a").start()
        try:
            bad, good = Run("\ud800", scope="conn:1"), Run("g1", scope="user:u")
            for run in (bad, good):
                await broker.add_run(run, 5)
                run.push(Start("m", run.key))
                run.push(Token("x"))
                run.wake()
            broker.replication.flush()  # (its timer's turn, now): both runs' entries in one write
            await broker.link.send([("PING",)])  # everything before it is written
            good_log = await stream_entries(broker.link.redis, f"wsagent:log:{good.key}")
            assert [fields["p"] for _, fields in good_log][1:] == ["x"]
            assert [entry for entry, _ in await stream_entries(broker.link.redis, f"wsagent:log:{bad.key}")] == ["2-0"]
            later = [Run(f"r{n}", scope="user:u") for n in range(10)]
            for run in later:
                await broker.add_run(run, 5)  # its SET NX's own reply: not in use
            assert await broker.link.redis.get(_name("id", "user:u", "r9")) == later[-1].key
        finally:
            await broker.close()


async def test_a_user_whose_name_ends_anothers_cannot_reach_their_runs(cluster: Cluster) -> None:
    """``acme`` naming run ``alice:r1`` must not find user ``acme:alice``'s run ``r1`` (in Redis both
    once read ``wsagent:id:user:acme:alice:r1``): not to attach, resume or cancel it, nor to learn its
    key; ``acme:alice`` herself reaches it by its id alone, on either node."""
    a, b = await cluster.start("a", "b")
    async with a.connect(user="acme:alice") as alice:
        key = await start_run(alice, "r1", "mine sim:rate=50 sim:tokens=100")
        await frames_until(alice, lambda e: e["type"] == "token")
        for node in (b, a):
            async with node.connect(user="acme") as acme:
                for kind in ("attach", "resume", "cancel"):
                    for named in ({"id": "alice:r1"}, {"id": "r1", "key": key}, {"id": "alice:r1", "key": key}):
                        await acme.send(json.dumps({"type": kind, "after": 1, **named}))
                        refusal = await asyncio.wait_for(acme.recv(), LIMIT)
                        assert isinstance(refusal, str) and key not in refusal
                        assert json.loads(refusal)["code"] == "unknown_run", refusal
                await acme.send(json.dumps({"type": "ping"}))  # nothing else came: the pong is next
                assert json.loads(await asyncio.wait_for(acme.recv(), LIMIT))["type"] == "pong"
        for node in (b, a):
            async with node.connect(user="acme:alice") as elsewhere:
                await elsewhere.send(json.dumps({"type": "attach", "id": "r1", "after": 0}))
                watched = await frames_until(elsewhere, lambda e: e["type"] == "token")
                assert json.loads(watched[0])["key"] == key
        async with b.connect(user="acme:alice") as elsewhere:
            await elsewhere.send(json.dumps({"type": "cancel", "id": "r1"}))
            last = json.loads((await frames_until(alice, terminal))[-1])
        assert (last["type"], last["reason"]) == ("cancelled", "cancelled by client")


def _unescaped(name: str) -> list[str]:
    """The components of one of the cluster's key or channel names, as they were before escaping."""
    parts = name.split(":")
    assert parts[0] == "wsagent"
    decoded = []
    for part in parts[1:]:
        pieces = part.split("%")
        text = pieces[0]
        for piece in pieces[1:]:
            if piece[:1] == "u":
                text += chr(int(piece[1:5], 16)) + piece[5:]
            else:
                text += chr(int(piece[:2], 16)) + piece[2:]
        decoded.append(text)
    return decoded


_component = st.text(st.sampled_from("a:%u3A5\ud800\udfff-é"), max_size=6) | st.text(max_size=8)


@given(st.lists(_component, min_size=1, max_size=4), st.lists(_component, min_size=1, max_size=4))
def test_distinct_components_never_name_the_same_key(one: list[str], other: list[str]) -> None:
    """Every component of a key is escaped: two distinct (scope, id) pairs (or any lists of components)
    never meet, each name reads back as its components, and every name can be sent to Redis."""
    assert _unescaped(_name(*one)) == one
    if one != other:
        assert _name(*one) != _name(*other)
    _name(*one).encode()  # UTF-8, whatever its components hold
    assert _name("id", "user:acme", "alice:r1") != _name("id", "user:acme:alice", "r1")


async def test_a_redis_url_that_names_its_database_in_the_query_is_followed(cluster: Cluster) -> None:
    """``redis://host/0?db=3`` is database 3 for redis-py: both of a node's connections use database 3."""
    url = f"redis://127.0.0.1:{cluster.redis_port}/0?db=3"
    a, b = await cluster.start("a", "b", redis_url=url)
    async with a.connect() as ws:
        key = await start_run(ws, "r1", "counted sim:tokens=5")
        own = await frames_until(ws, terminal)
    attached = await whole_log(b, "r1", key)
    assert attached[1:] == own
    db3 = Redis.from_url(url, decode_responses=True)
    db0 = Redis.from_url(f"redis://127.0.0.1:{cluster.redis_port}/0", decode_responses=True)
    try:
        assert len(await stream_entries(db3, f"wsagent:log:{key}")) == len(own) + 1  # written on the hand-spoken one
        assert set(await db3.zrange("wsagent:nodes", 0, -1)) == {"a", "b"}  # ... and on redis-py's
        assert await db0.dbsize() == 0
    finally:
        await db3.aclose()
        await db0.aclose()


async def test_nodes_reach_redis_through_a_unix_socket(sim: SimulatorServer, tmp_path: Any) -> None:
    socket_path = tmp_path / "redis.sock"
    async with contextlib.AsyncExitStack() as stack:
        process = await stack.enter_async_context(started(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700", "--save", "",
             "--appendonly", "no"], b"ready to accept connections at", limit=20))
        cluster = Cluster(stack, sim, 0, process)
        a, b = await cluster.start("a", "b", redis_url=f"unix://{socket_path}")
        async with a.connect() as ws:
            key = await start_run(ws, "r1", "through a socket sim:rate=200 sim:tokens=60")
            head = await frames_until(ws, lambda e: e.get("seq", 0) >= 5)
        async with b.connect() as ws:
            await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
            tail = await frames_until(ws, terminal)
        assert json.loads(tail[-1])["type"] == "done"
        assert head + tail == (await whole_log(a, "r1", key))[1:]


def test_both_connections_read_a_redis_url_alike() -> None:
    """The hand-spoken connection reads a URL with redis-py's own parser; what it could not do as
    redis-py does is refused, in one line that never shows the password."""
    assert Address.parse("redis://h/0?db=3") == Address(host="h", db=3)
    assert Address.parse("redis://u:p%40ss@h:7000/2") == Address(host="h", port=7000, db=2, username="u",
                                                                 password="p@ss")
    assert Address.parse("unix:///run/redis.sock?db=1") == Address(path="/run/redis.sock", db=1)
    tls = Address.parse("rediss://h?ssl_cert_reqs=none").tls
    assert tls is not None and tls.verify_mode == ssl.CERT_NONE and not tls.check_hostname
    tls = Address.parse("rediss://h").tls
    assert tls is not None and tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
    for url, says in [("redis://:s3cret@h/0?protocol=3", "protocol cannot be honoured"),
                      ("redis://:s3cret@h?ssl_cert_reqs=none", "rediss:// URLs only"),
                      ("http://:s3cret@h", "schemes"), ("unix://", "socket's path")]:
        with pytest.raises(ValueError, match=says) as refused:
            Address.parse(url)
        assert "s3cret" not in str(refused.value) and "\n" not in str(refused.value)


async def test_a_node_refuses_a_redis_url_it_cannot_follow_in_one_line() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsagent.serve", "--port", "0", "--redis-url", "redis://:s3cret@127.0.0.1:1/0?protocol=3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), LIMIT)
    said = out.decode()
    assert process.returncode == 1, said
    assert said.splitlines()[-1] == ("--redis-url redis://:***@127.0.0.1:1/0?protocol=3: protocol cannot be "
                                     "honoured by wsagent's own connection to Redis (a Redis URL may give the "
                                     "database, as /0 or ?db=0, and with rediss:// ssl_cert_reqs, ssl_ca_certs, "
                                     "ssl_certfile, ssl_keyfile, ssl_check_hostname)"), said
    assert "Traceback" not in said and "s3cret" not in said


async def test_both_connections_speak_tls_to_a_rediss_url(tmp_path: Any) -> None:
    """``rediss://`` with the server's certificate as ``ssl_ca_certs``: a node's two connections (redis-py's
    and the hand-spoken one) both go through TLS, to the database the URL names."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    assert await made.wait() == 0
    port = free_port()
    async with started([REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "no",
                        "--save", "", "--appendonly", "no"], b"eady to accept connections", limit=20):
        url = f"rediss://127.0.0.1:{port}/4?ssl_ca_certs={cert}"
        with pytest.raises(OSError):  # (a server whose certificate is not trusted is refused)
            await Wire.open(f"rediss://127.0.0.1:{port}/4")
        broker = await RedisBroker(url, "t").start()
        try:
            assert broker.link.state.value == "up"
            run = Run("r1", scope="user:u")
            await broker.add_run(run, 5)
            run.push(Start("m", run.key))
            run.wake()
            await broker.link.send([("PING",)])  # everything before it is written
            (info,) = await broker.link.send([("CLIENT", "INFO")])
            assert " db=4 " in info
            assert len(await stream_entries(broker.link.redis, f"wsagent:log:{run.key}")) == 1
            assert await broker.link.redis.zrange("wsagent:nodes", 0, -1) == ["t"]
        finally:
            await broker.close()


async def test_use_chat_turns_go_back_and_forth_between_nodes(cluster: Cluster) -> None:
    """A chat's turns land on a, b, then a again, and a reload lands on b: each node forgets the turn
    another node replaced (the producer of the old one is told), so none refuses the chat's id."""
    a, b = await cluster.start("a", "b")
    chat = "chat-back-and-forth-01"
    *turns, reload = await drive_at(
        f"{a.url}/ws/ai-sdk",
        {"kind": "send", "chatId": chat, "text": "one sim:tokens=5"},
        {"kind": "send", "chatId": chat, "text": "two sim:tokens=5", "url": f"{b.url}/ws/ai-sdk"},
        {"kind": "send", "chatId": chat, "text": "three sim:tokens=5"},
        {"kind": "resume", "chatId": chat, "text": "four sim:rate=100 sim:tokens=50", "after": 2,
         "resumeUrl": f"{b.url}/ws/ai-sdk"})
    for turn in turns:
        assert turn["error"] is None and turn["types"][-1] == "finish", turn
    assert len({turn["message"]["id"] for turn in turns}) == 3
    after = reload["after"]
    assert after is not None and after["error"] is None and after["types"][-1] == "finish", reload
    assert after["message"]["id"] == reload["before"]["message"]["id"]


async def test_a_run_id_redis_refuses_to_register_is_not_taken_for_registered() -> None:
    """Redis answers the id's registration with an error (here: out of memory): the run does not start
    as if other nodes could find it; the client is told to try again."""
    async with redis_server() as (port, _):
        broker = await RedisBroker(f"redis://127.0.0.1:{port}/0", "a").start()
        try:
            assert broker.link.state.value == "up"
            await broker.link.redis.config_set("maxmemory", 1)  # (noeviction: writes are refused)
            with pytest.raises(ClusterUnavailable, match="OOM"):
                await broker.add_run(Run("r1", scope="user:u"), 5)
            assert not list(broker.local)
        finally:
            await broker.close()


async def test_an_approval_asked_on_one_node_is_answered_on_another(cluster: Cluster) -> None:
    """The client leaves node a while the agent waits for its approval, resumes on node b (the pending request
    is replayed), answers there, and the run goes on on a; a second answer, from a third socket on b with the
    key, is refused as already answered; a steering message from b reaches the agent on a."""
    a, b = await cluster.start("a", "b", approval_tools="calculator")
    async with a.connect() as ws:
        key = await start_run(ws, "p1", "What is (2 + 3) * 7?", agent="assistant")
        head = await frames_until(ws, lambda e: e["type"] == "approval_request")
    request = json.loads(head[-1])
    async with b.connect() as ws, b.connect() as other:
        await ws.send(json.dumps({"type": "resume", "id": "p1", "key": key, "after": 1}))
        replayed = await frames_until(ws, lambda e: e["type"] == "approval_request")
        assert replayed == head  # byte for byte, through the cluster's copy
        await ws.send(json.dumps({"type": "steer", "id": "p1", "key": key, "content": "and in words"}))
        await ws.send(json.dumps({"type": "approve", "id": "p1", "key": key, "call_id": request["call_id"],
                                  "approved": True}))
        tail = await frames_until(ws, terminal)
        await other.send(json.dumps({"type": "approve", "id": "p1", "key": key, "call_id": request["call_id"],
                                     "approved": False}))
        again = json.loads(await asyncio.wait_for(other.recv(), LIMIT))
    events = [json.loads(f) for f in tail]
    kinds = [e["type"] for e in events]
    assert kinds.index("approval") < kinds.index("observation") < kinds.index("done") == len(kinds) - 1
    assert next(e for e in events if e["type"] == "observation")["content"] == "(2 + 3) * 7 = 35"
    assert next(e for e in events if e["type"] == "steer") | {"seq": 0} == {
        "type": "steer", "id": "p1", "seq": 0, "agent": "assistant", "content": "and in words", "delivered": True}
    assert again["type"] == "error" and again["code"] in ("already_answered", "run_ended"), again
    reference = await whole_log(a, "p1", key)
    assert head + tail == reference[1:]  # the producer's log, verbatim, across both nodes


async def test_an_ai_sdk_approval_is_answered_on_another_node(cluster: Cluster) -> None:
    """A chat's response stops at its approval request on node a; the page, reloaded onto node b, gets the request
    again, and its answer (the next send) continues the same message there, from the run node a produces."""
    a, b = await cluster.start("a", "b", approval_tools="calculator")
    question = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "What is (2 + 3) * 7?"}]}
    chat = "chat-approval-0123456789"

    async def request(node: Node, frame: dict[str, Any]) -> list[dict[str, Any]]:
        async with node.connect("/ws/ai-sdk") as ws:
            await ws.send(json.dumps(frame))
            chunks: list[dict[str, Any]] = []
            async with asyncio.timeout(LIMIT):
                while (got := json.loads(await ws.recv()))["type"] != "end":
                    if got["type"] == "chunk":
                        chunks.append(got["chunk"])
            return chunks

    asked = await request(a, {"type": "send", "requestId": "q1", "id": chat, "trigger": "submit-message",
                              "messages": [question], "body": {"agent": "assistant"}})
    assert [c["type"] for c in asked][-3:] == ["tool-approval-request", "finish-step", "finish"]
    replayed = await request(b, {"type": "resume", "requestId": "q2", "id": chat})
    assert replayed == asked  # the reload, on the other node, stops at the same request
    call = next(c for c in asked if c["type"] == "tool-approval-request")
    answer = {"id": asked[0]["messageId"], "role": "assistant", "parts": [
        {"type": "dynamic-tool", "toolName": "calculator", "toolCallId": call["toolCallId"],
         "state": "approval-responded", "input": {"expression": "(2 + 3) * 7"},
         "approval": {"id": call["approvalId"], "approved": True}}]}
    continued = await request(b, {"type": "send", "requestId": "q3", "id": chat, "trigger": "submit-message",
                                  "messageId": asked[0]["messageId"], "messages": [question, answer],
                                  "body": {"agent": "assistant"}})
    assert continued[0] == asked[0] and continued[1]["type"] == "tool-approval-response"
    output = next(c for c in continued if c["type"] == "tool-output-available")
    assert output["output"] == "(2 + 3) * 7 = 35" and continued[-1]["type"] == "finish"


async def test_a_watcher_on_another_node_that_answers_takes_the_run_over(cluster: Cluster) -> None:
    """The owner left node a while the run waited (--resume-grace 0, the default); a socket on node b attached
    with the key and approved: it is the run's own client now, and the run goes on to its end."""
    a, b = await cluster.start("a", "b", approval_tools="calculator", resume_grace=None)
    async with a.connect() as ws:
        key = await start_run(ws, "w1", "What is (2 + 3) * 7?", agent="assistant")
        request = json.loads((await frames_until(ws, lambda e: e["type"] == "approval_request"))[-1])
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "attach", "id": "w1", "key": key}))
        await frames_until(ws, lambda e: e["type"] == "approval_request")
        await ws.send(json.dumps({"type": "approve", "id": "w1", "key": key, "call_id": request["call_id"],
                                  "approved": True}))
        tail = [json.loads(f) for f in await frames_until(ws, terminal)]
    kinds = [e["type"] for e in tail]
    assert kinds.index("approval") < kinds.index("observation") and kinds[-1] == "done", kinds
