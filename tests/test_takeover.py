"""Runs that outlive their node (``--takeover``): real processes (three nodes, Redis, the simulator); the producer
is SIGKILLed mid-answer. Scenarios run with both methods where they behave differently: ``background`` (the
Responses API's background responses, re-attached after their last event read) and ``continue`` (chat
completions: the request sent again with the partial answer, which the simulator continues as vLLM's
``continue_final_message`` does).

Each scenario waits out the others' patience (NODE_TTL) at least once, so the tests run several side by side,
each in a cluster of its own (its own Redis, simulator and nodes: :func:`~tests.helpers.side_by_side`); a failure
names its scenario (the function below that asserts it, and its method)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from wsagent.upstream.simulator import SimulatorServer

from .helpers import (
    Cluster,
    Node,
    Scenario,
    frames_until,
    key_events,
    redis_fields,
    seq,
    side_by_side,
    start_run,
    terminal,
)

pytestmark = pytest.mark.skipif(not __import__("shutil").which("redis-server"), reason="needs redis-server")

MODES = {"background": {"upstream_api": "responses", "takeover": "background"},
         "continue": {"upstream_api": "chat", "takeover": "continue"}}


def generated_once(sim: SimulatorServer, mode: str, whole: str, tokens: int, takeovers: int) -> None:
    """The simulator's records: the run's answer generated once (``background``: one response besides the
    expected one's, each token once, read again ``takeovers`` times, never cancelled), or (``continue``)
    ``takeovers`` requests that continued a prefix of the answer, each a longer one."""
    stats = sim.simulator.stats
    if mode == "background":
        runs = [stat for stat in stats.background.values() if stat.retrievals]
        assert len(runs) == 1 and len(stats.background) == 2, stats.background
        assert (runs[0].tokens, len(runs[0].retrievals), runs[0].cancelled) == (tokens, takeovers, False), runs[0]
        return
    assert len(stats.continued) == takeovers, stats.continued
    assert all(whole.startswith(prefix) for prefix in stats.continued), (whole, stats.continued)
    assert [len(prefix) for prefix in stats.continued] == sorted(map(len, stats.continued))

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


async def a_watcher_and_the_resumed_client_get_the_rest_when_the_producer_dies(cluster: Cluster, mode: str) -> None:
    sim = cluster.sim
    a, b, c = await cluster.start("a", "b", "c", **MODES[mode])
    prompt = "sim:rate=40 sim:tokens=160 sim:reasoning=0 takeover"
    async with a.connect() as own, b.connect() as watcher:
        key = await start_run(own, "r1", prompt)
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(watcher, lambda e: e["type"] == "start")
        head = await frames_until(own, lambda e: e["type"] == "token" and e["seq"] >= 12)
        await killed(a)
        watched = await frames_until(watcher, terminal, limit=60)
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
    generated_once(sim, mode, whole, 160, 1)
    claims = [await taken_over_by(node) for node in (b, c)]
    assert sorted(claims) == [0, 1], claims  # one node took it over, the other did not


async def takeover_off_is_today_s_producer_lost(cluster: Cluster) -> None:
    a, b = await cluster.start("a", "b", upstream_api="responses")
    async with a.connect() as own, b.connect() as watcher:
        key = await start_run(own, "r1", "sim:rate=40 sim:tokens=160 sim:reasoning=0")
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(watcher, lambda e: e["type"] == "token")
        await killed(a)
        last: dict[str, Any] = json.loads((await frames_until(watcher, terminal, limit=30))[-1])
    assert (last["type"], last["code"]) == ("error", "producer_lost")


async def taken_over_by(node: Node) -> int:
    """How many runs ``node`` took over, as its ``/metrics`` says."""
    _, metrics = await node.http("/metrics")
    found = re.search(r"^wsagent_cluster_runs_taken_over_total (\d+)$", metrics, re.M)
    assert found is not None, metrics[-500:]
    return int(found[1])


async def producer_of(cluster: Cluster, key: str) -> str:
    """The node Redis names as the run's producer (a resumable run's hash names it as ``owner``)."""
    return (await redis_fields(cluster.redis_port, "hget", f"wsagent:run:{key}", "owner")).strip()


async def a_run_taken_over_twice_reaches_its_client_whole(cluster: Cluster, mode: str) -> None:
    sim = cluster.sim
    nodes = dict(zip("abc", await cluster.start("a", "b", "c", **MODES[mode]), strict=True))
    prompt = "sim:rate=40 sim:tokens=200 sim:reasoning=0 twice"
    async with nodes["a"].connect() as own:
        key = await start_run(own, "r1", prompt)
        head = await frames_until(own, lambda e: e["type"] == "token" and e["seq"] >= 8)
        await killed(nodes["a"])
    first = await wait_for_producer(cluster, key, {"b", "c"})
    other = ({"b", "c"} - {first}).pop()
    async with nodes[other].connect() as moved:  # resumed on the node that did not take it over
        await moved.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        middle = await frames_until(moved, lambda e: e["type"] == "token" and e["seq"] >= seq(head[-1]) + 8)
        await killed(nodes[first])  # the node going on with it dies too: the last one takes it over
        rest = await frames_until(moved, terminal, limit=60)
    assert await producer_of(cluster, key) == other
    contiguous(middle + rest, seq(head[-1]))
    assert json.loads(rest[-1])["type"] == "done", rest[-1]
    assert text(head) + text(middle) + text(rest) == await expected(nodes[other], prompt)
    generated_once(sim, mode, text(head) + text(middle) + text(rest), 200, 2)  # read by three nodes in turn


async def wait_for_producer(cluster: Cluster, key: str, among: set[str], limit: float = 20) -> str:
    """The node that took run ``key`` over (one of ``among``), once Redis names it (the claim writes the run's
    hash: its keyspace events say when)."""
    async with key_events(cluster.redis_port, f"wsagent:run:{key}", "gh") as events, asyncio.timeout(limit):
        while (node := await producer_of(cluster, key)) not in among:
            await events.get()
    return node


async def cancel_after_a_takeover_cancels_the_response_upstream(cluster: Cluster, mode: str) -> None:
    sim = cluster.sim
    a, b = await cluster.start("a", "b", **MODES[mode])
    async with a.connect() as own:
        key = await start_run(own, "r1", "sim:rate=20 sim:tokens=400 sim:reasoning=0")
        head = await frames_until(own, lambda e: e["type"] == "token")
        await killed(a)
    async with b.connect() as moved:
        await moved.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        await frames_until(moved, lambda e: e["type"] == "token", limit=20)  # going on, from node b
        await moved.send(json.dumps({"type": "cancel", "id": "r1"}))
        end = json.loads((await frames_until(moved, terminal))[-1])
    assert end["type"] == "cancelled", end
    stats = sim.simulator.stats
    if mode == "background":  # (the simulator marks the response cancelled, then its generation ends: wait for both)
        await stats.wait_for(lambda s: any(stat.cancelled and stat.status == "cancelled"
                                           for stat in s.background.values()), limit=10)
        stat = next(iter(stats.background.values()))
        assert stat.status == "cancelled" and stat.tokens < 400
    else:  # the continuation's connection closed (the first one closed when a died)
        await stats.wait_for(lambda s: s.active == 0, limit=10)
        assert (stats.disconnected, len(stats.continued)) == (2, 1)


async def a_producer_that_comes_back_writes_nothing_more(cluster: Cluster, mode: str) -> None:
    """A producer paused past the others' patience (SIGSTOP: a frozen VM, a long GC) finds its run taken over
    when it wakes: the fence keeps its writes out of Redis, and its own client is told ``taken_over``."""
    sim = cluster.sim
    a, b = await cluster.start("a", "b", **MODES[mode])
    prompt = "sim:rate=40 sim:tokens=400 sim:reasoning=0 paused"
    async with a.connect() as own, b.connect() as watcher:
        key = await start_run(own, "r1", prompt)
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(watcher, lambda e: e["type"] == "start")
        await frames_until(own, lambda e: e["type"] == "token" and e["seq"] >= 6)
        a.process.send_signal(signal.SIGSTOP)
        try:
            await wait_for_producer(cluster, key, {"b"})
            middle = await frames_until(watcher, lambda e: e["type"] == "token", limit=20)  # b goes on
        finally:
            a.process.send_signal(signal.SIGCONT)
        told = json.loads((await frames_until(own, terminal, limit=20))[-1])
        watched = await frames_until(watcher, terminal, limit=60)
    # (what a relayed while the others took it for dead reached its own client only, never Redis)
    assert (told["type"], told["code"], told["retryable"]) == ("error", "taken_over", True), told
    assert "seq" not in told  # (the seqs after what Redis had are the new producer's)
    contiguous(middle + watched, seq(middle[0]) - 1)
    assert json.loads(watched[-1])["type"] == "done"
    log = await redis_fields(cluster.redis_port, "xrange", f"wsagent:log:{key}", "-", "+")
    assert log.count("taken_over") == 0  # a's end never reached Redis
    if mode == "background":
        stat = next(s for s in sim.simulator.stats.background.values() if s.retrievals)
        assert stat.tokens == 400 and not stat.cancelled  # a closed its stream without cancelling b's response
    else:
        assert len(sim.simulator.stats.continued) == 1


async def a_node_stopped_past_its_drain_leaves_its_runs_to_another(cluster: Cluster) -> None:
    """SIGTERM with a drain shorter than the answer (a rolling restart; an orchestrator's SIGKILL after it): the
    client moves at the 1012 and resumes on b; past the drain, b goes on with the run itself."""
    sim = cluster.sim
    mode = "background"  # (--drain-timeout 0 below runs the other)
    a, b = await cluster.start("a", "b", drain_timeout=1, **MODES[mode])
    prompt = "sim:rate=40 sim:tokens=240 sim:reasoning=0 drained"
    async with a.connect() as own:
        key = await start_run(own, "r1", prompt)
        head = await frames_until(own, lambda e: e["type"] == "token" and e["seq"] >= 4)
        a.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            await frames_until(own, terminal)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    async with b.connect() as moved:
        after = seq(head[-1])
        await moved.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": after}))
        rest = await frames_until(moved, terminal, limit=30)
    assert await a.process.wait() == 0
    assert await producer_of(cluster, key) == "b"
    contiguous(rest, after)
    assert json.loads(rest[-1])["type"] == "done", rest[-1]
    assert text(head) + text(rest) == await expected(b, prompt)
    generated_once(sim, mode, text(head) + text(rest), 240, 1)


async def a_user_s_run_taken_over_is_found_by_its_id_alone(cluster: Cluster) -> None:
    """A user's run (an id with ``:`` in the user and the run id, as a JWT may carry) is resumed on another node
    by id, with no key: the id still names the run taken over, and another user cannot reach it."""
    a, b = await cluster.start("a", "b", **MODES["background"])
    async with a.connect(user="al:ice") as own:
        key = await start_run(own, "r:1", "sim:rate=40 sim:tokens=160 sim:reasoning=0")
        head = await frames_until(own, lambda e: e["type"] == "token")
        await killed(a)
    async with b.connect(user="al:ice") as moved, b.connect(user="al") as stranger:
        await stranger.send(json.dumps({"type": "resume", "id": "r:1", "after": seq(head[-1])}))
        refused = json.loads((await frames_until(stranger, lambda e: "code" in e))[-1])
        await moved.send(json.dumps({"type": "resume", "id": "r:1", "after": seq(head[-1])}))
        rest = await frames_until(moved, terminal, limit=30)
    assert refused["code"] == "unknown_run", refused
    contiguous(rest, seq(head[-1]))
    assert json.loads(rest[-1])["type"] == "done"
    assert await producer_of(cluster, key) == "b"


def thoughts(frames: list[str]) -> dict[str, Any]:
    """An agent run's frames by kind: its thinking and answer texts, its actions and observations in order."""
    events = [json.loads(f) for f in frames]
    steps = [""]  # the thinking of each step (a step ends with a tool's observation)
    for event in events:
        if event["type"] == "thinking":
            steps[-1] += event["content"]
        elif event["type"] == "observation":
            steps.append("")
    return {"thinking": steps,
            "answer": "".join(e["content"] for e in events if e["type"] == "answer"),
            "actions": [e["content"] for e in events if e["type"] == "action"],
            "observations": [e["content"] for e in events if e["type"] == "observation"]}


async def an_agent_run_goes_on_from_its_last_step(cluster: Cluster, mode: str, kill_at: str) -> None:
    """The built-in agent, killed while it thinks, after a tool's observation, or while it answers: the node
    that takes it over goes on from its last step (the tool results observed are not run again) and the
    model call in progress is read again after its last event (``background``) or continued (``continue``)."""
    a, b, c = await cluster.start("a", "b", "c", **MODES[mode])
    prompt = "What is 17 * 23? sim:rate=40 sim:tokens=80 sim:reasoning=1 sim:tool=calculator"
    async with a.connect() as own, b.connect() as watcher:
        key = await start_run(own, "r1", prompt, agent="assistant")
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(watcher, lambda e: e["type"] == "start")
        head = await frames_until(own, lambda e: e["type"] == kill_at or terminal(e))
        assert not terminal(json.loads(head[-1])), head[-1]
        await killed(a)
        watched = await frames_until(watcher, terminal, limit=60)
    contiguous(watched, 1)
    assert json.loads(watched[-1])["type"] == "done", watched[-1]
    async with c.connect() as ws:
        await start_run(ws, "expected", prompt, agent="assistant")
        whole = thoughts(await frames_until(ws, terminal))
    seen = thoughts(watched)
    assert seen["actions"] == whole["actions"] and seen["observations"] == whole["observations"]  # each once
    assert seen["answer"] == whole["answer"]
    if mode == "background":
        assert seen["thinking"] == whole["thinking"]
    else:  # (a continued answer is not reasoned again: the step's thinking cut by the kill stays cut)
        cut = [n for n, (got, all_) in enumerate(zip(seen["thinking"], whole["thinking"], strict=True)) if got != all_]
        assert len(cut) <= 1 and all(whole["thinking"][n].startswith(seen["thinking"][n]) for n in cut), seen


async def two_runs_of_one_id_from_two_dead_nodes_are_both_taken_over(cluster: Cluster) -> None:
    """Anonymous connections are numbered by each node (``c1``, ``c2``...), so two nodes' first clients can run
    ``r1`` in the same scope's name (``conn:c1``). Taken over by one node, each is its own run, found by key
    (the second was claimed, then never produced: its watchers were told ``producer_lost`` 10 s later)."""
    a, b, c = await cluster.start("a", "b", "c", **MODES["continue"])
    prompt = "sim:rate=40 sim:tokens=120 sim:reasoning=0 same id"
    async with a.connect() as first, c.connect() as second:
        keys = [await start_run(first, "r1", prompt), await start_run(second, "r1", prompt)]
        heads = [await frames_until(ws, lambda e: e["type"] == "token") for ws in (first, second)]
        await asyncio.gather(killed(a), killed(c))
    async with b.connect() as one, b.connect() as other:
        for ws, key, head in zip((one, other), keys, heads, strict=True):
            await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        rests = [await frames_until(ws, terminal, limit=30) for ws in (one, other)]
    whole = await expected(b, prompt)
    for head, rest in zip(heads, rests, strict=True):
        contiguous(rest, seq(head[-1]))
        assert json.loads(rest[-1])["type"] == "done", rest[-1]
        assert text(head) + text(rest) == whole


async def a_node_restarted_under_its_id_goes_on_with_its_runs(cluster: Cluster) -> None:
    """SIGKILL, then the same ``--node-id`` started again at once (systemd's ``Restart=``): to the others the id
    never stopped beating, so the new process itself takes over what its predecessor left (found by the
    attacker: nobody did, and the runs were lost)."""
    mode = "background"
    a, b = await cluster.start("a", "b", **MODES[mode])
    prompt = "sim:rate=40 sim:tokens=200 sim:reasoning=0 restarted"
    async with a.connect() as own:
        key = await start_run(own, "r1", prompt)
        head = await frames_until(own, lambda e: e["type"] == "token")
        await killed(a)
    again = await cluster.node("a", **MODES[mode])
    async with b.connect() as moved:
        await moved.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        rest = await frames_until(moved, terminal, limit=30)
    contiguous(rest, seq(head[-1]))
    assert json.loads(rest[-1])["type"] == "done", rest[-1]
    assert text(head) + text(rest) == await expected(b, prompt)
    assert await taken_over_by(again) == 1


async def a_producer_that_comes_back_never_cancels_what_another_took_over(cluster: Cluster) -> None:
    """A producer paused past the others' patience wakes to its own client gone (the default grace, 0: the run
    is cancelled there) before its heartbeat finds the run taken over: it must not cancel the background response
    the new producer reads, nor end the run's keys in Redis (found by the attacker: the run ended
    ``upstream_truncated`` for everyone)."""
    sim = cluster.sim
    a, b = await cluster.start("a", "b", resume_grace=None, **MODES["background"])
    own = await a.connect()
    key = await start_run(own, "r1", "sim:rate=40 sim:tokens=400 sim:reasoning=0 stale")
    head = await frames_until(own, lambda e: e["type"] == "token")
    a.process.send_signal(signal.SIGSTOP)
    try:
        await wait_for_producer(cluster, key, {"b"})
        own.transport.abort()  # (a reads the reset when it wakes)
        moved = await b.connect()
        await moved.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": seq(head[-1])}))
        rest = await frames_until(moved, lambda e: e["type"] == "token", limit=20)
    finally:
        a.process.send_signal(signal.SIGCONT)
    rest += await frames_until(moved, terminal, limit=30)
    await moved.close()
    contiguous(rest, seq(head[-1]))
    assert json.loads(rest[-1])["type"] == "done", rest[-1]
    stat = next(s for s in sim.simulator.stats.background.values() if s.retrievals)
    assert (stat.cancelled, stat.tokens) == (False, 400)


async def a_cancel_while_nobody_produces_the_run_is_kept_for_the_node_that_takes_it_over(cluster: Cluster) -> None:
    """Between the producer's death and the claim, a cancel from any node is accepted (it was ``unknown_run``, and
    the run went on: found by the attacker): the node that takes the run over ends it ``cancelled``, once, and
    cancels its response upstream though it never read any of it."""
    sim = cluster.sim
    a, b, c = await cluster.start("a", "b", "c", **MODES["background"])
    async with a.connect() as own, b.connect() as watcher, c.connect() as other:
        key = await start_run(own, "r1", "sim:rate=40 sim:tokens=400 sim:reasoning=0 cancel adrift")
        await watcher.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
        await frames_until(watcher, lambda e: e["type"] == "token")
        await killed(a)
        await other.send(json.dumps({"type": "cancel", "id": "r1", "key": key}))
        await other.send(json.dumps({"type": "ping"}))
        told = [json.loads(f) for f in await frames_until(other, lambda e: e["type"] == "pong")]
        watched = [json.loads(f) for f in await frames_until(watcher, terminal, limit=30)]
    assert [e for e in told if e["type"] == "error"] == [], told
    assert [e["type"] for e in watched if e["type"] in ("done", "error", "cancelled")] == ["cancelled"], watched[-2:]
    stats = sim.simulator.stats
    await stats.wait_for(lambda s: any(stat.cancelled for stat in s.background.values()), limit=10)


async def a_node_stopped_with_no_drain_tells_its_clients_where_the_run_goes_on(cluster: Cluster) -> None:
    """``--drain-timeout 0``: no 1012 first; each client of a run left to the others gets one ``taken_over`` error
    without a ``seq`` (it had one, which named the new producer's next event: found by the attacker), and a
    resume after the last seq it saw gets the rest."""
    a, b = await cluster.start("a", "b", drain_timeout=0, **MODES["continue"])
    prompt = "sim:rate=40 sim:tokens=240 sim:reasoning=0 no drain"
    async with a.connect() as own:
        key = await start_run(own, "r1", prompt)
        head = await frames_until(own, lambda e: e["type"] == "token" and e["seq"] >= 4)
        a.process.send_signal(signal.SIGTERM)
        seen = [json.loads(f) for f in head + await frames_until(own, terminal)]
    told = seen[-1]
    assert (told["type"], told["code"], "seq" in told) == ("error", "taken_over", False), told
    after = max(e["seq"] for e in seen if "seq" in e)
    async with b.connect() as moved:
        await moved.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": after}))
        rest = await frames_until(moved, terminal, limit=30)
    contiguous(rest, after)
    assert json.loads(rest[-1])["type"] == "done", rest[-1]


# The tests: scenarios side by side, each in its own cluster.

def each_mode(scenario: Callable[..., Awaitable[None]], **arguments: str) -> dict[str, Scenario]:
    """``scenario`` with each method, as :func:`side_by_side` names them."""
    return {named(scenario, mode=mode, **arguments): partial(scenario, mode=mode, **arguments)
            for mode in sorted(MODES)}


def once(scenario: Callable[..., Awaitable[None]], **arguments: str) -> dict[str, Scenario]:
    return {named(scenario, **arguments): partial(scenario, **arguments)}


def named(scenario: Callable[..., Awaitable[None]], **arguments: str) -> str:
    return scenario.__name__ + (f"[{'-'.join(arguments.values())}]" if arguments else "")


async def test_a_dead_producer_s_runs_reach_their_clients_whole() -> None:
    """A producer SIGKILLed mid-answer (with a watcher; taken over twice; two runs of one id from two dead nodes;
    a user's run, by its id), and the same kill with takeover off (today's ``producer_lost``)."""
    await side_by_side(each_mode(a_watcher_and_the_resumed_client_get_the_rest_when_the_producer_dies)
                       | each_mode(a_run_taken_over_twice_reaches_its_client_whole)
                       | once(two_runs_of_one_id_from_two_dead_nodes_are_both_taken_over)
                       | once(a_user_s_run_taken_over_is_found_by_its_id_alone)
                       | once(takeover_off_is_today_s_producer_lost))


async def test_a_producer_that_stops_or_comes_back_leaves_its_runs_to_another() -> None:
    """A producer paused past the others' patience (SIGSTOP) that wakes; SIGTERM past a drain, and with none; a node
    SIGKILLed and started again at once under its id."""
    await side_by_side(each_mode(a_producer_that_comes_back_writes_nothing_more)
                       | once(a_producer_that_comes_back_never_cancels_what_another_took_over)
                       | once(a_node_stopped_past_its_drain_leaves_its_runs_to_another)
                       | once(a_node_stopped_with_no_drain_tells_its_clients_where_the_run_goes_on)
                       | once(a_node_restarted_under_its_id_goes_on_with_its_runs))


async def test_an_agent_run_goes_on_from_its_last_step_and_a_cancel_reaches_the_new_producer() -> None:
    """The built-in agent killed while it thinks, after a tool's observation, or while it answers; a cancel after
    a takeover, and one sent while nobody produces the run."""
    await side_by_side(once(an_agent_run_goes_on_from_its_last_step, mode="background", kill_at="thinking")
                       | once(an_agent_run_goes_on_from_its_last_step, mode="continue", kill_at="thinking")
                       | once(an_agent_run_goes_on_from_its_last_step, mode="background", kill_at="observation")
                       | once(an_agent_run_goes_on_from_its_last_step, mode="continue", kill_at="answer")
                       | each_mode(cancel_after_a_takeover_cancels_the_response_upstream)
                       | once(a_cancel_while_nobody_produces_the_run_is_kept_for_the_node_that_takes_it_over))
