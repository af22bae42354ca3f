"""Cluster mode as docs/scaling-out.md starts it: two nodes, one Redis, every other setting left to its
default (no ``--resume-grace``: a run is cancelled when its client leaves, and forgotten once it ends).

Every run ends with exactly one terminal event for every watcher on every node, and what a watcher on
another node gets is the producer's frames, byte for byte.
"""

from __future__ import annotations

import json
import time

import pytest

from wsagent.cluster import Mirror, RedisBroker
from wsagent.errors import ProtocolViolation

from .conftest import TERMINAL
from .test_ai_sdk import drive_at
from .test_cluster import Cluster, cluster, frames_until, redis_server, run_request, seq, start, terminal

__all__ = ["cluster"]  # the fixture

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
            key = await start(producer, run_id, "hello sim:rate=1000 sim:tokens=80")
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
            await start(ws, "again", "short sim:tokens=3")
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
            await broker.redis.hset(f"wsagent:run:{key}", mapping={"meta": json.dumps(meta),
                                                                   "origins": "[[null, null]]"})
            await broker.redis.zadd("wsagent:nodes", {"b2": time.time() * 1000})  # its producer is alive
            found = await broker.run_by_key(key)
            assert isinstance(found, Mirror)
            await broker.redis.delete(f"wsagent:run:{key}")  # expired
            with pytest.raises(ProtocolViolation) as refused:
                await broker.follow(found, 0)
            assert refused.value.code == "unknown_run"
            assert not broker._mirrors
        finally:
            await broker.close()
