"""A rolling restart loses nothing: each node of a cluster in turn gets SIGTERM, tells its clients to move
(1012), keeps producing their runs, and exits when they end; the clients resume on another node by key.

Three nodes on default settings (no resume grace), one Redis, one simulator, and streams of long answers
that span each restart. Every client must be told to move within a second of its node's SIGTERM, and
every run must end ``done`` with the simulator's whole answer, no character lost or doubled, ``seq``
contiguous across the move.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from wsagent.core.chunks import TextDelta
from wsagent.upstream.simulator import SimulatorServer

from .helpers import TERMINAL, Cluster, Node, upstream_for

STREAMS = 150
PROMPTS = [f"restart topic {n} sim:rate=40 sim:tokens=100" for n in range(4)]  # 2.5 s each
OPTIONS = {"resume_grace": None, "drain_timeout": 30,  # defaults, but for a drain longer than an answer,
           "max_runs_per_ip": 0}  # and all these clients on one address


async def answers(sim: SimulatorServer) -> dict[str, str]:
    client = upstream_for(sim)
    try:
        return {prompt: "".join([e.text async for e in client.stream([{"role": "user", "content": prompt}])
                                 if isinstance(e, TextDelta) and e.kind == "content"]) for prompt in PROMPTS}
    finally:
        await client.close()


@dataclass
class Fleet:
    """The nodes a client may (re)connect to, and when each was told to stop."""

    live: list[Node]
    stopped_at: dict[str, float] = field(default_factory=dict)
    moves: list[float] = field(default_factory=list)  # seconds from a node's SIGTERM to its client's 1012
    restarting: bool = True
    streaming: asyncio.Event = field(default_factory=asyncio.Event)  # set at each token a client reads


async def stream(fleet: Fleet, number: int, expected: dict[str, str]) -> list[tuple[str, list[int], str]]:
    """Runs one after another until the restarts are over: (outcome, seqs, text) of each."""
    loop = asyncio.get_running_loop()
    results: list[tuple[str, list[int], str]] = []
    count = 0
    while fleet.restarting or not results:
        count += 1
        prompt = PROMPTS[(number + count) % len(PROMPTS)]
        node = fleet.live[number % len(fleet.live)]
        ws: ClientConnection = await node.connect()
        run_id = f"s{number}-{count}"
        await ws.send(json.dumps({"type": "run", "id": run_id, "prompt": prompt}))
        seqs: list[int] = []
        text: list[str] = []
        key = ""
        while True:
            try:
                event = json.loads(await asyncio.wait_for(ws.recv(), 20))
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1012, closed
                fleet.moves.append(loop.time() - fleet.stopped_at[node.name])
                node = random.choice(fleet.live)
                ws = await node.connect()
                await ws.send(json.dumps({"type": "resume", "id": run_id, "key": key, "after": seqs[-1]}))
                continue
            assert event.get("id") == run_id and "seq" in event, event
            seqs.append(event["seq"])
            if event["type"] == "start":
                key = event["key"]
            elif event["type"] == "token":
                text.append(event["content"])
                fleet.streaming.set()
            elif event["type"] in ("done", "error", "cancelled"):
                results.append((event["type"], seqs, "".join(text)))
                break
        await ws.close()
        assert results[-1][2] == expected[prompt] or results[-1][0] != "done", run_id
    return results


async def test_a_rolling_restart_loses_nothing(cluster: Cluster, sim: SimulatorServer) -> None:
    expected = await answers(sim)
    fleet = Fleet(await cluster.start("a", "b", "c", **OPTIONS))
    loop = asyncio.get_running_loop()
    clients = [loop.create_task(stream(fleet, n, expected)) for n in range(STREAMS)]
    for name in ("a", "b", "c"):
        fleet.streaming.clear()
        await asyncio.wait_for(fleet.streaming.wait(), 20)  # streams are running
        node = next(n for n in fleet.live if n.name == name)
        fleet.live.remove(node)
        fleet.stopped_at[name] = loop.time()
        node.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(node.process.wait(), 40) == 0  # once its runs have ended
        fleet.live.append(await cluster.node(name, **OPTIONS))
    fleet.restarting = False
    results = [run for runs in await asyncio.wait_for(asyncio.gather(*clients), 60) for run in runs]
    assert [outcome for outcome, _, _ in results].count("done") == len(results)  # none cancelled, none failed
    assert all(seqs == list(range(1, len(seqs) + 1)) for _, seqs, _ in results)  # nothing lost or doubled
    assert fleet.moves and max(fleet.moves) < 1.0, sorted(fleet.moves)[-5:]


async def test_a_moved_client_may_drop_again_while_its_node_hands_over(cluster: Cluster) -> None:
    """A client moved by a 1012 that dropped again on the node it moved to lost its run at once: the handing
    node orphaned it with the run's own grace (0 by default), not the drain's."""
    a, b = await cluster.start("a", "b", **OPTIONS)
    async with a.connect() as ws:
        await ws.send(json.dumps({"type": "run", "id": "r", "prompt": "moving sim:rate=40 sim:tokens=120"}))
        key = json.loads(await ws.recv())["key"]
        seqs = [json.loads(await ws.recv())["seq"]]
        a.process.send_signal(signal.SIGTERM)
        try:
            while True:
                seqs.append(json.loads(await asyncio.wait_for(ws.recv(), 10))["seq"])
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1012
    for _ in range(2):  # moved to b, dropped there, back on b
        ws = await b.connect()
        await ws.send(json.dumps({"type": "resume", "id": "r", "key": key, "after": seqs[-1]}))
        event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        seqs.append(event["seq"])
        ws.transport.abort()
    async with b.connect() as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r", "key": key, "after": seqs[-1]}))
        while (event := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] not in TERMINAL:
            seqs.append(event["seq"])
        seqs.append(event["seq"])
    assert event["type"] == "done", event
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert await asyncio.wait_for(a.process.wait(), 40) == 0
