"""Cluster mode as docs/scaling-out.md starts it: two nodes, one Redis, every other setting left to its
default (no ``--resume-grace``: a run is cancelled when its client leaves, and forgotten once it ends).

Every run ends with exactly one terminal event for every watcher on every node, and what a watcher on
another node gets is the producer's frames, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from wsagent.core.errors import ProtocolViolation
from wsagent.core.events import Start, Token
from wsagent.engine.cluster import Mirror, RedisBroker
from wsagent.engine.run import Run

from .helpers import (
    TERMINAL,
    Cluster,
    Sink,
    drive_at,
    frames_until,
    redis_server,
    run_request,
    seq,
    start_run,
    stream_entries,
    terminal,
)

DEFAULTS = {"resume_grace": None}  # left out of the command line: the docs' two nodes


def terminals(frames: list[str]) -> int:
    return sum(1 for frame in frames if json.loads(frame)["type"] in TERMINAL)


async def test_attach_on_another_node_gets_the_end_of_the_run(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", **DEFAULTS)
    for n in range(3):  # (it failed three times out of three)
        run_id = f"r{n}"
        async with a.connect() as producer:
            await producer.send(run_request(run_id, "hello sim:rate=200 sim:tokens=60"))
            own = [await producer.recv()]
            assert isinstance(own[0], str)
            own += await frames_until(producer, lambda e: e.get("seq", 0) >= 5)
            key = json.loads(own[0])["key"]
            async with b.connect() as watcher:
                await watcher.send(json.dumps({"type": "attach", "id": run_id, "key": key}))
                own += await frames_until(producer, terminal)
                watched = await frames_until(watcher, terminal)
        assert json.loads(own[-1])["type"] == "done"
        assert terminals(watched) == 1
        assert watched == own  # from its start event: the run is short enough to be kept whole


async def test_resume_on_another_node_after_the_run_ended(cluster: Cluster) -> None:
    """The client read the run to its end on a, but only its first frames reached the page (the socket
    dropped on the way): it resumes on b, after the run ended and a forgot it."""
    a, b = await cluster.start("a", "b", **DEFAULTS)
    for n in range(3):
        run_id = f"r{n}"
        async with a.connect() as producer:
            key = await start_run(producer, run_id, "hello sim:rate=1000 sim:tokens=80")
            own = await frames_until(producer, terminal)
        assert len(own) >= 4
        head = own[:len(own) // 2]
        async with b.connect() as ws:
            await ws.send(json.dumps({"type": "resume", "id": run_id, "key": key, "after": seq(head[-1])}))
            tail = await frames_until(ws, terminal)
        assert terminals(tail) == 1
        assert head + tail == own


async def test_use_chat_resumes_on_another_node_after_the_answer_ended(cluster: Cluster) -> None:
    """The AI SDK's transport: the page reloads onto b once the answer has ended on a."""
    a, b = await cluster.start("a", "b", **DEFAULTS)
    (seen,) = await drive_at(f"{a.url}/ws/ai-sdk", {
        "kind": "resume", "chatId": "chat-ended-0123456789", "text": "end me sim:rate=0 sim:tokens=60",
        "after": 2, "resumeUrl": f"{b.url}/ws/ai-sdk"})
    before, after = seen["before"], seen["after"]
    assert after is not None and after["error"] is None
    assert cluster.sim.simulator.stats.streams == 1
    assert after["message"]["id"] == before["message"]["id"]
    assert after["types"][:2] == ["start", "start-step"] and after["types"][-1] == "finish"
    assert after["types"].count("finish") == 1


