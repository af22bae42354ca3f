"""What the cyclic garbage collector sees: as little as possible.

A collection pauses every stream at once, for a time that grows with the
objects it walks; at a thousand streams one pause of 50 ms breaks the scale
target (see docs/benchmarks.md). So a closed connection must be freed by
reference counting alone, and a run's replay log, which grows with every token,
must hold nothing the collector tracks. Both are checked with the collector
switched off: what it would have had to find is then still there.
"""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from collections.abc import Callable, Iterator
from types import FrameType

import pytest

from wsagent.core.tuning import break_transport_cycles
from wsagent.wiring.server import WsAgentServer

from .helpers import ServerFactory, find_run, recv_json, run_events, text_reply, ws_connect


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The collector off, in a process patched as ``serve`` patches its own (:func:`break_transport_cycles`):
    what these tests find left in ``gc.garbage`` is what a served process would leave."""
    break_transport_cycles()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def connections_ended(server: WsAgentServer) -> None:
    """Until the server has let go of every connection (/ws/chat's have no task to wait for)."""
    async with asyncio.timeout(10):
        await server.manager.wait_empty()


async def test_a_closed_connection_is_freed_without_the_collector(make_server: ServerFactory,
                                                                 no_collector: None) -> None:
    server = await make_server(resume_grace=0)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send("Tell me about sockets sim:tokens=30")
        assert (await text_reply(ws)).endswith("\n[DONE]")
        await ws.send(json.dumps({"type": "run", "id": "r1", "prompt": "and cycles sim:tokens=500 sim:rate=200"}))
        assert (await recv_json(ws))["type"] == "start"
        (conn,) = list(server.manager)
        run = find_run(server, "r1")
        assert run is not None and not run.finished
        held: dict[str, Callable[[], object]] = {"connection": weakref.ref(conn), "websocket": weakref.ref(conn.ws),
                                                 "run": weakref.ref(run)}
        del conn, run
    await connections_ended(server)  # the client left mid-stream: the run is cancelled, the connection ends
    assert {name: ref() is None for name, ref in held.items()} == dict.fromkeys(held, True)


async def test_a_runs_replay_log_gives_the_collector_nothing_to_track(make_server: ServerFactory,
                                                                      no_collector: None) -> None:
    server = await make_server(resume_grace=60)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "warm-up", "prompt": "hi sim:tokens=5"}))
        await run_events(ws, "warm-up")  # the upstream connection and first-use state exist from here on
        before = {id(o) for o in gc.get_objects(0)}  # with the collector off, every new object stays young
        await ws.send(json.dumps({"type": "run", "id": "r1", "prompt": "count sim:tokens=3000 sim:rate=6000"}))
        received = len(await run_events(ws, "r1"))  # the events' dicts are freed again here
        created = sum(id(o) not in before for o in gc.get_objects(0))  # tracked objects made and still alive
        run = find_run(server, "r1")
        assert run is not None and run.finished
        kept = len(run._log.codes)
    assert kept == received >= 500  # nothing trimmed: the whole run is kept for resume
    assert created < kept / 4  # an object (or a tuple) per kept event would be one or two per event


@pytest.mark.parametrize("compression", ["deflate", None])
@pytest.mark.parametrize("close", ["clean", "reset", "fin", "mid-run reset", "mid-run clean"])
async def test_every_kind_of_close_frees_the_protocol(make_server: ServerFactory, no_collector: None,
                                                      close: str, compression: str | None) -> None:
    """The library's protocol object stayed behind after every kind of close, held by its suspended
    parser generator (and after a reset by the traceback in ``parser_exc``): 1,053 of them after a soak."""
    server = await make_server(resume_grace=0)
    ws = await ws_connect(server, "/ws/chat", compression=compression)
    if close.startswith("mid-run"):
        await ws.send(json.dumps({"type": "run", "id": "r", "prompt": "long sim:rate=100 sim:tokens=10000"}))
        assert (await recv_json(ws))["type"] == "start"
    else:
        await ws.send("hello sim:tokens=3")
        assert (await text_reply(ws)).endswith("[DONE]")
    (conn,) = list(server.manager)
    held: dict[str, Callable[[], object]] = {"protocol": weakref.ref(conn.ws.protocol),
                                             "connection": weakref.ref(conn.ws)}
    del conn
    if close.endswith("reset"):
        ws.transport.abort()
    elif close == "fin":
        ws.transport.write_eof()
    else:
        await ws.close()
    await connections_ended(server)
    ws.transport.abort()
    del ws
    assert {name: ref() is None for name, ref in held.items()} == dict.fromkeys(held, True)


async def test_cancelled_dropped_and_resumed_runs_leave_no_cycles(make_server: ServerFactory,
                                                                 no_collector: None) -> None:
    """A five-minute soak grew 17 % after its first minute: each run cancelled or left by its client
    closed an upstream connection, and Python 3.11's transport kept itself alive in a cycle."""
    server = await make_server(resume_grace=0.2)
    for n in range(3):
        async with ws_connect(server, "/ws/chat") as ws:  # cancelled: the upstream connection is closed
            await ws.send(json.dumps({"type": "run", "id": f"c{n}", "prompt": "x sim:rate=200 sim:tokens=500"}))
            await recv_json(ws)
            await ws.send(json.dumps({"type": "cancel", "id": f"c{n}"}))
            assert (await run_events(ws, f"c{n}"))[-1]["type"] == "cancelled"
        dropped = await ws_connect(server, "/ws/chat")  # dropped, then resumed on a new socket
        await dropped.send(json.dumps({"type": "run", "id": f"d{n}", "prompt": "y sim:rate=200 sim:tokens=40"}))
        key = (await recv_json(dropped))["key"]
        dropped.transport.abort()
        async with ws_connect(server, "/ws/chat") as again:
            await again.send(json.dumps({"type": "resume", "id": f"d{n}", "key": key, "after": 1}))
            assert (await run_events(again, f"d{n}"))[-1]["type"] == "done"
        gone = await ws_connect(server, "/ws/chat")  # left for good: cancelled when its grace is over
        await gone.send(json.dumps({"type": "run", "id": f"g{n}", "prompt": "z sim:rate=200 sim:tokens=500"}))
        await recv_json(gone)
        live = find_run(server, f"g{n}")
        gone.transport.abort()
        assert live is not None
        await live.wait()
        del live
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        ours = sorted({type(o).__name__ for o in gc.garbage} & {
            "_SelectorSocketTransport", "ServerProtocol", "StreamConnection", "Run", "Subscription", "Connection",
            "ClientResponse", "Outbox"})
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    assert ours == []


async def test_a_reset_under_a_write_leaves_no_cycle(make_server: ServerFactory, no_collector: None) -> None:
    """A client that resets while the server writes to it: the write's error held the frames of the
    write path, which held the connection (found by the soak: a few per second at 100 clients)."""
    server = await make_server(resume_grace=0)
    for n in range(3):
        ws = await ws_connect(server, "/ws/chat", max_size=None)
        await ws.send(json.dumps({"type": "run", "id": f"w{n}", "prompt": "x sim:rate=100 sim:tokens=2000"}))
        await recv_json(ws)
        (conn,) = list(server.manager)
        conn.ws.transport.pause_reading()  # the reset is then noticed by a write of ours, not by a read
        del conn
        ws.transport.abort()
        await connections_ended(server)
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        ours = sorted({type(o).__name__ for o in gc.garbage} & {"ServerProtocol", "StreamConnection", "Run"}) + [
            o.f_code.co_name for o in gc.garbage if type(o) is FrameType and "/wsagent/" in o.f_code.co_filename]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    assert ours == []