async def test_a_workflow_attached_on_another_node_ends_there(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", **DEFAULTS)
    async with a.connect() as ws, b.connect() as late:
        await ws.send(run_request("w", "Analyze sim:rate=200 sim:tokens=40", workflow="market-analysis"))
        first = await ws.recv()
        assert isinstance(first, str)
        key = json.loads(first)["key"]
        own = [first, *await frames_until(ws, lambda e: e["type"] == "answer")]
        await late.send(json.dumps({"type": "attach", "id": "w", "key": key, "after": 0}))
        own += await frames_until(ws, terminal)
        watched = await frames_until(late, terminal)
    assert json.loads(own[-1])["type"] == "done"
    assert terminals(watched) == 1
    assert watched == own


async def test_an_ended_runs_id_is_free_again_on_every_node(cluster: Cluster) -> None:
    """With no grace a run is forgotten once it ends: its id may start a new run at once, on its own
    node as alone, and on another."""
    a, b = await cluster.start("a", "b", **DEFAULTS)
    for node in (a, a, b, a):
        async with node.connect(user="ivy") as ws:
            await start_run(ws, "again", "short sim:tokens=3")
            assert json.loads((await frames_until(ws, terminal))[-1])["type"] == "done"


async def test_a_run_that_expired_since_it_was_found_is_unknown() -> None:
    """Found on another node a moment before its hash and stream expired (it ended a while ago): the
    follower reads nothing, and says so at once (``unknown_run``) rather than wait for an end that
    will never come."""
    async with redis_server() as (port, _):
        broker = await RedisBroker(f"redis://127.0.0.1:{port}/0", "b").start()
        try:
            key = "k" * 22
            meta = {"id": "r1", "user": None, "scope": "user:u", "node": "b2", "agent": None, "workflow": None,
                    "grace": 0, "buffer": 65536, "replay": 262144}
            await broker.link.redis.hset(f"wsagent:run:{key}", mapping={"meta": json.dumps(meta),
                                                                   "origins": "[[null, null]]"})
            await broker.link.redis.zadd("wsagent:nodes", {"b2": time.time() * 1000})  # its producer is alive
            found = await broker.run_by_key(key)
            assert isinstance(found, Mirror)
            await broker.link.redis.delete(f"wsagent:run:{key}")  # expired
            with pytest.raises(ProtocolViolation) as refused:
                await broker.follow(found, 0)
            assert refused.value.code == "unknown_run"
            assert not broker.following.mirrors
        finally:
            await broker.close()


async def test_every_key_of_the_cluster_expires(cluster: Cluster) -> None:
    """Found by tests/test_cluster_model.py: the heartbeats' sorted set (``wsagent:nodes``) had no TTL, so a
    Redis whose nodes all died (SIGKILL: none leaves) kept it, and their beats, for ever. Every key of ours
    expires."""
    await cluster.start("a", "b", **DEFAULTS)
    redis = Redis(port=cluster.redis_port, decode_responses=True)
    try:
        keys = [key async for key in redis.scan_iter("wsagent:*")]
        assert "wsagent:nodes" in keys
        assert {key: await redis.ttl(key) for key in keys if await redis.ttl(key) == -1} == {}
    finally:
        await redis.aclose()


async def test_a_producer_restarted_under_its_node_id_is_not_taken_for_the_dead_one(cluster: Cluster) -> None:
    """Found by tests/test_cluster_model.py: node a is killed and started again at once under the same
    ``--node-id`` (as systemd does with a fixed ``WSAGENT_NODE_ID``). The new a beats before anyone took the old
    one for dead, so a watcher on b of the old a's run, and a resume there afterwards, waited for ever for
    entries nobody would write. Both get ``producer_lost`` (the new a tells the others it is a new process); the
    new a itself answers ``unknown_run``: it never had the run."""
    a, b = await cluster.start("a", "b", **DEFAULTS)
    async with a.connect() as producer, b.connect() as watcher:
        key = await start_run(producer, "r1", "a long one sim:rate=50 sim:tokens=5000")
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        seen = await frames_until(watcher, lambda e: e.get("seq", 0) >= 3)
        a.process.send_signal(signal.SIGKILL)
        await a.process.wait()
        again = await cluster.node("a", **DEFAULTS)  # the same node id, within the 3 s a dead node is given
        last = json.loads((await frames_until(watcher, lambda e: "seq" not in e))[-1])
        assert (last["type"], last["code"]) == ("error", "producer_lost"), last
    for node, code in ((b, "producer_lost"), (again, "unknown_run")):  # (the new a never had it)
        async with node.connect() as ws:
            await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(seen[-1])}))
            frames = await frames_until(ws, lambda e: "seq" not in e or e["type"] in TERMINAL)
            last = json.loads(frames[-1])
            assert (last["type"], last.get("code")) == ("error", code), last


async def test_a_follower_reads_a_stream_with_holes_as_it_is(cluster: Cluster) -> None:
    """Found by tests/test_cluster_model.py: with a small ``--replay-bytes`` the producer trims events from its
    log before its next write to Redis, so the stream has holes (``1-0`` ... ``4-0``, then ``19-0``). A node that
    followed the run read the entries as if they were contiguous: seq 19's frame came as seq 5, and a resume
    after a seq the client had seen got ``bad_resume``. What another node serves is the producer's frames, with
    their own seqs, or a ``replay_gap``."""
    a, b = await cluster.start("a", "b", resume_grace=5, replay_bytes=300)
    async with a.connect() as producer:
        key = await start_run(producer, "r1", "Analyze sim:rate=0 sim:tokens=20", workflow="market-analysis")
        own = await frames_until(producer, terminal)
    redis = Redis(port=cluster.redis_port, decode_responses=True)
    try:
        ids = [int(entry_id.split("-")[0]) for entry_id, _ in await stream_entries(redis, f"wsagent:log:{key}")]
    finally:
        await redis.aclose()
    assert ids != list(range(ids[0], ids[0] + len(ids))), f"no hole in the stream this time: {ids}"
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "attach", "id": "r1", "key": key}))  # from the oldest event kept
        watched = await frames_until(ws, terminal)
        await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(own[-3])}))
        tail = await frames_until(ws, lambda e: e["type"] in TERMINAL or "seq" not in e)
    assert json.loads(watched[0])["type"] == "snapshot"  # (a workflow's, first)
    assert watched[1:] == own[-len(watched[1:]):], "not the producer's frames"
    assert tail == own[-2:]


async def test_a_resume_of_a_run_whose_producer_died_is_told_producer_lost(cluster: Cluster) -> None:
    """Found by tests/test_cluster_model.py: the producer wrote seq 2 to its client and was killed before its next
    write to Redis (at most 10 ms later); the client resumed on b after seq 2 and was told ``bad_resume`` ("there is
    no seq 2", not retryable). A resume or attach of an unfinished run whose producer is gone gets
    ``producer_lost`` (retryable: start it again) as its final answer, whatever ``after`` it names (here the seq
    after the last one the client read stands in for one that never reached Redis), once what did is replayed."""
    a, b = await cluster.start("a", "b", **DEFAULTS)
    async with a.connect() as producer:
        key = await start_run(producer, "r1", "a long one sim:rate=50 sim:tokens=5000")
        seen = await frames_until(producer, lambda e: e.get("seq", 0) >= 5)
        a.process.send_signal(signal.SIGKILL)
        await a.process.wait()
    requests: list[dict[str, Any]] = [{"type": "resume", "after": seq(seen[-1]) + 1}, {"type": "resume", "after": 0},
                                      {"type": "attach"}]
    for request in requests:
        async with b.connect() as ws:  # what reached Redis (nothing, past it), then producer_lost
            await ws.send(json.dumps({**request, "id": "r1", "key": key}))
            frames = [json.loads(f) for f in await frames_until(ws, lambda e: "seq" not in e or terminal(e))]
            assert [e["seq"] for e in frames[:-1]] == list(range(request.get("after", 0) + 1, len(frames)))
            assert (frames[-1]["type"], frames[-1].get("code"), frames[-1].get("retryable")) == \
                ("error", "producer_lost", True), (request, frames[-1])


async def test_a_chat_reloaded_on_another_node_is_told_in_its_own_protocol_that_its_producer_died(
        cluster: Cluster) -> None:
    """Found by tests/test_cluster_model.py: a page reloaded onto b (``/ws/ai-sdk`` ``resume``) follows a chat
    answered on a; a dies. b sent a ``/ws/chat`` frame (``{"type": "error", "id": ..., "code":
    "producer_lost"}``) that names no request, and no ``end``: useChat waited for ever. The failure is rendered
    for the socket's protocol: an ``error`` chunk of that request, then its ``end``."""
    a, b = await cluster.start("a", "b", **DEFAULTS)
    chat = "chat-dies-0123456789"
    message = {"id": "m1", "role": "user", "parts": [{"type": "text", "text": "long sim:rate=50 sim:tokens=5000"}]}
    async with a.connect("/ws/ai-sdk") as page:
        await page.send(json.dumps({"type": "send", "requestId": "q1", "id": chat, "trigger": "submit-message",
                                    "messages": [message]}))
        await frames_until(page, lambda e: e["type"] == "chunk" and e["chunk"]["type"] == "reasoning-delta")
        async with b.connect("/ws/ai-sdk") as reloaded:
            await reloaded.send(json.dumps({"type": "resume", "requestId": "q2", "id": chat}))
            await frames_until(reloaded, lambda e: e["type"] == "chunk" and e["chunk"]["type"] == "reasoning-delta")
            a.process.send_signal(signal.SIGKILL)
            frames = [json.loads(f) for f in await frames_until(reloaded, lambda e: e["type"] in ("end", "error"))]
    assert all(frame.get("requestId") == "q2" for frame in frames), frames[-1]
    assert frames[-1] == {"type": "end", "requestId": "q2"}
    assert frames[-2]["chunk"]["type"] == "error" and "stopped answering" in frames[-2]["chunk"]["errorText"]


async def test_a_runs_stream_expires_from_its_first_write() -> None:
    """Found by tests/test_cluster_model.py (its long profile): a run's stream was given its TTL only by a write
    that began at seq 1. With a small ``--replay-bytes`` the run's own client can take, and the run forget, its
    first events before the node's first write of them (the node writes every 10 ms when busy): that write began
    further on, and the stream had no TTL until the next refresh (10 s) or the run's end; a node that died
    meanwhile left it in Redis for ever. A stream expires from its first write."""
    async with redis_server() as (port, _):
        broker = await RedisBroker(f"redis://127.0.0.1:{port}/0", "a").start()
        try:
            run = Run("r1", scope="user:u", replay_bytes=10)
            await broker.add_run(run, 0)
            broker.replication.flush()  # (its registration's turn: nothing in its log yet)
            run.subscribe(Sink(), 0, primary=True)  # its own client, taking each event at once
            run.push(Start("m", run.key))
            run.push(Token("x" * 50))
            run.wake()
            assert run.oldest_kept > 1  # taken, and forgotten past --replay-bytes
            run.push(Token("y"))
            run.wake()
            broker.replication.flush()
            await broker.link.send([("PING",)])  # everything before it is written
            entries = await broker.link.redis.xrange(f"wsagent:log:{run.key}")
            assert entries and entries[0][0] != "1-0"
            assert await broker.link.redis.ttl(f"wsagent:log:{run.key}") > 0
        finally:
            await broker.close()


async def test_a_run_refused_its_id_on_this_node_leaves_nothing_in_redis() -> None:
    """Two runs of one anonymous socket under one id, registered at once: the scope is the socket's, so Redis does
    not check the id, and the second is refused by the node only after its registration was written. Its hash and
    stream are deleted at once, and the node keeps nothing of it (it kept the run for ever)."""
    async with redis_server() as (port, _):
        broker = await RedisBroker(f"redis://127.0.0.1:{port}/0", "a").start()
        try:
            first, second = Run("r1", scope="conn:1"), Run("r1", scope="conn:1")
            results = await asyncio.gather(broker.add_run(first, 0), broker.add_run(second, 0),
                                           return_exceptions=True)
            assert results[0] is None and isinstance(results[1], ValueError)
            await broker.link.send([("PING",)])  # everything before it is written
            assert await broker.link.redis.exists(f"wsagent:run:{first.key}") == 1
            assert await broker.link.redis.exists(f"wsagent:run:{second.key}", f"wsagent:log:{second.key}") == 0
        finally:
            await broker.close()
